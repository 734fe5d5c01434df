from __future__ import annotations

import threading
import typing as t

from example_app import create_app
from example_app import threadctx

if t.TYPE_CHECKING:
    from pathlib import Path

    import flask
    from flask.testing import FlaskClient


def _wait(app: flask.Flask, task_id: str) -> t.Any:
    with app.app_context():
        future = threadctx.get_task(task_id)
        assert future is not None
        return future.result(timeout=10)


def test_order_is_recorded_by_a_task_and_its_child(app: flask.Flask, client: FlaskClient) -> None:
    response = client.post(
        "/orders", json={"item": "tea", "quantity": 2}, headers={"X-User": "ada"}
    )
    assert response.status_code == 202
    task_id = response.json["task"]  # type: ignore[index]
    assert response.headers["Location"] == f"/tasks/{task_id}"
    assert _wait(app, task_id) == {"order": 1, "receipt": "ada ordered 2 x tea"}

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


def test_bad_order(client: FlaskClient) -> None:
    assert client.post("/orders", data="tea").status_code == 400


def test_unknown_task(client: FlaskClient) -> None:
    assert client.get("/tasks/nope").status_code == 404


def test_queue_full_answers_503(tmp_path: Path) -> None:
    app = create_app(
        {
            "TESTING": True,
            "DATABASE": str(tmp_path / "busy.sqlite"),
            "THREADCTX_MAX_WORKERS": 1,
            "THREADCTX_MAX_QUEUE": 2,
        }
    )
    gate = threading.Event()
    started = threading.Event()

    def block() -> bool:
        started.set()
        return gate.wait(10)

    try:
        with app.app_context():
            blocker = threadctx.submit(block)
            started.wait(10)
            queued = [threadctx.submit(int) for _ in range(2)]
        response = app.test_client().post("/orders", json={"item": "tea"})
        assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
        assert response.json == {"error": "Too busy, try again shortly."}
        gate.set()
        assert (blocker.result(), [f.result() for f in queued]) == (True, [0, 0])
    finally:
        gate.set()
        app.extensions["threadctx"].shutdown(wait=True)


def test_many_users_at_once(app: flask.Flask) -> None:
    results: dict[str, t.Any] = {}

    def user(n: int) -> None:
        client = app.test_client()
        for i in range(10):
            name = f"user{n}-{i}"
            task_id = client.post("/orders", json={"item": name}, headers={"X-User": name}).json[
                "task"
            ]  # type: ignore[index]
            results[name] = task_id

    threads = [threading.Thread(target=user, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    receipts = {name: _wait(app, task_id)["receipt"] for name, task_id in results.items()}
    assert receipts == {name: f"{name} ordered 1 x {name}" for name in results}
