"""The example shop, tested the way its users would test theirs: through the client, with the
fixtures of Flask-ThreadCtx's pytest plugin (``threadctx``, ``wait_for_tasks``)."""

from __future__ import annotations

import re
import threading
import time
import typing as t

import pytest

if t.TYPE_CHECKING:
    import flask
    from flask.testing import FlaskClient
    from flask_threadctx import ThreadContext
    from flask_threadctx.testing import WaitForTasks


def test_order_is_recorded_by_a_task_and_its_child(
    client: FlaskClient, threadctx: ThreadContext
) -> None:
    response = client.post(
        "/orders", json={"item": "tea", "quantity": 2}, headers={"X-User": "ada"}
    )
    assert response.status_code == 202
    task_id = response.json["task"]  # type: ignore[index]
    assert response.headers["Location"] == f"/tasks/{task_id}"
    future = threadctx.get_task(task_id)
    assert future is not None
    assert future.result(timeout=10) == {"order": 1, "receipt": "ada ordered 2 x tea"}

    status = client.get(f"/tasks/{task_id}").json
    assert status == {
        "id": task_id,
        "name": "record_order",
        "state": "succeeded",
        "parent_id": None,
        "request": "POST /orders",
        "result": {"order": 1, "receipt": "ada ordered 2 x tea"},
    }
    orders = client.get("/orders").json["orders"]  # type: ignore[index]
    assert len(orders) == 1
    order = orders[0]
    assert {
        k: order[k] for k in ("id", "task_id", "user", "item", "quantity", "request", "receipt")
    } == {
        "id": 1,
        "task_id": task_id,
        "user": "ada",
        "item": "tea",
        "quantity": 2,
        "request": "POST /orders",
        "receipt": "ada ordered 2 x tea",
    }


@pytest.mark.threadctx_eager
def test_order_in_eager_mode(client: FlaskClient, threadctx: ThreadContext) -> None:
    task_id = client.post("/orders", json={"item": "tea"}).json["task"]  # type: ignore[index]
    future = threadctx.get_task(task_id)
    assert future is not None and future.done()  # ran before the view returned
    assert future.result() == {"order": 1, "receipt": "guest ordered 1 x tea"}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("tea", "The body must be a JSON object."),
        ({"quantity": 2}, "'item' must be a non-empty string."),
        ({"item": "  "}, "'item' must be a non-empty string."),
        (
            {"item": "tea", "quantity": "abc"},
            "'quantity' must be a whole number from 1 to 1000, not 'abc'.",
        ),
        (
            {"item": "tea", "quantity": None},
            "'quantity' must be a whole number from 1 to 1000, not None.",
        ),
        (
            {"item": "tea", "quantity": -5},
            "'quantity' must be a whole number from 1 to 1000, not -5.",
        ),
        (
            {"item": "tea", "quantity": 1.9},
            "'quantity' must be a whole number from 1 to 1000, not 1.9.",
        ),
        (
            {"item": "tea", "quantity": 10**26},
            "'quantity' must be a whole number from 1 to 1000, not 100000000000000000000000000.",
        ),
        (
            {"item": "tea", "quantity": 1001},
            "'quantity' must be a whole number from 1 to 1000, not 1001.",
        ),
        (
            {"item": "tea", "quantity": 10**100},
            f"'quantity' must be a whole number from 1 to 1000, not {'1' + '0' * 39}...",
        ),
        (
            {"item": "t" * 100 * 1024},
            "'item' must be at most 100 characters long, not 102400.",
        ),
        (
            # A lone surrogate ("\udce9" in the JSON): SQLite, which stores UTF-8, would refuse it.
            {"item": "caf\udce9"},
            "'item' must be text that UTF-8 can carry, not 'caf\\udce9': character 3 is a lone"
            " surrogate.",
        ),
        (
            {"item": "tea", "quantity": True},
            "'quantity' must be a whole number from 1 to 1000, not True.",
        ),
    ],
)
def test_bad_orders_are_refused_at_the_view_in_json(
    client: FlaskClient, threadctx: ThreadContext, body: t.Any, error: str
) -> None:
    submitted = threadctx.stats()["submitted"]
    if isinstance(body, str):
        response = client.post("/orders", data=body)
    else:
        response = client.post("/orders", json=body)
    assert response.status_code == 400
    assert response.json is not None and response.json["error"].startswith(error)
    assert threadctx.stats()["submitted"] == submitted


