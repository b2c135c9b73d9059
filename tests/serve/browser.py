"""Headless Chromium for the chat page's tests, driven by Selenium through the OS's chromedriver.

    with chrome() as driver: driver.get(url)          # skips the test when there is no browser
    requests = network_log(driver)                    # every URL the page asked for (DevTools log)
    path = screenshot(driver, "ui-answer.png")        # under runs/test-artifacts/ (gitignored)

The browser comes from the OS packages (`apt-get install chromium chromium-driver`, which
`make browser-deps` runs as root and `.ci/run` calls); where it is missing the tests skip and say
how to install it, rather than fail on a machine that never asked for browser tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("EMBER_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "runs" / "test-artifacts"))
INSTALL = "install it with `sudo make browser-deps` (apt-get install chromium chromium-driver)"


def _find(*names: str) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


@contextlib.contextmanager
def chrome(width: int = 1280, height: int = 860) -> Iterator:
    """A headless Chromium WebDriver that logs the console and the network; quit on exit."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install 'ember[dev]'")
    binary, driver_path = _find("chromium", "chromium-browser", "google-chrome"), _find("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(f"headless Chromium or chromedriver not found: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(arg)  # no-sandbox: CI runs as root; background-networking: no calls home
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def network_log(driver) -> list[str]:
    """URLs of every request the page made since the last call (Chrome's DevTools performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver, name: str) -> Path:
    """Save the window as ARTIFACTS/name and print where (pytest -s shows it; so does the report)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path
