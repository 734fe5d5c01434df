"""The example shop's task monitor in a real headless Chromium, served by gunicorn with two
worker processes and a SQLite task store: tasks appear, show progress, finish; a failed one
shows its error, a long one cut short in its row; a click opens the task's details in view,
with its tree; the page fits a phone; what tasks say is shown as text, never run as HTML;
nobody signed out sees anything.

Needs Debian's ``chromium`` and ``chromium-driver``; ``.ci/run`` installs them, and with
``CI`` set their absence fails the test. Elsewhere it is skipped, saying why."""

from __future__ import annotations

import collections.abc as cabc
import json
import os
import signal
import subprocess
import sys
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from flask_threadctx.app_state import app_state

import servers
from chromium import chromium

ROOT = Path(__file__).parents[2]
SCREENSHOT = ROOT / "docs" / "_static" / "monitor.png"
TOKEN = "staff-only"
LONG = "lamp, the tall brass one with the green glass shade that the catalogue calls 'Aurora'"
HOSTILE_ERROR = '<img src=x onerror="window.pwned=1">'
HOSTILE_NOTE = "zz<img src=x onerror=window.pwned=2></script>"  # counted last: sorted by item

if t.TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver


@pytest.fixture(scope="module")
def browser() -> cabc.Iterator[WebDriver]:
    yield from chromium()


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
        "OUT_OF_STOCK": ["lamp", LONG, HOSTILE_ERROR],
    }
    app = create_app(config)
    with app.app_context():
        init_db()
    app_state(app).default.shutdown()
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


def test_the_monitor_in_a_browser(
    shop: servers.Server, browser: WebDriver, folder: Path, tmp_path: Path
) -> None:
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
    assert text("h1") == "Not allowed"  # a page that says what to do, and nothing else
    assert "Sign in to the app" in text("body")
    assert texts("#tasks") == []

    browser.get(f"{shop.url}/staff/login?token={TOKEN}")
    assert browser.current_url == f"{shop.url}/monitor/"
    wait.until(lambda _: f"tasks of SQLite {folder / 'tasks.db'}" in text("#meta"))

    items = ("tea", "cake", "tea", "jam", HOSTILE_NOTE)
    orders = [post(f"{shop.url}/orders", {"item": item}) for item in items]
    lamp = post(f"{shop.url}/orders", {"item": "lamp"})
    long = post(f"{shop.url}/orders", {"item": LONG})
    hostile = post(f"{shop.url}/orders", {"item": HOSTILE_ERROR})
    wait.until(lambda _: text("#count-succeeded b") == "10")  # five orders, five receipts
    report = post(f"{shop.url}/reports")

    row = f"#task-{report}"
    wait.until(lambda _: text(f"{row} .state") == "running" and "/ 5" in text(f"{row} .progress"))
    assert browser.execute_script(f"return document.querySelector('{row} progress').max") == 5
    wait.until(lambda _: text(f"{row} .state") == "succeeded")
    assert text(f"{row} .progress").strip() == f"5 / 5 \u2013 counted {HOSTILE_NOTE}"
    assert float(text(f"{row} .ran").removesuffix(" s")) >= 5.0  # five steps of a second

    failed = f"#task-{lamp}"
    wait.until(lambda _: text(f"#task-{hostile} .state") == "failed")
    assert text(f"{failed} .error") == "LookupError: 'lamp' is out of stock."
    assert text(f"#task-{hostile} .error") == f"LookupError: {HOSTILE_ERROR!r} is out of stock."
    # Shown as text: no element made of what the tasks said, no script of theirs run.
    assert browser.execute_script("return window.pwned") is None
    assert texts("#tasks img, #tasks script") == []
    assert text("#count-failed b") == "3"
    assert text("#count-succeeded b") == "11"
    assert_chart_has_a_scale(browser)

    # A long error is cut short in its row, whole in its tooltip: every row keeps one line.
    long_error = f"LookupError: {LONG!r} is out of stock."
    cell = browser.execute_script(
        """const cell = document.querySelector(arguments[0]);
        return [cell.textContent, cell.title, cell.scrollWidth > cell.clientWidth,
                getComputedStyle(cell).textOverflow];""",
        f"#task-{long} .error",
    )
    assert cell == [long_error, long_error, True, "ellipsis"]
    assert one_line_each(browser)
    assert fits(browser)

    # Clicked at the bottom of the page, the details open in view, and the URL knows them.
    clicked = orders[0]
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    browser.execute_script(f"document.querySelector('#task-{clicked}').click()")
    wait.until(lambda _: "write_receipt" in text("#tree"))
    assert text("#detail-id") == clicked
    assert texts("#tree b") == ["record_order", "write_receipt"]
    assert browser.current_url == f"{shop.url}/monitor/#task={clicked}"
    assert in_view(browser, "#detail")
    browser.execute_script(f"document.querySelector('#task-{long}').click()")
    wait.until(lambda _: long_error in texts("#facts dd"))  # whole, where there is room
    assert text("#detail-id") == long
    assert one_line_each(browser) and fits(browser)
    assert browser.save_screenshot(str(tmp_path / "monitor.png"))
    browser.back()  # one step back closes the panel, whichever tasks were shown in it
    wait.until(lambda _: browser.execute_script("return document.querySelector('#detail').hidden"))
    assert browser.current_url == f"{shop.url}/monitor/"

    # A phone: nothing wider than the screen, the chart whole, the details in view.
    browser.set_window_size(420, 900)
    try:
        assert browser.execute_script("return window.innerWidth") <= 420
        wait.until(lambda _: fits(browser))
        assert in_view(browser, "#chart")
        assert one_line_each(browser)
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        browser.execute_script(f"document.querySelector('#task-{lamp}').click()")
        wait.until(lambda _: "'lamp' is out of stock" in text("#facts"))
        assert text("#detail-id") == lamp
        assert in_view(browser, "#detail") and fits(browser)
    finally:
        browser.set_window_size(1400, 1000)


