#!/usr/bin/env python3
"""Set up hoptrace in ./.venv on a fresh machine, then run it.

    python3 dev.py demo [OPTIONS]     the bundled demo: stack + proxy + analysis + charts
    python3 dev.py test [PYTEST ARGS] the test suite
    python3 dev.py bench [OPTIONS]    the benchmark (see benchmarks/README.md)
    python3 dev.py hoptrace ARGS      any hoptrace command

Needs only Python 3.11+; the first run installs everything else from PyPI into
./.venv, and later runs reinstall only when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".hoptrace-installed"


def ensure_installed() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    print("dev.py: installing hoptrace and its dependencies (first run only)", flush=True)
    subprocess.run([BIN / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


BROWSER_PACKAGES = ("chromium", "chromium-driver")
BROWSER_FILES = (Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver"))


def ensure_browser() -> None:
    """Install Debian's chromium and chromium-driver, which the UI's browser tests drive through Selenium.

    Runs apt-get only when a binary is missing and we are root (CI containers are);
    otherwise says what to install. A failed install stops the run: the browser
    tests would otherwise fail one by one with a less clear message.
    """
    if all(f.exists() for f in BROWSER_FILES):
        return
    missing = ", ".join(str(f) for f in BROWSER_FILES if not f.exists())
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        sys.exit(f"dev.py: {missing} missing; install them with: sudo apt-get install -y {' '.join(BROWSER_PACKAGES)}")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *BROWSER_PACKAGES]):
        print(f"dev.py: {missing} missing; running: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=False).returncode != 0:
            sys.exit(f"dev.py: '{' '.join(cmd)}' failed; the browser tests need {' and '.join(BROWSER_PACKAGES)}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "bench", "hoptrace"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if sys.version_info < (3, 11):
        print(f"dev.py: hoptrace needs Python 3.11+, this is {sys.version.split()[0]}", file=sys.stderr)
        return 2
    ensure_installed()
    command, args = argv[0], argv[1:]
    if command == "test":
        ensure_browser()
        cmd = [BIN / "python", "-m", "pytest", *args]
    elif command == "bench":
        cmd = [BIN / "python", ROOT / "benchmarks" / "run.py", *args]
    elif command == "demo":
        cmd = [BIN / "hoptrace", "demo", *args]
    else:
        cmd = [BIN / "hoptrace", *args]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
