"""The ways people start threads in Flask, each with the contexts carried."""

from __future__ import annotations

import threading
import typing as t
from multiprocessing.dummy import Pool as DummyPool

import pytest
from flask import g
from flask import request
from flask_threadctx import ContextThread
from flask_threadctx import copy_current_context
from flask_threadctx import ThreadContext

if t.TYPE_CHECKING:
    from conftest import AppFactory

REPEAT = 50


def seen(n: int) -> tuple[int, str, str, str]:
    return n, request.path, request.args["user"], g.user


def test_closure_in_a_thread(make_app: AppFactory) -> None:
    app = make_app()
    out: list[t.Any] = []
    with app.test_request_context("/seed?user=ada"):
        g.user = "ada"

        def work() -> None:
            out.append(seen(1))

        thread = threading.Thread(target=copy_current_context(work))
        thread.start()
        thread.join()
    assert out == [(1, "/seed", "ada", "ada")]


def test_context_thread_target(make_app: AppFactory) -> None:
    app = make_app()
    out: list[t.Any] = []
    with app.test_request_context("/seed?user=ada"):
        g.user = "ada"
        thread = ContextThread(target=lambda: out.append(seen(2)))
        thread.start()
        thread.join()
    assert out == [(2, "/seed", "ada", "ada")]


def test_thread_subclass(make_app: AppFactory) -> None:
    app = make_app()

    class Worker(ContextThread):
        def __init__(self) -> None:
            super().__init__()
            self.out: t.Any = None

        def run(self) -> None:
            self.out = seen(3)
            super().run()  # runs no target, and does not enter the contexts twice

    with app.test_request_context("/seed?user=ada"):
        g.user = "ada"
        worker = Worker()
    worker.start()
    worker.join()
    assert worker.out == (3, "/seed", "ada", "ada")


def test_dummy_pool_map(make_app: AppFactory) -> None:
    app = make_app()
    with app.test_request_context("/seed?user=ada"):
        g.user = "ada"
        work = copy_current_context(seen)
        for _ in range(REPEAT):
            with DummyPool(3) as pool:
                assert pool.map(work, range(12)) == [(n, "/seed", "ada", "ada") for n in range(12)]


def test_pool_inside_a_thread(make_app: AppFactory) -> None:
    app = make_app()
    out: list[t.Any] = []

    def outer() -> None:
        g.user = "inner"  # the grandchildren see the thread's g, not the request's
        with DummyPool(3) as pool:
            out.extend(pool.map(copy_current_context(seen), range(6)))

    with app.test_request_context("/seed?user=ada"):
        g.user = "ada"
        for _ in range(REPEAT):
            out.clear()
            thread = ContextThread(target=outer)
            thread.start()
            thread.join()
            assert out == [(n, "/seed", "ada", "inner") for n in range(6)]
            assert g.user == "ada"


def test_submit_submit_submit(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    def third() -> t.Any:
        return seen(3)

    def second() -> t.Any:
        return ext.submit(third).result()

    def first() -> t.Any:
        return ext.submit(second).result()

    with app.test_request_context("/seed?user=ada"):
        g.user = "ada"
        for _ in range(REPEAT):
            assert ext.submit(first).result() == (3, "/seed", "ada", "ada")


def test_outside_any_context() -> None:
    with pytest.raises(RuntimeError, match="'copy_current_context' needs an application context"):
        copy_current_context(int)
    with pytest.raises(RuntimeError, match="'ContextThread' needs an application context"):
        ContextThread(target=int)


def test_exception_propagates_after_teardown(make_app: AppFactory) -> None:
    app = make_app()
    order: list[str] = []

    @app.teardown_appcontext
    def record(exc: BaseException | None) -> None:
        order.append(f"teardown {exc!r}")

    def fail() -> None:
        order.append("run")
        raise LookupError("x")

    with app.app_context():
        wrapped = copy_current_context(fail)
        with pytest.raises(LookupError):
            wrapped()
    assert order == ["run", "teardown LookupError('x')", "teardown None"]
