"""Metrics for Prometheus, fed by the task signals: ``THREADCTX_METRICS = True``.

Needs ``prometheus_client`` (``pip install Flask-ThreadCtx[prometheus]``). Under a server with
several processes (gunicorn), set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before the
app is imported, and mark dead workers in gunicorn's ``child_exit`` hook: then whichever process
serves :func:`metrics_response` reports the sum of all of them. See :doc:`/monitoring`.
"""

from __future__ import annotations

import os
import threading
import time
import typing as t
import weakref

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import multiprocess

from . import signals
from ._process import PerProcess
from .app_state import app_state
from .app_state import KEY

if t.TYPE_CHECKING:
    import flask

    from .backends.pool import Pool
    from .model import TaskInfo

SAMPLE_INTERVAL = 1.0
"""Seconds between two samples of a process's queued and running tasks, for the gauges."""
_TIMES = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0)


class _Metrics:
    """The metrics of every app of the process, told apart by their ``app`` label."""

    def __init__(self) -> None:
        self.submitted = Counter("threadctx_tasks_submitted", "Tasks submitted.", ["app", "name"])
        self.finished = Counter(
            "threadctx_tasks_finished",
            "Tasks that ended: succeeded, failed, cancelled, rejected, expired or timed_out.",
            ["app", "name", "outcome"],
        )
        self.waited = Histogram(
            "threadctx_task_queue_seconds",
            "Seconds from submit to start.",
            ["app", "name"],
            buckets=_TIMES,
        )
        self.ran = Histogram(
            "threadctx_task_run_seconds", "Seconds from start to end.", ["app", "name"],
            buckets=_TIMES,
        )  # fmt: skip
        # Each process sets its own; Prometheus sees the sum over the live ones.
        self.queued = Gauge(
            "threadctx_tasks_queued", "Tasks waiting for a worker thread.", ["app"],
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.running = Gauge(
            "threadctx_tasks_running", "Tasks running in worker threads.", ["app"],
            multiprocess_mode="livesum",
        )  # fmt: skip


_metrics: _Metrics | None = None
_lock = threading.Lock()


def _made() -> _Metrics:
    global _metrics  # noqa: PLW0603  # one set per process, made by the first app that asks
    with _lock:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


class MetricsRecorder:
    """Counts the tasks of one app from its signals."""

    def __init__(self, app: flask.Flask, pool: Pool) -> None:
        self.metrics = _made()
        self.app_name = app.name
        self.pool = pool
        self._samplers: PerProcess[_Sampler] = PerProcess()
        for signal, receiver in (
            (signals.task_submitted, self._submitted),
            (signals.task_started, self._started),
            (signals.task_finished, self._finished),
            (signals.task_failed, self._failed),
            (signals.task_cancelled, self._cancelled),
            (signals.task_rejected, self._rejected),
        ):
            signal.connect(receiver, app)  # weakly: they go with the app, which keeps self

    def sample(self) -> None:
        """Set the gauges from this process's pool."""
        counts = self.pool.stats()
        self.metrics.queued.labels(self.app_name).set(counts["queued"])
        self.metrics.running.labels(self.app_name).set(counts["running"])

    def _keep_sampling(self) -> None:
        # Sampled by a thread every second rather than at each signal: the pool's counts move
        # only after a task's last signal, so a sample taken then would be behind.
        self._samplers.get(self._new_sampler)

    def _new_sampler(self) -> _Sampler:
        sampler = _Sampler(self)
        sampler.start()
        return sampler

    def _submitted(self, sender: flask.Flask, task: TaskInfo) -> None:
        self.metrics.submitted.labels(self.app_name, task.name).inc()
        self._keep_sampling()

    def _started(self, sender: flask.Flask, task: TaskInfo) -> None:
        if task.started_at is not None:
            self.metrics.waited.labels(self.app_name, task.name).observe(
                task.started_at - task.submitted_at
            )
        self._keep_sampling()

    def _finished(
        self, sender: flask.Flask, task: TaskInfo, exception: BaseException | None, **kw: t.Any
    ) -> None:
        if exception is None:  # a failure is counted by 'task_failed', which always follows
            self._end(task, "succeeded")

    def _failed(self, sender: flask.Flask, task: TaskInfo, exception: BaseException) -> None:
        self._end(task, "timed_out" if task.state == "timed_out" else "failed")

    def _end(self, task: TaskInfo, outcome: str) -> None:
        self.metrics.finished.labels(self.app_name, task.name, outcome).inc()
        if task.started_at is not None and task.finished_at is not None:
            self.metrics.ran.labels(self.app_name, task.name).observe(
                task.finished_at - task.started_at
            )
        self._keep_sampling()

    def _cancelled(self, sender: flask.Flask, task: TaskInfo) -> None:
        outcome = "expired" if task.state == "expired" else "cancelled"
        self.metrics.finished.labels(self.app_name, task.name, outcome).inc()
        self._keep_sampling()

    def _rejected(self, sender: flask.Flask, task: TaskInfo, reason: BaseException) -> None:
        self.metrics.submitted.labels(self.app_name, task.name).inc()
        self.metrics.finished.labels(self.app_name, task.name, "rejected").inc()


class _Sampler(threading.Thread):
    """Samples a recorder's gauges every second, until the recorder (with its app) is gone."""

    def __init__(self, recorder: MetricsRecorder) -> None:
        super().__init__(name="threadctx-metrics", daemon=True)
        self.recorder = weakref.ref(recorder)
        self.pid = os.getpid()

    def run(self) -> None:
        while (recorder := self.recorder()) is not None:
            recorder.sample()
            del recorder  # held only while sampling
            time.sleep(SAMPLE_INTERVAL)  # a period, not a synchronisation


def metrics_response() -> flask.Response:
    """The metrics of every process (with ``PROMETHEUS_MULTIPROC_DIR``) or of this one, in
    Prometheus's text format: return it from a view of your own, or use the monitor's
    ``/metrics``."""
    import flask

    app = flask.current_app
    # Any app may serve them, one without the extension too: then only other processes'.
    recorder = app_state(app).metrics if KEY in app.extensions else None
    if recorder is not None:
        recorder.sample()  # this process's gauges, fresh
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = prometheus_client.REGISTRY
    return flask.Response(
        prometheus_client.generate_latest(registry), mimetype=prometheus_client.CONTENT_TYPE_LATEST
    )
