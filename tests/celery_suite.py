"""Celery's own integration suite on ``pgbroker://``, side by side with Redis.

The suite is ``t/integration`` of the sdist of the installed Celery
(downloaded and cached like kombu's, :mod:`sdists`; never copied here), run
by pytest as Celery's CI runs it, one session per module: its
``conftest.py`` starts a session worker (prefork) in the test process and
reads the broker and the result backend from ``TEST_BROKER`` and
``TEST_BACKEND``. For pgbroker both are ``pgbroker://`` on a fresh database;
for Redis both are ``redis://``. pytest runs with the sdist's own
configuration (``pyproject.toml``: strict markers, xfail strict), its
``celery.contrib.pytest`` plugin, and ``-p pg_broker`` (kombu has no
transport entry points: importing the package registers the scheme).

Run every module the suite has that is not tied to one other backend, on
both, and compare (it takes a while; Celery's CI reruns its flaky tests,
``pip install pytest-rerunfailures`` does the same here)::

    python tests/celery_suite.py
    python tests/celery_suite.py --backends pgbroker --modules test_tasks.py -- -k expired

``--pg-server`` (default ``PG_BROKER_TEST_URL``, else an embedded server in a
temporary directory) and ``--redis`` name the servers. It prints passed,
failed, skipped and xfailed per module and backend, then every test whose
outcome differs, and exits 1 when a test that passed on Redis did not pass
on pgbroker. ``e2e/test_celery_suite.py`` runs a representative part of it
in the normal test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
from celery_workers import pgbroker_url
from psycopg import sql
from sdists import source_tree

from pg_broker.database import embedded_url, stop_embedded, with_database

# The modules of t/integration that are not about one other backend.
MODULES = (
    "test_tasks.py", "test_canvas.py", "test_inspect.py", "test_group_chains.py",
    "test_connection_recovery.py", "test_worker.py", "test_backend_leak_in_fixture_teardown.py", "test_beat.py",
    "test_events_state_memory_leak.py", "test_loader.py", "test_logfile_format.py",
    "test_mem_leak_in_exception_handling.py", "test_request_backend_down.py",
    "test_security.py", "test_serialization.py", "test_upgrade.py",
)
# The others, and why they are left out.
LEFT_OUT = {
    "test_backend.py": "Azure Block Blob's result backend",
    "test_cache_backend.py": "memcached's result backend",
    "test_database_backend.py": "Celery's SQLAlchemy result backend",
    "test_redis_backend.py": "Redis's result backend",
}
REDIS_URL = "redis://127.0.0.1:6379/14"
PER_TEST_TIMEOUT = 300


def celery_source() -> Path:
    return source_tree("celery", "t/integration/conftest.py", "Celery's integration suite")


def run_suite(broker: str, backend: str, tests: Sequence[str], report: Path, log: Path,
              pytest_args: Sequence[str] = (), timeout: float | None = None) -> dict[str, str]:
    """Run Celery's integration ``tests`` (paths under ``t/integration``, with
    ``::`` selectors if wanted) on a broker and a result backend, in one
    pytest session; the outcome (passed, failed, skipped, xfailed) of every
    test by its node id (none when the session could not run)."""
    source = celery_source()
    # Its tests start `celery` by name (test_worker.py, test_serialization.py):
    # the one of this interpreter's environment, activated or not.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, TEST_BROKER=broker, TEST_BACKEND=backend, PATH=path)
    command = [
        # Run from the sdist's root, as Celery's CI does (test_worker.py starts
        # `celery --config t.integration.worker_config`), but its `celery`
        # package must not shadow the installed one: -P keeps the working
        # directory off sys.path, and `t` is appended to it.
        sys.executable, "-P", "-m", "pytest",
        f"--rootdir={source}", "-c", str(source / "pyproject.toml"), "--import-mode=append",
        "-p", "celery.contrib.pytest", "-p", "pg_broker", "-p", "no:cacheprovider",
        f"--timeout={PER_TEST_TIMEOUT}", f"--junitxml={report}", "-q", "-rfEs",
        *(str(source / "t" / "integration" / test) for test in tests), *pytest_args,
    ]
    with open(log, "w") as output:
        subprocess.run(command, cwd=source, env=env, stdout=output, stderr=subprocess.STDOUT,
                       timeout=timeout)
    return outcomes(report) if report.exists() else {}


def outcomes(report: Path) -> dict[str, str]:
    """Outcomes from pytest's JUnit XML (a rerun test: its last run)."""
    found: dict[str, str] = {}
    for case in ElementTree.parse(report).iter("testcase"):
        node = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            found[node] = "failed"
        elif "skipped" in kinds:
            xfail = kinds["skipped"].get("type") == "pytest.xfail"
            found[node] = "xfailed" if xfail else "skipped"
        else:
            found[node] = "passed"
    return found


