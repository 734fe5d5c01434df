"""Tasks that submit and wait for tasks: depth, coroutines, timeouts, the bounded queue, and
shutdown from inside a task."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import typing as t

import pytest
from flask_threadctx import ContextThread
from flask_threadctx import current_task
from flask_threadctx import QueueFull
from flask_threadctx import ThreadContext
from flask_threadctx.backends.workers import MAX_INLINE_DEPTH

if t.TYPE_CHECKING:
    from conftest import AppFactory

REPEAT = 20


@pytest.mark.parametrize("depth", [MAX_INLINE_DEPTH - 1, MAX_INLINE_DEPTH + 1, 200, 500])
def test_a_chain_of_waits_of_any_depth_on_one_worker(
    make_app: AppFactory, ext: ThreadContext, depth: int
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    links: list[tuple[str, str | None]] = []

    def link(level: int) -> int:
        task = current_task()
        assert task is not None
        links.append((task.id, task.parent_id))
        if level == depth:
            return level
        return ext.submit(link, level + 1).result()

    with app.app_context():
        top = ext.submit(link, 1)
        assert top.result(timeout=60) == depth
        stats = ext.stats()
    # One task per level, each the child of the one before.
    assert [parent for _, parent in links] == [None] + [task for task, _ in links[:-1]]
    assert (stats["submitted"], stats["succeeded"], stats["running"], stats["queued"]) == (
        depth,
        depth,
        0,
        0,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_coroutine_task_awaiting_its_children(
    make_app: AppFactory, ext: ThreadContext, workers: int
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=workers)

    def square(n: int) -> int:
        return n * n

    async def parent(levels: int) -> list[int]:
        children = [asyncio.wrap_future(ext.submit(square, n)) for n in range(3)]
        results = list(await asyncio.gather(*children))
        if levels:
            results += await asyncio.wrap_future(ext.submit(parent, levels - 1))
        return results

    with app.app_context():
        futures = [ext.submit(parent, 2) for _ in range(REPEAT)]
        results = [f.result(timeout=60) for f in futures]
    assert results == [[0, 1, 4] * 3] * REPEAT


def test_a_timed_wait_in_a_task_times_out_like_the_stdlib_pool(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    lock = threading.Lock()

    def child() -> str:
        with lock:
            return "child ran"

    def parent() -> tuple[bool, concurrent.futures.Future[str]]:
        with lock:
            future = ext.submit(child)
            try:
                future.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                return True, future
            return False, future

    with app.app_context():
        for _ in range(REPEAT):
            timed_out, future = ext.submit(parent).result(timeout=10)
            assert (timed_out, future.result(timeout=10)) == (True, "child ran")
        stats = ext.stats()
    assert (stats["succeeded"], stats["running"], stats["queued"]) == (2 * REPEAT, 0, 0)


def test_a_timed_wait_in_a_task_gets_the_result(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)

    def square(n: int) -> int:
        return n * n

    def parent(n: int) -> int:
        return ext.submit(square, n).result(timeout=10) + 1

    with app.app_context():
        assert [ext.submit(parent, n).result(timeout=10) for n in range(REPEAT)] == [
            n * n + 1 for n in range(REPEAT)
        ]


def test_children_of_running_tasks_are_not_bounded_by_the_queue(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1, THREADCTX_MAX_QUEUE=1)

    def fan_out(children: int) -> list[int]:
        futures = [ext.submit(pow, n, 2) for n in range(children)]
        return [f.result() for f in futures]

    with app.app_context():
        assert ext.submit(fan_out, 50).result(timeout=10) == [n * n for n in range(50)]
        stats = ext.stats()
    assert (stats["submitted"], stats["rejected"], stats["queued"]) == (51, 0, 0)


def test_tasks_run_inline_or_cancelled_give_back_their_place_in_the_queue(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1, THREADCTX_MAX_QUEUE=2)
    gate = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(10)

    with app.app_context():
        for _ in range(REPEAT):
            started.clear()
            gate.clear()
            holder = ext.submit(hold)
            started.wait(10)
            queued = [ext.submit(int) for _ in range(2)]
            with pytest.raises(QueueFull):
                ext.submit(int)
            assert all(f.cancel() for f in queued)
            assert ext.stats()["queued"] == 0
            again = [ext.submit(int) for _ in range(2)]  # the cancelled tasks' places
            gate.set()
            holder.result(timeout=10)
            assert [f.result(timeout=10) for f in again] == [0, 0]

    # Tasks from outside that a running task waits for run in its thread, and give back their
    # places then, not when the busy worker would have come to them.
    handoff: queue.Queue[list[concurrent.futures.Future[int]]] = queue.Queue()
    ran = threading.Event()

    def run_them() -> int:
        started.set()
        total = sum(f.result() for f in handoff.get(timeout=10))
        ran.set()
        gate.wait(10)
        return total

    with app.app_context():
        for _ in range(REPEAT):
            started.clear()
            gate.clear()
            ran.clear()
            runner = ext.submit(run_them)
            started.wait(10)
            handoff.put([ext.submit(pow, 3, 2), ext.submit(pow, 4, 2)])
            ran.wait(10)
            assert ext.stats()["queued"] == 0
            again = [ext.submit(int) for _ in range(2)]
            gate.set()
            assert (runner.result(timeout=10), [f.result(timeout=10) for f in again]) == (
                25,
                [0, 0],
            )


@pytest.mark.parametrize("eager", [False, True])
def test_shutdown_and_wait_inside_a_task_raises(
    make_app: AppFactory, ext: ThreadContext, eager: bool
) -> None:
    app = make_app(ext, THREADCTX_EAGER=eager)

    def stop() -> None:
        ext.shutdown(wait=True)

    with app.app_context():
        error = ext.submit(stop).exception(timeout=10)
        assert isinstance(error, RuntimeError)
        assert "would wait for itself" in str(error)
        assert ext.submit(int).result(timeout=10) == 0


def test_shutdown_and_wait_inside_a_coroutine_task_raises(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)

    async def stop() -> None:
        ext.shutdown(wait=True)

    with app.app_context():
        error = ext.submit(stop).exception(timeout=10)
    assert isinstance(error, RuntimeError)
    assert "would wait for itself" in str(error)


def test_a_thread_started_by_a_task_may_wait_for_a_child(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    """The task's only worker is blocked joining the thread, so the child it waits for could
    never start on a worker: it runs in that thread, which runs the task's code."""
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)

    def square(n: int) -> int:
        return n * n

    def in_a_thread(n: int) -> int:
        results: list[int] = []

        def work() -> None:
            results.append(ext.submit(square, n).result())

        thread = ContextThread(target=work)
        thread.start()
        thread.join(10)
        return results[0]

    with app.app_context():
        assert [ext.submit(in_a_thread, n).result(timeout=10) for n in range(REPEAT)] == [
            n * n for n in range(REPEAT)
        ]


