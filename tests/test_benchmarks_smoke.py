"""A smoke run of the benchmark's core comparison (benchmarks/run.py) on tiny samples: it runs, and
nllflow's NLL is never worse than scipy.stats' own fit on the same data, both judged by scipy's
logpdf. Speed is the benchmark's business, not the suite's: no timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("nllflow_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_core_comparison_never_loses_to_scipy(bench):
    rows = bench.compare_with_scipy(list(bench.CASES), [400], repeats=1)
    assert [row["name"] for row in rows] == ["normal", "gamma", "lognormal", "weibull", "studentt"]
    for row in rows:
        assert row["converged"], row
        assert row["nll_nllflow"] <= row["nll_scipy"] + bench.NLL_TOLERANCE * abs(row["nll_scipy"]), row
        assert row["nll_ok"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the note printed where CUDA is absent")
def test_cuda_benchmark_skips_cleanly_without_cuda(bench, capsys):
    assert bench.main(["--device", "cuda"]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


def test_the_recording_section_records_every_step_of_its_trace(bench, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    # the section points both settings at a fresh store of its own; monkeypatch restores them after
    monkeypatch.setenv("NLLFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'unused.db'}")
    rows = bench.recording(1_000, 1)
    assert [row["steps"] for row in rows if row["name"] == "trace"] == [bench.RECORD_STEPS]
    client = MlflowClient(bench.os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("bench-record")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # the trace alone, then the whole record_fit
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "nll")
        assert [m.step for m in history] == list(range(bench.RECORD_STEPS))
