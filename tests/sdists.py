"""Source distributions of installed packages, for running their own test suites.

kombu's transport tests (``integration/test_kombu_conformance.py``) and
Celery's integration suite (``celery_suite.py``) come from the sdist of the
installed version: downloaded from PyPI through pip once, extracted into a
cache directory, reused afterwards. Nothing of them is copied into this
repository.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pg_broker-test"


def _download(package: str, version: str, purpose: str) -> Path:
    """The sdist of ``package==version`` from PyPI, through pip, in the cache directory."""
    sdist = CACHE_DIR / f"{package}-{version}.tar.gz"
    if sdist.exists():
        return sdist
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as download_dir:
        command = [
            sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
            "--no-deps", "--disable-pip-version-check", f"{package}=={version}", "-d", download_dir,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        downloaded = Path(download_dir) / sdist.name
        if done.returncode != 0 or not downloaded.exists():
            raise RuntimeError(
                f"could not download the {package} {version} source distribution from PyPI "
                f"(needed for {purpose}; `{' '.join(command)}` "
                f"exited {done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        downloaded.replace(sdist)
    return sdist


def source_tree(package: str, expected: str, purpose: str) -> Path:
    """The extracted source tree of the installed ``package`` (downloaded once,
    then cached); ``expected`` is a path inside it that must exist."""
    version = importlib.metadata.version(package)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    source = CACHE_DIR / f"{package}-{version}"
    # Several pytest sessions may start at once: one downloads, the others wait.
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (source / expected).exists():
            sdist = _download(package, version, purpose)
            with tempfile.TemporaryDirectory(dir=CACHE_DIR) as extract_dir:
                with tarfile.open(sdist) as archive:
                    _extract(archive, Path(extract_dir))
                shutil.rmtree(source, ignore_errors=True)
                (Path(extract_dir) / source.name).replace(source)
    return source


def _extract(archive: tarfile.TarFile, target: Path) -> None:
    """Extract an sdist; only plain files and directories, all inside ``target``."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(target, filter="data")
        return
    # Python 3.11 before 3.11.4 (Debian 12's python3 is 3.11.2) has no
    # extraction filters: refuse what "data" would refuse, then extract.
    root = target.resolve()
    for member in archive.getmembers():
        inside = (target / member.name).resolve().is_relative_to(root)
        if not inside or not (member.isfile() or member.isdir()):
            raise RuntimeError(f"refusing to extract {member.name!r} of {archive.name}")
    archive.extractall(target)