@pytest.mark.usefixtures("frequent_switches")
def test_places_in_the_queue_are_given_back_exactly_once_under_races(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    """Submitters, cancellers, workers and waiting tasks all race to take tasks out of the
    queue. Every place comes back exactly once: one too many would raise in a worker (the bound
    is a BoundedSemaphore), one too few would shrink the queue for good."""
    bound = 8
    app = make_app(ext, THREADCTX_MAX_WORKERS=2, THREADCTX_MAX_QUEUE=bound)
    submitted: list[concurrent.futures.Future[int]] = []
    refused = [0]

    def wait_for(futures: list[concurrent.futures.Future[int]]) -> int:
        return sum(f.result() for f in futures if not f.cancelled())

    def submitter(n: int) -> None:
        with app.app_context():
            for i in range(300):
                try:
                    future = (
                        ext.submit(pow, i, 2) if i % 3 else ext.submit(wait_for, submitted[-4:])
                    )
                except QueueFull:
                    refused[0] += 1
                    continue
                submitted.append(future)
                if i % 5 == n % 5:
                    future.cancel()

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    concurrent.futures.wait(submitted, timeout=60)
    with app.app_context():
        stats = ext.stats()
    assert all(f.done() for f in submitted)
    assert (stats["queued"], stats["running"], stats["rejected"]) == (0, 0, refused[0])
    assert stats["submitted"] == len(submitted) + refused[0]
    # The bound is whole again: exactly `bound` tasks queue behind a held worker, the next is
    # refused.
    gate = threading.Event()
    started = threading.Barrier(3)

    def hold() -> None:
        started.wait(10)
        gate.wait(10)

    with app.app_context():
        holders = [ext.submit(hold), ext.submit(hold)]
        started.wait(10)
        queued = [ext.submit(int) for _ in range(bound)]
        with pytest.raises(QueueFull):
            ext.submit(int)
        gate.set()
        assert [f.result(timeout=10) for f in queued] == [0] * bound
        for holder in holders:
            holder.result(timeout=10)


def test_a_coroutine_awaiting_many_children_gets_one_helper_thread(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)

    all_awaited = threading.Event()

    def where(n: int) -> threading.Thread:
        all_awaited.wait(10)  # so that the children are all waiting at once
        return threading.current_thread()

    async def fan_out(children: int) -> tuple[str, list[threading.Thread]]:
        task = current_task()
        assert task is not None
        awaited = [asyncio.wrap_future(ext.submit(where, n)) for n in range(children)]
        all_awaited.set()
        return task.id, list(await asyncio.gather(*awaited))

    with app.app_context():
        for _ in range(REPEAT):
            all_awaited.clear()
            parent_id, threads = ext.submit(fan_out, 200).result(timeout=60)
            # The thread objects themselves, which are all kept: idents are reused.
            assert {thread.name for thread in threads} == {f"threadctx-helper-{parent_id}"}
            assert len(set(threads)) == 1


@pytest.mark.parametrize("eager", [False, True])
def test_a_task_waiting_for_its_own_result_is_told(
    make_app: AppFactory, ext: ThreadContext, eager: bool
) -> None:
    app = make_app(ext, THREADCTX_EAGER=eager)

    def wait_for_myself(timeout: float | None) -> object:
        task = current_task()
        assert task is not None
        own = ext.get_task(task.id)
        assert own is not None
        return own.result(timeout)

    with app.app_context():
        for timeout in (None, 10.0):
            error = ext.submit(wait_for_myself, timeout).exception(timeout=10)
            assert isinstance(error, RuntimeError)
            assert str(error).endswith(
                ".wait_for_myself) waited for its own result, which comes only once it"
                " returns: it would wait forever. Return the value instead."
            )
        assert ext.submit(int).result(timeout=10) == 0