def test_unknown_task_and_unknown_page_answer_json(client: FlaskClient) -> None:
    response = client.get("/tasks/nope")
    assert (response.status_code, response.json) == (
        404,
        {"error": "No such task, or it finished long ago."},
    )
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json is not None and "not found" in response.json["error"]


@pytest.mark.parametrize("backend", ["threads"])  # a bound of the thread pool
@pytest.mark.app_config(THREADCTX_MAX_WORKERS=1, THREADCTX_MAX_QUEUE=2)
def test_queue_full_answers_503(client: FlaskClient, threadctx: ThreadContext) -> None:
    gate = threading.Event()
    started = threading.Event()

    def block() -> bool:
        started.set()
        return gate.wait(10)

    try:
        blocker = threadctx.submit(block)
        started.wait(10)
        queued = [threadctx.submit(int) for _ in range(2)]
        response = client.post("/orders", json={"item": "tea"})
        assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
        assert response.json == {"error": "Too busy, try again shortly."}
        gate.set()
        assert (blocker.result(), [f.result() for f in queued]) == (True, [0, 0])
    finally:
        gate.set()


@pytest.mark.parametrize("backend", ["threads"])  # a bound of the thread pool
@pytest.mark.app_config(THREADCTX_MAX_WORKERS=1, THREADCTX_MAX_QUEUE=2)
def test_a_burst_loses_no_accepted_order(
    app: flask.Flask, threadctx: ThreadContext, wait_for_tasks: WaitForTasks
) -> None:
    """Under a burst some orders are refused with 503, but every order that was accepted is
    recorded with its receipt: the receipt task is a child of accepted work, which the queue's
    bound does not refuse."""
    answers: list[int] = []

    def customer(n: int) -> None:
        client = app.test_client()
        for i in range(25):
            response = client.post("/orders", json={"item": f"tea {n}-{i}"})
            answers.append(response.status_code)

    customers = [threading.Thread(target=customer, args=(n,)) for n in range(8)]
    for thread in customers:
        thread.start()
    for thread in customers:
        thread.join()
    wait_for_tasks(30)
    orders = app.test_client().get("/orders").json["orders"]  # type: ignore[index]
    accepted = answers.count(202)
    assert sorted(set(answers)) in ([202], [202, 503])
    assert answers.count(503) == len(answers) - accepted
    assert len(orders) == accepted
    assert [order["receipt"] for order in orders] == [
        f"guest ordered 1 x {order['item']}" for order in orders
    ]
    stats = threadctx.stats()
    assert (stats["succeeded"], stats["failed"], stats["rejected"]) == (
        2 * accepted,
        0,
        answers.count(503),
    )


