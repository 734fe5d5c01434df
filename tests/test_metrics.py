"""Metrics for Prometheus from the signals, in one process. Several gunicorn processes adding up:
tests/integration/test_metrics_across_processes.py."""

from __future__ import annotations

import threading
import typing as t

import flask
import pytest
from flask_threadctx import QueueFull
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state

prometheus_client = pytest.importorskip("prometheus_client")


def value(metric: str, **labels: str) -> float | None:
    return t.cast("float | None", prometheus_client.REGISTRY.get_sample_value(metric, labels))


def ok() -> int:
    return 1


def bad() -> None:
    raise ValueError("no")


def test_counters_histograms_and_gauges_follow_the_tasks() -> None:
    app = flask.Flask("metrics_one")
    app.config.update(
        TESTING=True,
        THREADCTX_METRICS=True,
        THREADCTX_MAX_WORKERS=1,
        THREADCTX_MAX_QUEUE=2,
        THREADCTX_LOG_EXCEPTIONS=False,
    )
    ext = ThreadContext(app)
    try:
        check_metrics(app, ext)
    finally:
        app_state(app).default.shutdown()


def check_metrics(app: flask.Flask, ext: ThreadContext) -> None:
    app.register_blueprint(ext.monitor(), url_prefix="/m")
    started, release = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait()

    with app.app_context():
        blocker = ext.submit(block)
        started.wait()
        waiting = [ext.submit(ok), ext.submit(ok)]
        with pytest.raises(QueueFull):
            ext.submit(ok)
        labels = {"app": "metrics_one"}
        metrics = app_state(app).metrics
        assert metrics is not None
        metrics.sample()  # the sampler thread does it every second
        assert (
            value("threadctx_tasks_queued", **labels),
            value("threadctx_tasks_running", **labels),
        ) == (2, 1)
        assert waiting[1].cancel()
        release.set()
        blocker.result()
        waiting[0].result()
        for _ in range(5):
            ext.submit(ok).result()
        for _ in range(2):
            ext.submit(bad).exception()
    ok_labels = {"app": "metrics_one", "name": "ok"}
    assert value("threadctx_tasks_submitted_total", **ok_labels) == 8  # the rejected one too
    assert value("threadctx_tasks_finished_total", outcome="succeeded", **ok_labels) == 6
    assert value("threadctx_tasks_finished_total", outcome="cancelled", **ok_labels) == 1
    assert value("threadctx_tasks_finished_total", outcome="rejected", **ok_labels) == 1
    bad_labels = {"app": "metrics_one", "name": "bad"}
    assert value("threadctx_tasks_finished_total", outcome="failed", **bad_labels) == 2
    assert value("threadctx_tasks_finished_total", outcome="succeeded", **bad_labels) is None
    assert value("threadctx_task_queue_seconds_count", **ok_labels) == 6
    assert value("threadctx_task_run_seconds_count", **ok_labels) == 6
    assert value("threadctx_task_run_seconds_count", **bad_labels) == 2
    text = app.test_client().get("/m/metrics").text  # the gauges sampled for the answer
    assert (
        'threadctx_tasks_finished_total{app="metrics_one",name="bad",outcome="failed"} 2.0' in text
    )
    assert 'threadctx_tasks_running{app="metrics_one"} 0.0' in text
    assert (
        value("threadctx_tasks_queued", **labels),
        value("threadctx_tasks_running", **labels),
    ) == (0, 0)


def test_without_metrics_the_monitor_says_how_to_turn_them_on() -> None:
    app = flask.Flask("metrics_off")
    app.config.update(TESTING=True)
    ext = ThreadContext(app)
    app.register_blueprint(ext.monitor(), url_prefix="/m")
    response = app.test_client().get("/m/metrics")
    app_state(app).default.shutdown()
    assert (response.status_code, response.get_json()) == (
        404,
        {"error": "Metrics are off: set 'THREADCTX_METRICS = True' (needs prometheus_client)."},
    )


TOKEN = "scrape-me-0123456789"


def test_a_scraper_with_the_metrics_token_needs_no_session() -> None:
    """Prometheus has no session cookie: 'THREADCTX_METRICS_TOKEN' lets it in as a bearer
    token, while the monitor's page and API stay behind 'check_access'."""
    app = flask.Flask("metrics_token")
    app.config.update(TESTING=True, THREADCTX_METRICS=True, THREADCTX_METRICS_TOKEN=TOKEN)
    ext = ThreadContext(app)
    app.register_blueprint(ext.monitor(check_access=lambda: False), url_prefix="/m")
    client = app.test_client()
    answers = {
        name: client.get(path, headers=headers)
        for name, path, headers in [
            ("token", "/m/metrics", {"Authorization": f"Bearer {TOKEN}"}),
            ("lower-case scheme", "/m/metrics", {"Authorization": f"bearer {TOKEN}"}),
            ("no token", "/m/metrics", {}),
            ("wrong token", "/m/metrics", {"Authorization": "Bearer scrape-me-0123456788"}),
            ("basic", "/m/metrics", {"Authorization": f"Basic {TOKEN}"}),
            ("token for the API", "/m/api/stats", {"Authorization": f"Bearer {TOKEN}"}),
        ]
    }
    app_state(app).default.shutdown()
    assert {name: answer.status_code for name, answer in answers.items()} == {
        "token": 200,
        "lower-case scheme": 200,
        "no token": 403,
        "wrong token": 401,
        "basic": 403,
        "token for the API": 403,
    }
    assert "threadctx_tasks_submitted" in answers["token"].text
    assert answers["wrong token"].get_json() == {
        "error": "Wrong bearer token for the metrics: send 'THREADCTX_METRICS_TOKEN'."
    }
    assert answers["wrong token"].headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert TOKEN not in answers["wrong token"].text


def test_without_a_token_the_metrics_follow_check_access() -> None:
    app = flask.Flask("metrics_no_token")
    app.config.update(TESTING=True, THREADCTX_METRICS=True)
    ext = ThreadContext(app)
    allowed = [False]
    app.register_blueprint(ext.monitor(check_access=lambda: allowed[0]), url_prefix="/m")
    client = app.test_client()
    refused = client.get("/m/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    allowed[0] = True
    let_in = client.get("/m/metrics")
    app_state(app).default.shutdown()
    assert (refused.status_code, let_in.status_code) == (403, 200)


@pytest.mark.parametrize(
    ("token", "error", "message"),
    [
        (
            "short",
            ValueError,
            "'THREADCTX_METRICS_TOKEN' must be at least 16 characters long, not 5:",
        ),
        (12345678901234567, TypeError, "must be a string of printable ASCII characters"),
        ("line\nbreak-0123456789", TypeError, "must be a string of printable ASCII characters"),
        # The header is read stripped: these could never match.
        (" " * 16, ValueError, "'THREADCTX_METRICS_TOKEN' must not begin or end with whitespace"),
        ("0123456789abcdef ", ValueError, "must not begin or end with whitespace: a scraper's"),
        (" 0123456789abcdef", ValueError, "must not begin or end with whitespace"),
    ],
)
def test_a_bad_metrics_token_is_refused_at_init(
    token: t.Any, error: type[Exception], message: str
) -> None:
    app = flask.Flask("metrics_bad_token")
    app.config.update(THREADCTX_METRICS_TOKEN=token)
    with pytest.raises(error, match=message) as raised:
        ThreadContext(app)
    assert str(token) not in str(raised.value)
