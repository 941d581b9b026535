"""Debian's headless chromium driven through Selenium, and `hoptrace ui` as a real process, for the UI tests."""

from __future__ import annotations

import io
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Flags that run chromium headless in a container without a GPU, a sandbox or network chatter.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1400,900", "--disable-dev-shm-usage",
)  # fmt: skip
WAIT_S = 10.0


def chromium():
    """A new headless chromium with a fresh profile; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:  # `python3 dev.py test` installs them; a bare pytest may not have
        pytest.fail(f"{', '.join(missing)} missing: run `python3 dev.py test` (it installs chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="hoptrace-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_S)
    driver.profile_dir = profile
    return driver


def quit_browser(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def ui_args(*dbs: Path) -> list[str]:
    return [sys.executable, "-m", "hoptrace", "ui", *map(str, dbs), "--port", "0"]


def ui_url(proc) -> str:
    """The URL `hoptrace ui` printed once it served."""
    proc.wait_for("hoptrace ui: serving", timeout=60)
    return re.search(r"at (http://\S+)", proc.output).group(1)


def start_ui(spawn, *dbs: Path) -> str:
    """`hoptrace ui DB... --port 0` as a child process (stopped by ``spawn``); its URL."""
    return ui_url(spawn(ui_args(*dbs)))


def png_colours(png: bytes) -> int:
    """How many distinct colours a screenshot holds: one for a blank page, hundreds once text is drawn."""
    from PIL import Image  # pillow comes with matplotlib

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 20) or [])