def test_many_users_at_once(app: flask.Flask, threadctx: ThreadContext) -> None:
    results: dict[str, t.Any] = {}

    def user(n: int) -> None:
        client = app.test_client()
        for i in range(10):
            name = f"user{n}-{i}"
            response = client.post("/orders", json={"item": name}, headers={"X-User": name})
            results[name] = response.json["task"]  # type: ignore[index]

    threads = [threading.Thread(target=user, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    receipts = {}
    for name, task_id in results.items():
        future = threadctx.get_task(task_id)
        assert future is not None
        receipts[name] = future.result(timeout=10)["receipt"]
    assert receipts == {name: f"{name} ordered 1 x {name}" for name in results}


def test_a_report_says_how_far_it_got(client: FlaskClient, threadctx: ThreadContext) -> None:
    for item, quantity in [("tea", 2), ("cake", 1), ("tea", 3)]:
        task_id = client.post("/orders", json={"item": item, "quantity": quantity}).json["task"]  # type: ignore[index]
        future = threadctx.get_task(task_id)
        assert future is not None
        future.result(timeout=30)
    response = client.post("/reports")
    assert response.status_code == 202
    report = threadctx.get_task(response.json["task"])  # type: ignore[index]
    assert report is not None
    assert report.result(timeout=30) == {"tea": 5, "cake": 1}
    status = client.get(response.headers["Location"]).json
    assert status is not None
    assert (status["state"], status["progress"], status["result"]) == (
        "succeeded",
        {"done": 3, "total": 3, "note": "counted tea"},
        {"tea": 5, "cake": 1},
    )


def test_the_monitor_is_for_staff_only(client: FlaskClient, threadctx: ThreadContext) -> None:
    task_id = client.post("/orders", json={"item": "tea"}).json["task"]  # type: ignore[index]
    future = threadctx.get_task(task_id)
    assert future is not None
    future.result(timeout=30)
    for path in ("/monitor/", "/monitor/api/stats", "/monitor/api/tasks"):
        response = client.get(path)
        assert response.status_code == 403
        assert task_id not in response.text
    assert client.get("/staff/login?token=wrong").status_code == 403
    response = client.get("/staff/login?token=staff-only")
    assert (response.status_code, response.headers["Location"]) == (302, "/monitor/")
    assert 'const API = "/monitor/api";' in client.get("/monitor/").text
    # Newest first; on Celery, the deployment (and its store) serves every test.
    listed = client.get("/monitor/api/tasks?name=record_order&limit=1").json
    assert listed is not None
    assert [(t["id"], t["state"], t["request"]) for t in listed["tasks"]] == [
        (task_id, "succeeded", "POST /orders")
    ]
    # On Celery, the worker's own writer adds the child's record in the background: visible
    # within a second. The deadline only keeps a broken store from hanging the test.
    deadline = time.monotonic() + 30
    while not (tree := client.get(f"/monitor/api/tasks/{task_id}").json or {}).get("children"):
        assert time.monotonic() < deadline, tree
    assert [child["name"] for child in tree["children"]] == ["write_receipt"]
    # Staff may stop a task (this one had finished), never re-run an order.
    token = re.search('const TOKEN = "([0-9a-f]+)";', client.get("/monitor/").text)
    assert token is not None
    headers = {"X-CSRF-Token": token.group(1)}
    stop = client.post(f"/monitor/api/tasks/{task_id}/stop", headers=headers)
    assert (stop.status_code, stop.json) == (200, {"stopped": False})
    assert client.post(f"/monitor/api/tasks/{task_id}/rerun", headers=headers).status_code == 403


def test_an_order_out_of_stock_fails_in_its_task(
    client: FlaskClient, threadctx: ThreadContext
) -> None:
    task_id = client.post("/orders", json={"item": "lamp"}).json["task"]  # type: ignore[index]
    future = threadctx.get_task(task_id)
    assert future is not None
    with pytest.raises(LookupError, match=r"'lamp' is out of stock\."):
        future.result(timeout=30)
    status = client.get(f"/tasks/{task_id}").json
    assert status is not None
    assert (status["state"], status["error"]) == (
        "failed",
        "LookupError(\"'lamp' is out of stock.\")",
    )
    assert client.get("/orders").json == {"orders": []}


def test_orders_at_the_bounds_are_taken(client: FlaskClient, wait_for_tasks: WaitForTasks) -> None:
    response = client.post("/orders", json={"item": "t" * 100, "quantity": 1000})
    assert response.status_code == 202
    wait_for_tasks()
    (order,) = client.get("/orders").json["orders"]  # type: ignore[index]
    assert (order["item"], order["quantity"]) == ("t" * 100, 1000)
