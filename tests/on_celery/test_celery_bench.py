"""A tiny run of the Celery benchmark, so that it never rots. It measures nothing worth
reading: it starts its own Redis and workers, and checks every task's result."""

from __future__ import annotations

import importlib.util
import json
import typing as t
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # separate worker processes: not in the fast loop

BENCHMARKS = Path(__file__).parent.parent.parent / "benchmarks"


def test_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("celery_bench", BENCHMARKS / "celery_bench.py")
    assert spec is not None and spec.loader is not None
    bench: t.Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "scaling.json"
    text = tmp_path / "scaling.txt"
    bench.main(
        [
            *("--json", str(out), "--table", str(text)),
            *("--runs", "2", "--rounds", "2", "--tasks", "20", "--latency-tasks", "5"),
        ]
    )
    report = json.loads(out.read_text())
    contenders = ["celery", "flask_pattern", "threadctx"]
    assert {case: list(by_name) for case, by_name in report["results"].items()} == {
        "latency": contenders,
        "throughput": contenders,
    }
    for by_name in report["results"].values():
        for metrics in by_name.values():
            for summary in metrics.values():
                assert 0 < summary["min"] <= summary["median"] <= summary["max"]
    assert [target["target"] for target in report["targets"]] == [
        "latency p50 vs bare Celery",
        "throughput vs bare Celery",
    ]
    assert len(report["runs"]) == 2
    assert report["runs"][-1] == report["results"]
    for target in report["targets"]:  # the median of two runs is their mean
        assert target["value"] == pytest.approx(sum(target["runs"]) / 2)
    assert report["settings"] == {
        "rounds": 2,
        "tasks": 20,
        "latency_tasks": 5,
        "processes": 2,
        "runs": 2,
    }
    table = capsys.readouterr().out
    assert "target throughput vs bare Celery" in table
    assert text.read_text().endswith(f"{table.strip()}\n")
