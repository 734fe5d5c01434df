"""A real headless Chromium for the monitor's browser tests, from Debian's ``chromium`` and
``chromium-driver``; ``.ci/run`` installs them, and with ``CI`` set their absence fails the
test. Elsewhere it is skipped, saying why."""

from __future__ import annotations

import collections.abc as cabc
import os
import shutil
import typing as t

import pytest

if t.TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver


def chromium() -> cabc.Iterator[WebDriver]:
    """For a fixture: the browser, quit after the tests that use it."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        reason = (
            "The monitor's browser tests need Debian's Chromium and its driver:"
            " 'apt-get install chromium chromium-driver'."
        )
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(argument)
    made = webdriver.Chrome(options=options, service=Service(driver))
    yield made
    made.quit()
