"""Another process of the app for ``test_celery_stop.py``, whose listener lags as the test
says: it holds the listener before it applies what it hears of a task (its end, a cancel), so
that a stop asked there meets a future that has not heard of it yet."""

from __future__ import annotations

import collections.abc as cabc
import subprocess
import sys

import pytest
from harness import HERE

LAGGING = """
import sys
import ctx_tasks
import stop_tasks  # its signal receivers, here too
from flask_threadctx.app_state import app_state
app = ctx_tasks.create_app()
threadctx = ctx_tasks.threadctx
with app.app_context():
    listener = None
    for line in sys.stdin:
        op, task_id = line.split()
        if op == "watch":  # its future; the listener held before it applies what it hears
            future = threadctx.get_task(task_id)
            listener = app_state(app).backend("celery")._listener
            listener._write_lock.acquire()
            print(future.task.state, flush=True)
        else:
            try:
                print(threadctx.cancel_task(task_id), future.done(), flush=True)
            finally:
                listener._write_lock.release()
    threadctx.shutdown()
"""


class Lagging:
    """Another process, whose listener lags as the test says: :data:`LAGGING`."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def ask(self, op: str, task_id: str) -> list[str]:
        """``watch``: get the task's future, hold the listener, say the task's state;
        ``cancel``: ``cancel_task``, then whether the future is done, and let the listener go."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{op} {task_id}\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().split()


@pytest.fixture(name="lagging")
def lagging_fixture(worker_env: dict[str, str]) -> cabc.Iterator[Lagging]:
    """The process (:class:`Lagging`), for one test; ended after it, cleanly."""
    with subprocess.Popen(
        [sys.executable, "-c", LAGGING],
        env=worker_env,
        cwd=HERE,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            yield Lagging(process)
        finally:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:  # stopped at a failure, its listener held
                process.kill()
                process.wait()
    assert process.returncode == 0
