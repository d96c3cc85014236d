"""The batched sweep: K configurations fitted as one tensor program (nllflow.fitting.batched) must give each
configuration exactly the fit that fit_mle gives it alone (the threaded mode's fit), divergence and
stops included; the flow records them as the threaded mode does; what cannot be batched is refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from family_table import CASES

from nllflow.errors import InputError
from nllflow.families import get_family
from nllflow.fitting.batched import fit_batched
from nllflow.fitting.mle import FitSettings, fit_mle
from nllflow.likelihood.observations import Observations
from nllflow.spec import parse_spec
from nllflow.tracking.recorder import PARENT_TAG

SETTINGS = [
    FitSettings("adam", 0.01, 80),
    FitSettings("adam", 0.2, 80),
    FitSettings("sgd", 0.002, 60),
    FitSettings("sgd", 0.05, 80),
    FitSettings("sgd", 50.0, 80),  # diverges (or stops at a bound) within a few steps
]
INIT = {
    "gamma": {"concentration": 0.8, "rate": 2.0},
    "studentt": {"df": 9.0, "loc": 0.0, "scale": 1.0},
    "laplace": {"loc": 0.0, "scale": 3.0},
    "categorical": {"logits": [0.0, 0.0, 0.0]},
}


@pytest.mark.parametrize("name", sorted(INIT))
def test_each_row_is_the_fit_mle_of_its_configuration(name):
    """Sufficient statistics (gamma), a fused pass (Student-t), torch's log_prob (Laplace) and a
    vector parameter (categorical logits): every row's trace, estimate and reason are fit_mle's."""
    x = torch.as_tensor(CASES[name].sample(400, seed=2))
    batched = fit_batched(get_family(name), Observations(x), SETTINGS, init=INIT[name])
    for settings, got in zip(SETTINGS, batched, strict=False):
        alone = fit_mle(get_family(name), Observations(x), init=INIT[name], settings=settings)
        assert (got.reason, got.converged, got.steps) == (alone.reason, alone.converged, alone.steps)
        assert list(got.trace.columns) == list(alone.trace.columns)
        np.testing.assert_allclose(got.trace.to_numpy(), alone.trace.to_numpy(), rtol=1e-12, atol=1e-12)
        assert got.params == pytest.approx(alone.params, rel=1e-12)
        assert (got.optimizer, got.lr) == (settings.optimizer, settings.learning_rate)
    assert not batched[0].diverged
    if name != "categorical":  # unconstrained logits cannot leave their space
        assert batched[-1].reason.startswith(("diverged", "stopped"))


def test_rows_with_different_step_budgets_and_tolerances():
    x = torch.as_tensor(CASES["gamma"].sample(300, seed=3))
    settings = [FitSettings("adam", 0.1, 5), FitSettings("adam", 0.1, 400, gtol=1e-3), FitSettings("sgd", 0.1, 30)]
    for got, s in zip(
        fit_batched(get_family("gamma"), Observations(x), settings, init=INIT["gamma"]), settings, strict=False
    ):
        alone = fit_mle(get_family("gamma"), Observations(x), init=INIT["gamma"], settings=s)
        assert (got.reason, got.steps) == (alone.reason, alone.steps)
        np.testing.assert_allclose(got.trace.to_numpy(), alone.trace.to_numpy(), rtol=1e-12, atol=1e-12)


def _spec(**sweep):
    return {
        "name": "test-batched",
        "family": "gamma",
        "data": {"simulate": {"params": {"concentration": 2.5, "rate": 1.5}, "n": 600, "seed": 5}, "holdout": 0.25},
        "init": INIT["gamma"],
        "optimizer": {"name": "adam", "lr": 0.05, "max_steps": 60},
        "device": "cpu",
        "sweep": {"fan_out": "batched", **sweep},
    }


@pytest.mark.parametrize(
    "sweep, family, expected",
    [
        ({"lr": [0.1], "optimizer": ["lbfgs"]}, "gamma", "adam and sgd configurations only"),
        ({"lr": [0.1], "seed": [1, 2]}, "gamma", "one data set"),
        ({"lr": [0.1]}, "uniform", "cannot fit uniform"),
    ],
)
def test_what_cannot_be_batched_is_refused_in_one_line(sweep, family, expected):
    raw = _spec(**sweep)
    raw["family"] = family
    raw["init"] = {}
    with pytest.raises(InputError, match=expected) as error:
        parse_spec(raw)
    assert "\n" not in str(error.value) and "fan_out: threads" in str(error.value)


def test_batched_sweep_flow_records_each_configuration_like_the_threaded_mode(tracker, tmp_path):
    from nllflow.flows.sweep import sweep
    from nllflow.pipeline.steps import build_problem, load_data

    spec = parse_spec(_spec(lr=[0.001, 0.05, 1e6], optimizer=["adam", "sgd"]))
    summary = sweep(spec)
    parent = tracker.client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.fan_out"] == '"batched"'
    children = {c.info.run_name: c for c in tracker.children(parent.info.run_id)}
    assert sorted(children) == sorted(c.label() for c in spec.configurations())
    assert all(c.data.tags[PARENT_TAG] == parent.info.run_id for c in children.values())
    diverged = set()
    for configuration in spec.configurations():
        # the oracle: this configuration fitted alone, as the threaded mode fits it
        problem = build_problem(configuration, load_data(configuration))
        alone = fit_mle(problem.family, problem.observations, init=problem.init, settings=problem.settings)
        child = children[configuration.label()]
        assert child.info.status == ("FAILED" if alone.diverged else "FINISHED")
        if alone.diverged:
            diverged.add(configuration.label())
        folder = tmp_path / child.info.run_id
        folder.mkdir()
        trace = pd.read_parquet(tracker.client.download_artifacts(child.info.run_id, "trace.parquet", str(folder)))
        # the wall-clock seconds of each step differ from mode to mode; they only grow
        assert trace["time"].is_monotonic_increasing
        np.testing.assert_allclose(
            trace.drop(columns="time").to_numpy(), alone.trace.to_numpy(), rtol=1e-12, atol=1e-12
        )
        assert child.data.metrics["nll"] == pytest.approx(alone.nll, rel=1e-12)
        history = tracker.client.get_metric_history(child.info.run_id, "mean_nll")
        assert len(history) == len(alone.trace)
    assert set(summary["failed"]) == diverged and "gamma sgd lr=1e+06" in diverged
    finished = {name: c.data.metrics["nll"] for name, c in children.items() if c.info.status == "FINISHED"}
    assert parent.data.tags["best_run"] == children[min(finished, key=finished.get)].info.run_id