@contextmanager
def pgbroker_database(server: str | None) -> Iterator[str]:
    """A fresh database for one run (on ``server``, else an embedded one); its libpq URL."""
    data_dir = None
    if server is None:
        data_dir = Path(tempfile.mkdtemp(prefix="celery_suite_")) / "pgdata"
        server = embedded_url(data_dir)
    name = f"celery_suite_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                          .format(sql.Identifier(name)))
        if data_dir is not None:
            stop_embedded(data_dir)
            shutil.rmtree(data_dir.parent, ignore_errors=True)


def module_of(node: str) -> str:
    """``t.integration.test_tasks.test_tasks::test_fail`` -> ``test_tasks.py``."""
    return node.split("::")[0].split(".")[2] + ".py"


def compare(results: dict[str, dict[str, str]]) -> list[str]:
    """Print counts per module and backend, and the tests whose outcomes
    differ; return the tests that passed on Redis but not on pgbroker."""
    backends = list(results)
    modules = sorted({module_of(node) for found in results.values() for node in found})
    kinds = ("passed", "failed", "skipped", "xfailed")
    print(f"\n{'module':42}" + "".join(f"{b + ' ' + k[:4]:>15}" for b in backends for k in kinds))
    for module in [*modules, "all"]:
        row = f"{module:42}"
        for backend in backends:
            counts = Counter(outcome for node, outcome in results[backend].items()
                             if module == "all" or module_of(node) == module)
            row += "".join(f"{counts[k]:>15}" for k in kinds)
        print(row)
    nodes = sorted({node for found in results.values() for node in found})
    different = [node for node in nodes
                 if len({results[b].get(node, "not run") for b in backends}) > 1]
    if different:
        print("\noutcomes that differ:")
        for node in different:
            print("  " + node + ": " + ", ".join(
                f"{b} {results[b].get(node, 'not run')}" for b in backends))
    if "redis" not in results or "pgbroker" not in results:
        return []
    return [node for node, outcome in results["redis"].items()
            if outcome == "passed" and results["pgbroker"].get(node) != "passed"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/celery_suite.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="pgbroker,redis",
                        help="comma-separated: pgbroker, redis (default both)")
    parser.add_argument("--modules", default=",".join(MODULES),
                        help="comma-separated modules of t/integration (default: all but "
                             + ", ".join(LEFT_OUT) + ")")
    parser.add_argument("--pg-server", default=os.environ.get("PG_BROKER_TEST_URL"),
                        help="PostgreSQL server URL (default PG_BROKER_TEST_URL, else embedded)")
    parser.add_argument("--redis", default=REDIS_URL, help=f"Redis URL (default {REDIS_URL})")
    parser.add_argument("--out", type=Path, default=Path("celery-suite-results"),
                        help="directory for the logs and JUnit reports")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    results: dict[str, dict[str, str]] = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend not in ("pgbroker", "redis"):
            parser.error(f"unknown backend {backend!r}")
        results[backend] = {}
        with ExitStack() as stack:
            if backend == "pgbroker":
                url = pgbroker_url(stack.enter_context(pgbroker_database(args.pg_server)))
            else:
                url = args.redis
            # One pytest session per module: a module that leaves Celery's
            # session worker broken (on Redis, test_backend_leak_in_fixture_
            # teardown.py does here) must not fail the modules after it.
            for module in modules:
                stem = f"{backend}-{module.removesuffix('.py')}"
                report, log = args.out / f"{stem}.xml", args.out / f"{stem}.log"
                print(f"{backend}: {module} (log: {log})", flush=True)
                results[backend].update(
                    run_suite(url, url, [module], report, log, args.pytest_args))
    regressions = compare(results)
    if regressions:
        print(f"\n{len(regressions)} test(s) passed on Redis and not on pgbroker")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