def fits(browser: WebDriver) -> bool:
    """Whether the page is no wider than the window: nothing to scroll sideways."""
    return t.cast(
        bool,
        browser.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"
            " && [...document.querySelectorAll('.rows')].every("
            " e => e.scrollWidth <= e.clientWidth)"
        ),
    )


def one_line_each(browser: WebDriver) -> bool:
    """Whether every row of the task list is as high as the others: one line each."""
    heights = browser.execute_script(
        "return [...document.querySelectorAll('tr.task')].map(r => r.offsetHeight)"
    )
    return len(heights) > 1 and len(set(heights)) == 1


def in_view(browser: WebDriver, selector: str) -> bool:
    """Whether the element is the one seen at the middle of its box, inside the window."""
    return t.cast(
        bool,
        browser.execute_script(
            """const element = document.querySelector(arguments[0]);
            const box = element.getBoundingClientRect();
            const x = (box.left + box.right) / 2, y = (box.top + Math.min(box.bottom,
                window.innerHeight)) / 2;
            return box.top >= 0 && box.left >= 0 && box.right <= window.innerWidth
                && box.top < window.innerHeight && box.width > 0
                && element.contains(document.elementFromPoint(x, y));""",
            selector,
        ),
    )


def assert_chart_has_a_scale(browser: WebDriver) -> None:
    """The top of the scale is the tallest bar's count rounded up to 1, 2 or 5 times a power
    of ten, and half of it is marked."""
    bars: dict[str, int] = {}
    for title in browser.execute_script(
        "return [...document.querySelectorAll('#chart rect title')].map(e => e.textContent)"
    ):
        at, _, count = title.rpartition(": ")
        bars[at] = bars.get(at, 0) + int(count.split()[0])
    assert bars  # a bar, with its count for a tooltip
    tallest = max(bars.values())
    top = min(n * 10**p for p in range(4) for n in (1, 2, 5) if n * 10**p >= tallest)
    scale = browser.execute_script(
        "return [...document.querySelectorAll('.scale span')].map(e => e.textContent)"
    )
    assert scale == [str(top), f"{top / 2:g}", "0"]


def test_the_shops_status_answers_whichever_process_is_asked(
    shop: servers.Server, folder: Path
) -> None:
    """After the browser test (the counts there start from nothing): the example's own status
    endpoint knows every order's task, whichever of the two gunicorn processes takes a poll
    (tests/integration/test_store_across_processes.py makes sure of a process that never saw
    the tasks)."""
    from flask_threadctx.stores.sqlite import SQLiteTaskStore

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


OUT_OF_STOCK = [
    "standing desk, oak veneer, 160 x 80 cm, with the cable tray and the memory keypad",
    "espresso machine, dual boiler, with the steam wand that the reviews keep mentioning",
]


