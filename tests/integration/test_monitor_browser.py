"""The example shop's task monitor in a real headless Chromium, served by gunicorn with two
worker processes and a SQLite task store: tasks appear, show progress, finish; a failed one
shows its error; a task's children show in its tree; nobody signed out sees anything.

Needs Debian's ``chromium`` and ``chromium-driver``; ``.ci/run`` installs them, and with
``CI`` set their absence fails the test. Elsewhere it is skipped, saying why."""

from __future__ import annotations

import collections.abc as cabc
import json
import os
import shutil
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import servers

SCREENSHOT = Path(__file__).parents[2] / "docs" / "_static" / "monitor.png"
TOKEN = "staff-only"

if t.TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver


@pytest.fixture(scope="module")
def browser() -> cabc.Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
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
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(argument)
    made = webdriver.Chrome(options=options, service=Service(driver))
    yield made
    made.quit()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shop")


@pytest.fixture(scope="module")
def shop(folder: Path) -> cabc.Iterator[servers.Server]:
    from example_app import create_app
    from example_app.db import init_db

    config = {
        "DATABASE": str(folder / "shop.sqlite"),
        "THREADCTX_TASK_STORE": f"sqlite:///{folder / 'tasks.db'}",
        "MONITOR_TOKEN": TOKEN,
        "REPORT_STEP_SECONDS": 1.0,  # four orders: the report runs four seconds
        "SECRET_KEY": "browser-test",
    }
    app = create_app(config)
    with app.app_context():
        init_db()
    app.extensions["threadctx"].shutdown()
    env = {f"FLASK_{key}": json.dumps(value) for key, value in config.items()}
    server = servers.start(
        "gunicorn-gthread",
        folder / "unused.sqlite",
        app="example_app:create_app()",
        environment=env,
    )
    yield server
    server.stop()


def post(url: str, body: t.Any = None) -> str:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return t.cast(str, json.load(response)["task"])


def test_the_monitor_in_a_browser(shop: servers.Server, browser: WebDriver, tmp_path: Path) -> None:
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.1)

    # Read and clicked through scripts, each in one go: the page redraws every second, and an
    # element found in one call may be gone in the next.
    def text(selector: str) -> str:
        script = "return document.querySelector(arguments[0])?.textContent ?? ''"
        return t.cast(str, browser.execute_script(script, selector))

    def texts(selector: str) -> list[str]:
        script = "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)"
        return t.cast("list[str]", browser.execute_script(script, selector))

    browser.get(f"{shop.url}/monitor/")
    assert "permission" in text("body")  # the 403's JSON, and nothing else
    assert texts("#tasks") == []

    browser.get(f"{shop.url}/staff/login?token={TOKEN}")
    assert browser.current_url == f"{shop.url}/monitor/"
    wait.until(lambda _: "store: SQLiteTaskStore" in text("#meta"))

    orders = [post(f"{shop.url}/orders", {"item": item}) for item in ("tea", "cake", "tea", "jam")]
    lamp = post(f"{shop.url}/orders", {"item": "lamp"})
    wait.until(lambda _: text("#count-succeeded b") == "8")  # four orders, four receipts
    report = post(f"{shop.url}/reports")

    row = f"#task-{report}"
    wait.until(lambda _: text(f"{row} .state") == "running" and "/ 4" in text(f"{row} .progress"))
    assert browser.execute_script(f"return document.querySelector('{row} progress').max") == 4
    wait.until(lambda _: text(f"{row} .state") == "succeeded")
    assert text(f"{row} .progress").strip() == "4 / 4 \u2013 counted tea"  # after the bar
    assert float(text(f"{row} .ran").removesuffix(" s")) >= 4.0  # four steps of a second

    failed = f"#task-{lamp}"
    wait.until(lambda _: text(f"{failed} .state") == "failed")
    assert text(f"{failed} .error") == "LookupError: 'lamp' is out of stock."
    assert text("#count-failed b") == "1"
    assert text("#count-succeeded b") == "9"
    assert texts("#chart rect title")  # a bar, with its count for a tooltip

    browser.execute_script(f"document.querySelector('#task-{orders[0]}').click()")
    wait.until(lambda _: "write_receipt" in text("#tree"))
    assert text("#detail-id") == orders[0]
    assert texts("#tree b") == ["record_order", "write_receipt"]
    # The docs' picture: 'THREADCTX_SAVE_SCREENSHOT=1 pytest tests/integration -k browser'.
    saved = SCREENSHOT if os.environ.get("THREADCTX_SAVE_SCREENSHOT") else tmp_path / "m.png"
    assert browser.save_screenshot(str(saved))


def test_the_shops_status_answers_whichever_process_is_asked(
    shop: servers.Server, folder: Path
) -> None:
    """After the browser test (the counts there start from nothing): the example's own status
    endpoint knows every order's task, whichever of the two gunicorn processes takes a poll
    (tests/integration/test_store_across_processes.py makes sure of a process that never saw
    the tasks)."""
    from flask_threadctx.sqlite_store import SQLiteTaskStore

    orders = [post(f"{shop.url}/orders", {"item": f"tea-{n}"}) for n in range(20)]
    # Until the store has every end: the process that ran a task knows of it first, and the
    # other reads it from the store up to a second later.
    store = SQLiteTaskStore(str(folder / "tasks.db"), "example_app", 1000)
    deadline = time.monotonic() + 60  # only so that a broken store cannot hang the test
    for task_id in orders:
        while (record := store.get(task_id)) is None or record.state != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.05)  # the store tells nobody when it was written
    answers = [
        servers.get_json(f"{shop.url}/tasks/{task_id}") for task_id in orders for _ in range(10)
    ]
    assert {(code, body["state"], body["name"]) for code, body in answers} == {
        (200, "succeeded", "record_order")
    }
    assert len(answers) == 200
