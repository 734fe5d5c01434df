"""The monitor's actions in a real headless Chromium, against gunicorn serving
actions_app.py with a SQLite task store: a user whom ``check_action`` allows clicks Stop on a
running task and it ends cancelled, and Re-run on a finished rerunnable task, whose new task
the page links both ways; a POST without the CSRF token, or with a wrong one, is
refused; a user whom ``check_action`` refuses sees no button, and a POST with a valid token gets
403; each attempt is one audit line in the server's output. One gunicorn process: a thread task
is stopped by the process that runs it (see docs/control.rst)."""

from __future__ import annotations

import collections.abc as cabc
import json
import typing as t
import urllib.request

import pytest

import servers
from chromium import chromium

if t.TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver


@pytest.fixture(scope="module")
def browser() -> cabc.Iterator[WebDriver]:
    yield from chromium()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> cabc.Iterator[servers.Server]:
    folder = tmp_path_factory.mktemp("actions")
    started = servers.start(
        "gunicorn-gthread",
        folder / "unused.sqlite",
        workers=1,
        app="actions_app:create_app()",
        environment={"ACTIONS_STORE": str(folder / "tasks.db")},
    )
    yield started
    started.stop()


def submit(url: str) -> str:
    request = urllib.request.Request(url, b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return t.cast(str, json.load(response)["task"])


def audit_lines(server: servers.Server) -> list[str]:
    return [line.removeprefix("AUDIT ").rstrip("\n") for line in server.output
            if line.startswith("AUDIT ")]  # fmt: skip


class Page:
    """The monitor page in the browser, read and clicked through scripts, each in one go: the
    page redraws every second, and an element found in one call may be gone in the next."""

    def __init__(self, browser: WebDriver) -> None:
        from selenium.webdriver.support.wait import WebDriverWait

        self.browser = browser
        self.wait = WebDriverWait(browser, 60, poll_frequency=0.1)

    def text(self, selector: str) -> str:
        script = "return document.querySelector(arguments[0])?.textContent ?? ''"
        return t.cast(str, self.browser.execute_script(script, selector))

    def texts(self, selector: str) -> list[str]:
        script = "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)"
        return t.cast("list[str]", self.browser.execute_script(script, selector))

    def click(self, selector: str) -> None:
        self.browser.execute_script("document.querySelector(arguments[0]).click()", selector)

    def post(self, task_id: str, action: str, token: str | None) -> list[t.Any]:
        """The status and JSON of a POST from the page's own script, with its session's cookie
        and the token given (none for ``None``)."""
        return t.cast(
            "list[t.Any]",
            self.browser.execute_async_script(
                """const [id, action, token, done] = arguments;
                const headers = token === null ? {} : {"X-CSRF-Token": token};
                fetch(API + "/tasks/" + encodeURIComponent(id) + "/" + action,
                      {method: "POST", headers: headers})
                  .then(r => r.json().then(body => done([r.status, body])));""",
                task_id,
                action,
                token,
            ),
        )

    def task(self, task_id: str) -> dict[str, t.Any]:
        """The task's details, as the page's script gets them."""
        return t.cast(
            "dict[str, t.Any]",
            self.browser.execute_async_script(
                "const [id, done] = arguments;"
                " getJSON('/tasks/' + encodeURIComponent(id)).then(done);",
                task_id,
            ),
        )

    def state(self, task_id: str) -> str:
        return self.text(f"#task-{task_id} .state")


def test_stop_for_an_allowed_user_and_refusals_for_others(
    server: servers.Server, browser: WebDriver
) -> None:
    url = server.url
    page = Page(browser)
    before = len(audit_lines(server))
    browser.delete_all_cookies()
    browser.get(f"{url}/login/ops")
    assert browser.current_url == f"{url}/monitor/"
    token = browser.execute_script("return TOKEN")
    assert isinstance(token, str) and len(token) == 64

    feed = submit(f"{url}/feeds")
    page.wait.until(lambda _: page.state(feed) == "running")
    # Without the token, or with a wrong one: refused, nothing done.
    assert page.post(feed, "stop", None) == [
        403,
        {
            "error": "Missing or wrong CSRF token: send the 'X-CSRF-Token' header the monitor's"
            " page sends (reload the page if the session changed)."
        },
    ]
    assert page.post(feed, "stop", "0" * 64)[0] == 403
    assert page.post(feed, "stop", token.upper())[0] == 403
    assert page.task(feed)["state"] == "running"

    # The allowed user opens the task's panel, clicks Stop, and the task ends cancelled.
    page.click(f"#task-{feed}")
    page.wait.until(lambda _: page.texts("#actions button") == ["Stop"])
    page.click("#action-stop")
    page.wait.until(lambda _: page.text("#outcome") != "")
    assert page.text("#outcome") == "Stop asked: the task stops at its next check."
    page.wait.until(lambda _: page.state(feed) == "cancelled")
    assert "cancelled" in page.texts("#facts dd")
    # Finished, and not rerunnable: no button left; Stop again is answered, not an error.
    page.wait.until(lambda _: page.texts("#actions button") == [])
    assert page.post(feed, "stop", token) == [200, {"stopped": False}]

    # Re-run of a finished rerunnable task: a new task, linked to it both ways on the page.
    counted = submit(f"{url}/counts")
    page.wait.until(lambda _: page.state(counted) == "succeeded")
    page.click(f"#task-{counted}")
    page.wait.until(lambda _: page.texts("#actions button") == ["Re-run"])
    page.click("#action-rerun")
    page.wait.until(lambda _: page.text("#outcome") != "")
    new = page.text("#outcome a")
    assert page.text("#outcome") == f"Re-run as task {new}."
    page.wait.until(lambda _: page.state(new) == "succeeded")
    page.click("#outcome a")
    page.wait.until(lambda _: page.text("#detail-id") == new and "Re-run of" in page.text("#facts"))
    assert page.text("#facts dd a") == counted
    assert browser.current_url == f"{url}/monitor/#task={new}"

    # A user whom check_action refuses: the page and the token, but no button, and a 403.
    other = submit(f"{url}/feeds")
    browser.delete_all_cookies()
    browser.get(f"{url}/login/viewer")
    viewer_token = browser.execute_script("return TOKEN")
    assert isinstance(viewer_token, str) and viewer_token != token
    browser.get(f"{url}/monitor/#task={other}")
    page.wait.until(lambda _: "running" in page.texts("#facts dd"))
    assert page.texts("#actions button") == []
    assert page.task(other)["actions"] == []
    assert page.post(other, "stop", viewer_token) == [
        403,
        {"error": "This request may not stop tasks."},
    ]
    assert page.post(other, "stop", token)[0] == 403  # the token of another session
    assert page.task(other)["state"] == "running"

    # The allowed user again, to end it; the audit has every attempt, in order.
    browser.delete_all_cookies()
    browser.get(f"{url}/login/ops")
    token = browser.execute_script("return TOKEN")
    assert page.post(other, "stop", token) == [200, {"stopped": True}]
    addr = 'remote_addr="127.0.0.1"'
    page.wait.until(lambda _: len(audit_lines(server)) == before + 9)
    assert [line.partition(" reason=")[0] for line in audit_lines(server)[before:]] == [
        f'action=stop task_id="{feed}" outcome=bad_token status=403 {addr}',
        f'action=stop task_id="{feed}" outcome=bad_token status=403 {addr}',
        f'action=stop task_id="{feed}" outcome=bad_token status=403 {addr}',
        f'action=stop task_id="{feed}" outcome=stopped status=200 {addr}',
        f'action=stop task_id="{feed}" outcome=already_finished status=200 {addr}',
        f'action=rerun task_id="{counted}" outcome=rerun status=201 {addr} new_task_id="{new}"',
        f'action=stop task_id="{other}" outcome=refused status=403 {addr}',
        f'action=stop task_id="{other}" outcome=bad_token status=403 {addr}',
        f'action=stop task_id="{other}" outcome=stopped status=200 {addr}',
    ]


HOSTILE_ID = '<img src=x onerror="window.pwned=1">'


def test_another_site_can_neither_read_the_token_nor_act(
    server: servers.Server, browser: WebDriver
) -> None:
    """A page of another origin, in the same browser as a signed-in user: it cannot read the
    monitor's page (so not its token), and its POST, which the browser sends as a form would,
    is refused and does nothing. And an error that holds HTML reaches the panel as text."""
    url = server.url
    page = Page(browser)
    browser.delete_all_cookies()
    browser.get(f"{url}/login/ops")
    feed = submit(f"{url}/feeds")
    page.wait.until(lambda _: page.state(feed) == "running")
    before = len(audit_lines(server))

    # Another origin (and site): the same server by another name, in the same address space.
    browser.get(f"http://localhost:{server.port}/another-site")
    read = browser.execute_async_script(
        """const [url, done] = arguments;
        fetch(url + "/monitor/", {credentials: "include"})
          .then(r => r.text()).then(text => done("read " + text.length))
          .catch(error => done("blocked: " + error.name));""",
        url,
    )
    assert read == "blocked: TypeError"  # CORS: the app grants no other origin a read
    sent = browser.execute_async_script(
        """const [url, id, done] = arguments;
        fetch(url + "/monitor/api/tasks/" + id + "/stop",
              {method: "POST", mode: "no-cors", credentials: "include"})
          .then(r => done(r.type)).catch(error => done("failed: " + error.name));""",
        url,
        feed,
    )
    assert sent == "opaque"  # sent, its answer unreadable
    page.wait.until(lambda _: len(audit_lines(server)) == before + 1)
    # Chromium sends no session cookie with it (SameSite is Lax by default), so check_access
    # refuses; a browser that sent it would meet the token check (tests/test_monitor_actions.py).
    assert audit_lines(server)[before:] == [
        f'action=stop task_id="{feed}" outcome=denied status=403 remote_addr="127.0.0.1"'
        ' reason="This request may not see the tasks."'
    ]

    browser.get(f"{url}/monitor/")
    assert page.task(feed)["state"] == "running"  # nothing was done

    # What an answer says is shown as text: an id that is HTML, through the page's own action.
    browser.get(f"{url}/monitor/#task={HOSTILE_ID}")
    page.wait.until(lambda _: page.text("#detail-id") == HOSTILE_ID)
    browser.execute_script("act('stop', arguments[0], el('button'))", HOSTILE_ID)
    page.wait.until(lambda _: page.text("#outcome") != "")
    assert page.text("#outcome") == (
        f"Stop refused: No task {HOSTILE_ID!r} of 'actions' is known here: not among its"
        " pending, running or last finished tasks, nor in its task store."
    )
    assert browser.execute_script("return window.pwned") is None
    assert page.texts("#detail img") == []

    token = browser.execute_script("return TOKEN")
    assert page.post(feed, "stop", token) == [200, {"stopped": True}]
    page.wait.until(lambda _: page.task(feed)["state"] == "cancelled")