@pytest.fixture(scope="module")
def celery_shop(tmp_path_factory: pytest.TempPathFactory) -> cabc.Iterator[servers.Server]:
    """The shop on Celery, as the README runs it: a Redis, a worker with two processes, and
    gunicorn with two."""
    sys.path.insert(0, str(ROOT / "tests" / "on_celery"))
    from redis_server import RedisServer

    folder = tmp_path_factory.mktemp("celery-shop")
    redis = RedisServer(folder)
    redis.start()
    config = {
        "DATABASE": str(folder / "shop.sqlite"),
        "MONITOR_TOKEN": TOKEN,
        "REPORT_STEP_SECONDS": 2.0,
        "SECRET_KEY": "browser-test",
        "OUT_OF_STOCK": ["lamp", *OUT_OF_STOCK],
        "THREADCTX_BACKEND": "celery",
        "REDIS_URL": redis.url,
    }
    from example_app import create_app
    from example_app.db import init_db

    app = create_app(config)
    with app.app_context():
        init_db()
    app_state(app).default.shutdown()
    env = {f"FLASK_{key}": json.dumps(value) for key, value in config.items()}
    environ = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[:1]])}
    with open(folder / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "example_app", "threadctx", "worker",
             "--pool", "prefork", "--concurrency", "2", "--without-mingle", "--without-gossip"],
            env=environ, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = servers.start(
        "gunicorn-gthread", folder / "unused.sqlite", app="example_app:create_app()",
        environment=env,
    )  # fmt: skip
    yield server
    server.stop()
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(60)
    redis.stop()


def test_the_docs_picture_on_celery(celery_shop: servers.Server, browser: WebDriver) -> None:
    """A realistic page for docs/monitoring.rst: Celery's ids, long errors, a report on its
    way, and the details of a failed task; all still one line a row, nothing too wide.
    'THREADCTX_SAVE_SCREENSHOT=1 pytest tests/integration -k docs_picture' saves it."""
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, 90, poll_frequency=0.1)

    def text(selector: str) -> str:
        script = "return document.querySelector(arguments[0])?.textContent ?? ''"
        return t.cast(str, browser.execute_script(script, selector))

    url = celery_shop.url
    browser.set_window_size(1400, 1000)
    browser.get(f"{url}/staff/login?token={TOKEN}")
    orders = [
        post(f"{url}/orders", {"item": item, "quantity": quantity})
        for item, quantity in [("tea", 2), ("cake", 1), ("jam", 3), ("tea", 1), ("scones", 6)]
    ]
    lost = [post(f"{url}/orders", {"item": item}) for item in OUT_OF_STOCK]
    wait.until(lambda _: text("#count-succeeded b") == "10")
    report = post(f"{url}/reports")
    for task_id in (*orders, *lost, report):
        assert len(task_id) == 36  # a Celery id
    wait.until(lambda _: text(f"#task-{lost[0]} .state") == "failed")
    browser.execute_script(f"document.querySelector('#task-{lost[0]}').click()")
    wait.until(lambda _: "out of stock" in text("#facts"))
    wait.until(lambda _: text(f"#task-{report} .progress").strip().startswith("2 / 5"))
    assert "tasks of Redis redis://127.0.0.1:" in text("#meta")
    assert "(Celery records)" in text("#meta")
    assert one_line_each(browser) and fits(browser) and in_view(browser, "#detail")
    assert text(f"#task-{lost[0]} .error") == f"LookupError: {OUT_OF_STOCK[0]!r} is out of stock."
    browser.execute_script("window.scrollTo(0, 0)")
    saved = SCREENSHOT if os.environ.get("THREADCTX_SAVE_SCREENSHOT") else None
    if saved is not None:
        assert browser.save_screenshot(str(saved))


def test_a_hostile_proxy_prefix_stays_data_in_the_browser(
    browser: WebDriver, tmp_path: Path
) -> None:
    """What a proxy's 'X-Forwarded-Prefix' says (under ProxyFix) reaches the page's script as
    a string: nothing of it runs (tests/test_monitor.py checks the served HTML)."""
    import base64

    import flask
    from flask_threadctx import ThreadContext
    from werkzeug.middleware.proxy_fix import ProxyFix

    hostile = '/p";window.pwned=1;"</script><script>window.pwned=2</script><!--'
    app = flask.Flask("proxied", instance_path=str(tmp_path))
    app.config.update(TESTING=True)
    ext = ThreadContext(app)
    app.register_blueprint(ext.monitor(), url_prefix="/m")
    app.wsgi_app = ProxyFix(app.wsgi_app, x_prefix=1)  # type: ignore[method-assign]
    html = app.test_client().get("/m/", headers={"X-Forwarded-Prefix": hostile}).data
    app_state(app).default.shutdown()
    browser.get("data:text/html;base64," + base64.b64encode(html).decode())
    assert browser.execute_script("return API") == hostile + "/m/api"
    assert browser.execute_script("return window.pwned") is None
    assert browser.execute_script("return document.scripts.length") == 1
