#!/usr/bin/env python3
"""Set up hoptrace in ./.venv on a fresh machine, then run it.

    python3 dev.py demo [OPTIONS]     the bundled demo: stack + proxy + analysis + charts
    python3 dev.py test [PYTEST ARGS] the test suite, one pytest-xdist worker per core
    python3 dev.py bench [OPTIONS]    the benchmark (see benchmarks/README.md)
    python3 dev.py hoptrace ARGS      any hoptrace command

Needs only Python 3.11+; the first run installs everything else from PyPI into
./.venv, and later runs reinstall only when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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
    compile_optimized()
    STAMP.write_text(wanted)


# hoptrace's own packages, as pyproject.toml maps them (installed editable: their sources are here).
PACKAGE_DIRS = ("hoptrace", "proxy", "analyzer", "addons")


def compile_optimized() -> None:
    """Write the ``python -O`` bytecode of everything installed, once (~12 s on 2 cores).

    `hoptrace proxy` runs under -O, and pip writes only the plain bytecode: without this, a
    machine that may not write bytecode (PYTHONDONTWRITEBYTECODE, as CI sets) would compile
    mitmproxy afresh at every proxy start (~1.7 s), and the proxy would skip -O there.
    """
    print("dev.py: compiling the -O bytecode (first run only)", flush=True)
    site = subprocess.run(
        [BIN / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True, check=True
    ).stdout.strip()
    # Some packages ship files that are not Python 3 (templates, tests): compileall says so and goes on.
    folders = [site, *(str(ROOT / name) for name in PACKAGE_DIRS)]
    subprocess.run([BIN / "python", "-O", "-m", "compileall", "-q", "-j", "0", *folders], stdout=subprocess.DEVNULL, check=False)


# command -> Debian package: Graphviz `dot` lays out the service graph (every command draws
# it); chromium and its driver run the browser tests (only `test` needs them).
RUN_PACKAGES = {"dot": "graphviz"}
TEST_PACKAGES = {**RUN_PACKAGES, "chromium": "chromium", "chromedriver": "chromium-driver"}


def ensure_system_packages(packages: dict[str, str]) -> None:
    """Install the Debian packages whose commands are missing, when we may (root, apt-get).

    Otherwise says what to install and stops: a test run without them would fail test by
    test with a less clear message.
    """
    missing = sorted({pkg for cmd, pkg in packages.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"dev.py: please install {' '.join(missing)} (Debian: sudo apt-get install -y {' '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        print(f"dev.py: running {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            sys.exit(f"dev.py: '{' '.join(cmd)}' failed; hoptrace needs {' and '.join(missing)}")


def _parallel(args: list[str]) -> list[str]:
    """pytest-xdist options unless the caller chose their own (``-n 0`` runs in one process).

    Half of the suite's wall time is spent waiting on real processes (proxies, services,
    a browser), so a worker per core overlaps that waiting with the other worker's work.
    ``loadfile`` keeps a module's tests on one worker: the module-scoped fixtures that
    record a scenario through a real proxy then run once, as they do without xdist.
    """
    if any(a == "-n" or a.startswith(("-n", "--numprocesses", "--dist")) for a in args):
        return []
    return ["-n", "auto", "--dist", "loadfile"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "bench", "hoptrace"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if sys.version_info < (3, 11):
        print(f"dev.py: hoptrace needs Python 3.11+, this is {sys.version.split()[0]}", file=sys.stderr)
        return 2
    ensure_system_packages(TEST_PACKAGES if argv[0] == "test" else RUN_PACKAGES)
    ensure_installed()
    command, args = argv[0], argv[1:]
    if command == "test":
        cmd = [BIN / "python", "-m", "pytest", *_parallel(args), *args]
    elif command == "bench":
        cmd = [BIN / "python", ROOT / "benchmarks" / "run.py", *args]
    elif command == "demo":
        cmd = [BIN / "hoptrace", "demo", *args]
    else:
        cmd = [BIN / "hoptrace", *args]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
