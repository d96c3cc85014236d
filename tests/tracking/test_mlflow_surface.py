"""What MLflow's UI is given to show, read back through MlflowClient: a demo-like sweep (the Gamma
learning-rate sweep, smaller) and a comparison, run as flows under the Prefect harness. The
experiment kind tag, dataset inputs, summary metrics as one point at step 0 beside the per-step
histories, the run descriptions, the parents' hyperparameter charts, the children's swept params."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from nllflow.spec import ComparisonSpec, parse_spec
from nllflow.tracking.recorder import PARENT_TAG

ROOT = Path(__file__).resolve().parents[2]
GROUNDBEEF = ROOT / "experiments" / "data" / "groundbeef.parquet"
RATES = [0.01, 0.1, 0.3]
MAX_STEPS = 150
N = 2000
SUMMARY_METRICS = ("aic", "bic", "steps", "converged", "n", "estimate.concentration", "estimate.rate", "gof_ks")
HISTORIES = ("nll", "mean_nll", "grad_norm", "concentration", "rate", "grad_concentration", "grad_rate")


def artifact_names(client, run_id: str) -> set[str]:
    return {artifact.path for artifact in client.list_artifacts(run_id)}


def assert_png(client, run_id: str, name: str, tmp_path: Path) -> None:
    local = Path(client.download_artifacts(run_id, name, str(tmp_path)))
    height, width, _ = matplotlib.image.imread(local).shape
    assert height > 300 and width > 300


@pytest.fixture(scope="module")
def demo_sweep(prefect_harness):
    """experiments/gamma_lr_sweep.yaml with fewer rates, steps and points."""
    from nllflow.flows.sweep import sweep
    from nllflow.tracking.recorder import Tracker

    spec = parse_spec(
        {
            "name": "surface-gamma-lr",
            "family": "gamma",
            "data": {"simulate": {"params": {"concentration": 2.5, "rate": 1.5}, "n": N, "seed": 7}, "holdout": 0.2},
            "init": {"concentration": 0.5, "rate": 3.0},
            "optimizer": {"name": "adam", "max_steps": MAX_STEPS},
            "sweep": {"lr": RATES},
            "device": "cpu",
        }
    )
    return Tracker(), sweep(spec)


def test_the_experiment_opens_as_model_training(demo_sweep):
    tracker, summary = demo_sweep
    experiment = tracker.client.get_experiment_by_name("surface-gamma-lr")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert summary["experiment_id"] == experiment.experiment_id


def test_children_carry_the_swept_values_the_dataset_and_step_zero_summaries(demo_sweep):
    tracker, summary = demo_sweep
    client = tracker.client
    children = client.search_runs(
        [summary["experiment_id"]], f"tags.`{PARENT_TAG}` = '{summary['parent_run_id']}'", max_results=100
    )
    assert len(children) == len(RATES)
    assert sorted(float(child.data.params["lr"]) for child in children) == RATES
    # the data, drawn again with torch from the spec's seed: the digest MLflow shows is its fingerprint
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        values = torch.distributions.Gamma(torch.tensor(2.5).double(), torch.tensor(1.5).double()).sample((N,))
    digest = hashlib.sha256(values.numpy().astype(np.float64).tobytes()).hexdigest()[:16]
    for child in children:
        params = child.data.params
        assert params["optimizer"] == "adam" and params["family"] == "gamma" and params["data.seed"] == "7"
        assert child.info.run_name == f"gamma adam lr={float(params['lr']):g}"
        (dataset_input,) = child.inputs.dataset_inputs
        dataset = dataset_input.dataset
        assert (dataset.name, dataset.digest) == ("simulated gamma", digest)
        assert json.loads(dataset.profile) == {"num_rows": N}
        assert "seed=7" in json.loads(dataset.source)["simulation"]
        assert {tag.key: tag.value for tag in dataset_input.tags} == {"mlflow.data.context": "training"}
        run_id, metrics = child.info.run_id, child.data.metrics
        for name in SUMMARY_METRICS:
            (point,) = client.get_metric_history(run_id, name)
            assert point.step == 0 and point.value == metrics[name]
        steps = int(metrics["steps"])
        assert 0 < steps <= MAX_STEPS
        for name in HISTORIES:
            history = client.get_metric_history(run_id, name)
            assert [m.step for m in history] == list(range(steps + 1))
        nll = client.get_metric_history(run_id, "nll")
        # the total NLL at the last step, recomputed with scipy from the recorded estimates
        k, final = 2, nll[-1].value
        assert metrics["aic"] == pytest.approx(2 * k + 2 * final, rel=1e-12)
        assert metrics["bic"] == pytest.approx(k * math.log(metrics["n"]) + 2 * final, rel=1e-12)
        train = client.get_run(run_id)
        assert int(train.data.params["n"]) == metrics["n"] == N - round(0.2 * N)
        note = child.data.tags["mlflow.note.content"]
        assert "| parameter | estimate | SE | 95% CI |" in note
        assert f"| concentration | {metrics['estimate.concentration']:.6g} |" in note


def test_the_sweep_parent_has_the_hyperparameter_chart_and_the_ranking(demo_sweep, tmp_path):
    tracker, summary = demo_sweep
    client = tracker.client
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "true"
    assert {"hyperparameters.png", "loss_overlay.png", "sweep.parquet"} <= artifact_names(client, parent.info.run_id)
    assert_png(client, parent.info.run_id, "hyperparameters.png", tmp_path)
    assert json.loads(parent.data.params["sweep.lr"]) == RATES
    table = pd.read_parquet(client.download_artifacts(parent.info.run_id, "sweep.parquet", str(tmp_path)))
    best = table.loc[table["nll"].idxmin()]
    assert parent.data.tags["best_run"] == best["run_id"] == summary["best_run_id"]
    (point,) = client.get_metric_history(parent.info.run_id, "best_nll")
    assert point.step == 0 and point.value == best["nll"]
    assert "ranked by nll" in parent.data.tags["mlflow.note.content"]


def test_the_sweep_children_are_coloured_from_the_lowest_rate_to_the_highest(demo_sweep):
    from nllflow.tracking.recorder import COLOUR_TAG

    tracker, summary = demo_sweep
    children = tracker.children(summary["parent_run_id"])
    by_rate = sorted(children, key=lambda run: float(run.data.params["lr"]))
    colours = [run.data.tags[COLOUR_TAG] for run in by_rate]
    # viridis from its dark purple end (#440154) towards yellow, one distinct colour per rate
    assert colours[0] == "#440154" and len(set(colours)) == len(RATES) == len(colours)
    greens = [int(colour[3:5], 16) for colour in colours]  # viridis' green channel rises along the map
    assert greens == sorted(greens)


@pytest.fixture(scope="module")
def comparison(prefect_harness):
    from nllflow.flows.compare import compare
    from nllflow.tracking.recorder import Tracker

    spec = ComparisonSpec(
        name="surface-compare",
        families=["gamma", "lognormal", "weibull"],
        data={"path": str(GROUNDBEEF), "column": "serving"},
        device="cpu",
    )
    return Tracker(), compare(spec)


def test_the_comparison_parent_charts_aic_per_family(comparison, tmp_path):
    tracker, summary = comparison
    client = tracker.client
    parent_id = summary["parent_run_id"]
    assert {"hyperparameters.png", "comparison.parquet", "plots"} <= artifact_names(client, parent_id)
    assert_png(client, parent_id, "hyperparameters.png", tmp_path)
    x = pd.read_parquet(GROUNDBEEF)["serving"].to_numpy()
    # scipy's AIC per family (location fixed at 0) ranks them as the recorded children do
    scipy_aic = {
        "gamma": stats.gamma.logpdf(x, *stats.gamma.fit(x, floc=0)).sum(),
        "lognormal": stats.lognorm.logpdf(x, *stats.lognorm.fit(x, floc=0)).sum(),
        "weibull": stats.weibull_min.logpdf(x, *stats.weibull_min.fit(x, floc=0)).sum(),
    }
    scipy_aic = {family: 2 * 2 - 2 * loglik for family, loglik in scipy_aic.items()}
    children = client.search_runs([summary["experiment_id"]], f"tags.`{PARENT_TAG}` = '{parent_id}'")
    recorded = {child.data.params["family"]: child.data.metrics["aic"] for child in children}
    assert recorded == pytest.approx(scipy_aic, rel=1e-6)
    assert [row["family"] for row in summary["ranking"]] == sorted(scipy_aic, key=scipy_aic.get)
    for child in children:
        (dataset_input,) = child.inputs.dataset_inputs
        assert dataset_input.dataset.name == "groundbeef#serving"
        assert json.loads(dataset_input.dataset.source) == {"uri": str(GROUNDBEEF)}
