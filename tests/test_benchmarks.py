"""A tiny run of the benchmark, so that it never rots. It measures nothing worth reading."""

from __future__ import annotations

import importlib.util
import json
import typing as t
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _load(name: str) -> t.Any:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> t.Any:
    return _load("bench")


def test_smoke(bench: t.Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--json", str(out),
            "--rounds", "2",
            "--tasks", "60",
            "--latency-tasks", "20",
            "--contention-tasks", "10",
            "--io-tasks", "16",
            "--fan-out", "6",
            "--without-flask-executor",
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    results = report["results"]
    contenders = [
        "bare",
        "threadctx",
        "copy_ctx",
        "threadctx+3 receivers",
        "threadctx+5 g values",
        "threadctx+sqlite store",
        "threadctx+progress x100",
    ]
    assert list(results["throughput"]) == contenders
    assert list(results["memory"]) == ["bare", "threadctx", "copy_ctx"]
    assert list(results["contention"]) == ["bare", "threadctx", "copy_ctx", "threadctx+3 receivers"]
    assert sorted(results) == sorted(
        ["throughput", "memory", "latency", "contention", "io_8", "io_32", "io_128", "nesting"]
    )
    for case in results.values():
        for metrics in case.values():
            for summary in metrics.values():
                assert summary["min"] <= summary["median"] <= summary["max"]
                assert summary["min"] > 0
    assert [target["target"] for target in report["targets"]] == [row[0] for row in bench.TARGETS]
    executor_targets = [
        target for target in report["targets"] if "Flask-Executor" in target["target"]
    ]
    assert {target["met"] for target in executor_targets} == {None}
    assert report["settings"]["rounds"] == 2
    table = capsys.readouterr().out
    for name in contenders:
        assert name in table
    assert "target throughput vs the bare pool" in table


def test_hot_path_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    hot_path = _load("hot_path")
    assert hot_path.main(["--tasks", "30"]) > 0
    assert hot_path.main(["--tasks", "30", "--future"]) > 0
    assert hot_path.main(["--tasks", "30", "--profile"]) > 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.endswith("us per task over 30 tasks") for line in lines[:2]] == [True, True]
    assert lines[2].endswith("us per task over 30 tasks, slowed down by the profiler")
    # The profile shows the library's own functions, each called once per task.
    assert any("flask_threadctx" in line and line.split()[0] == "30" for line in lines[3:])


def test_control_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    results = _load("control_bench").main(["--stops", "3", "--delayed", "20"])
    assert sorted(results) == ["delayed", "stop"]
    assert sorted(results["delayed"]) == [
        "bytes_per_task",
        "late_max_ms",
        "late_p50_ms",
        "late_p99_ms",
        "threads_while_waiting",
    ]
    assert capsys.readouterr().out.startswith("stop of a task reporting every 10 ms: p50 ")


@pytest.mark.integration  # a Redis server and a worker process
def test_control_bench_celery_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    results = _load("control_bench").main(["--stops", "1", "--delayed", "5", "--celery-stops", "3"])
    assert sorted(results) == ["celery_stop", "delayed", "stop"]
    assert 0 < results["celery_stop"]["p50_ms"] <= results["celery_stop"]["p99_ms"]
    assert (
        capsys.readouterr()
        .out.splitlines()[1]
        .startswith("stop of a Celery task reporting every 10 ms: p50 ")
    )
