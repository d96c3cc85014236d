"""The fit and sweep flows under a real Prefect harness, recording into a real MLflow store; every
assertion is checked against what was recorded and against a fresh recomputation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from nllflow.families import get_family
from nllflow.pipeline.steps import load_data
from nllflow.spec import parse_spec
from nllflow.tracking.recorder import PARENT_TAG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def gamma_spec(**overrides):
    raw = {
        "name": "test-gamma",
        "family": "gamma",
        "data": {"simulate": {"params": {"concentration": 2.5, "rate": 1.5}, "n": 800, "seed": 5}, "holdout": 0.25},
        "init": {"concentration": 0.8, "rate": 2.0},
        "optimizer": {"name": "adam", "lr": 0.05, "max_steps": 60},
        "device": "cpu",
    }
    raw.update(overrides)
    return parse_spec(raw)


def download(tracker, run_id: str, path: str, folder: Path) -> Path:
    return Path(tracker.client.download_artifacts(run_id, path, str(folder)))


def test_fit_flow_records_trace_params_metrics_and_artifacts(tracker, tmp_path):
    from nllflow.flows.fit import fit

    spec = gamma_spec()
    state = fit(spec, return_state=True)
    assert state.is_completed()
    summary = state.result()
    run = tracker.client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "gamma adam lr=0.05"
    params = run.data.params
    assert params["family"] == "gamma" and params["optimizer"] == "adam" and float(params["lr"]) == 0.05
    assert int(params["n"]) == 600 and params["dtype"] == "float64" and params["device"] == "cpu"
    assert len(params["data.fingerprint"]) == 16
    assert run.data.tags["prefect.flow_run_id"] and run.data.tags["version.torch"].startswith("2.13")

    trace = pd.read_parquet(download(tracker, run.info.run_id, "trace.parquet", tmp_path))
    assert len(trace) == summary["steps"] + 1 == 61  # adam never meets gtol=1e-8 in 60 steps
    assert list(trace["step"]) == list(range(61))
    for key in ("nll", "grad_norm", "concentration", "grad_rate"):
        history = tracker.client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(61))
        np.testing.assert_allclose([m.value for m in history], trace[key].to_numpy())

    # the logged gradients are the autograd gradients of the mean NLL at the logged parameters
    train = torch.as_tensor(load_data(spec).train.values)
    for row in trace.iloc[[0, 17, 60]].itertuples():
        a = torch.tensor(row.concentration, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(row.rate, dtype=torch.float64, requires_grad=True)
        mean_nll = -torch.distributions.Gamma(a, b).log_prob(train).mean()
        mean_nll.backward()
        assert row.grad_concentration == pytest.approx(a.grad.item(), rel=1e-9, abs=1e-12)
        assert row.grad_rate == pytest.approx(b.grad.item(), rel=1e-9, abs=1e-12)
        assert row.nll == pytest.approx(-stats.gamma.logpdf(train.numpy(), row.concentration, scale=1 / row.rate).sum())

    table = pd.read_parquet(download(tracker, run.info.run_id, "fit.parquet", tmp_path)).set_index("parameter")
    for label in ("concentration", "rate"):
        assert table.loc[label, "estimate"] == pytest.approx(run.data.metrics[f"estimate.{label}"], rel=1e-12)
        assert table.loc[label, "estimate"] == pytest.approx(summary["params"][label], rel=1e-12)
        assert table.loc[label, "stderr"] == pytest.approx(run.data.metrics[f"se_{label}"], rel=1e-12)
        assert table.loc[label, "truth"] == {"concentration": 2.5, "rate": 1.5}[label]
    assert run.data.metrics["heldout_nll"] == pytest.approx(
        -stats.gamma.logpdf(
            load_data(spec).heldout.values, summary["params"]["concentration"], scale=1 / summary["params"]["rate"]
        ).sum()
    )
    for plot in ("plots/loss.png", "plots/density.png", "plots/qq.png"):
        assert download(tracker, run.info.run_id, plot, tmp_path).read_bytes().startswith(PNG_MAGIC)
    timings = summary["timings"]
    assert set(timings) == {"load", "fit", "evaluate", "record", "total"}
    # the total is the flow body's wall time: it covers the four laps
    assert timings["total"] >= sum(timings[k] for k in ("load", "fit", "evaluate", "record")) > 0


def test_diverged_fit_is_a_failed_flow_and_a_failed_run(tracker, tmp_path):
    from nllflow.flows.fit import fit

    spec = gamma_spec(optimizer={"name": "sgd", "lr": 1e6, "max_steps": 50}, name="test-diverge")
    state = fit(spec, return_state=True)
    assert state.is_failed()
    summary = state.result(raise_on_failure=False)
    run = tracker.client.get_run(summary["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["reason"].startswith("diverged")
    trace = pd.read_parquet(download(tracker, run.info.run_id, "trace.parquet", tmp_path))
    assert np.isfinite(trace["nll"]).all() and len(trace) >= 1


def test_sweep_nests_children_and_picks_the_best(tracker, tmp_path):
    from nllflow.flows.sweep import sweep

    spec = gamma_spec(name="test-sweep", sweep={"lr": [0.001, 0.05, 0.2]})
    summary = sweep(spec)
    parent = tracker.client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = tracker.children(summary["parent_run_id"])
    assert sorted(c.info.run_name for c in children) == [
        "gamma adam lr=0.001",
        "gamma adam lr=0.05",
        "gamma adam lr=0.2",
    ]
    assert all(c.data.tags[PARENT_TAG] == parent.info.run_id for c in children)
    table = pd.read_parquet(download(tracker, parent.info.run_id, "sweep.parquet", tmp_path))
    assert len(table) == 3 and set(table["status"]) == {"FINISHED"}
    by_nll = {c.info.run_id: c.data.metrics["nll"] for c in children}
    assert parent.data.tags["best_run"] == min(by_nll, key=by_nll.get) == summary["best_run_id"]
    assert parent.data.metrics["best_nll"] == pytest.approx(min(by_nll.values()))
    for row in table.itertuples():
        assert row.nll == pytest.approx(by_nll[row.run_id])
    assert download(tracker, parent.info.run_id, "loss_overlay.png", tmp_path).read_bytes().startswith(PNG_MAGIC)
    # the smallest rate moves least in 60 steps: its NLL is the worst
    worst = table.loc[table["nll"].idxmax()]
    assert worst["lr"] == 0.001


def test_sweep_lists_a_diverged_child_as_failed_and_completes(tracker):
    from nllflow.flows.sweep import sweep

    spec = gamma_spec(name="test-sweep-diverge", optimizer={"name": "sgd", "max_steps": 40}, sweep={"lr": [0.01, 1e6]})
    summary = sweep(spec)
    assert set(summary["failed"]) == {"gamma sgd lr=1e+06"}
    assert summary["failed"]["gamma sgd lr=1e+06"].startswith("diverged")
    statuses = {r["run_name"]: r["status"] for r in summary["runs"]}
    assert statuses == {"gamma sgd lr=0.01": "FINISHED", "gamma sgd lr=1e+06": "FAILED"}
    assert tracker.client.get_run(summary["parent_run_id"]).info.status == "FINISHED"


def test_categorical_fit_recovers_the_seed_logits(tracker):
    from nllflow.flows.fit import fit

    spec = parse_spec(
        {
            "name": "test-categorical",
            "family": "categorical",
            "device": "cpu",
            "data": {"simulate": {"params": {"logits": [0.4, 1.1]}, "n": 4000, "seed": 2}},
        }
    )
    summary = fit(spec, return_state=True).result()
    counts = np.bincount(load_data(spec).full.values.astype(int))
    expected = np.log(counts[1:] / counts[0])  # the MLE of log-odds against category 0
    assert [summary["params"]["logits_1"], summary["params"]["logits_2"]] == pytest.approx(expected, abs=1e-6)
    for label, truth in (("logits_1", 0.4), ("logits_2", 1.1)):
        assert abs(summary["params"][label] - truth) < 4 * summary["stderr"][label]
    assert math.isfinite(summary["gof"]["chi2"])


def test_bundled_example_specs_are_valid():
    from nllflow.spec import load_spec

    folder = Path(__file__).resolve().parents[2] / "experiments"
    specs = {path.stem: load_spec(path) for path in sorted(folder.glob("*.yaml"))}
    assert {
        "seed_gaussian",
        "seed_categorical",
        "seed_triangular",
        "gamma_lr_sweep",
        "studentt_heavy_tails",
        "groundbeef_lognormal",
    } <= set(specs)
    assert len(specs["gamma_lr_sweep"].configurations()) >= 4
    assert get_family(specs["seed_triangular"].family).name == "triangular"
