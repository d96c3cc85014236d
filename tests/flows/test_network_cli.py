"""`nllflow fit --network`, `--test-data` and network sweeps through the real flows: the JSON contract
(its test NLL recomputed with scipy from the predicted parameters), what MLflow records (per-epoch
histories, params, plots, the pyfunc model predicting the same numbers in a fresh process), bad input
refused in one line (exit 2, nothing recorded), a sweep's children ranked by validation NLL, and the
test NLL of constant fits and regressions against scipy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from nllflow.flows.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENGEL = ROOT / "experiments" / "data" / "engel.csv"
NETWORK = ["--network", "log(income)", "--hidden", "8", "--activation", "tanh", "--batch-size", "32", "--epochs", "60"]


def run_count(tracker) -> int:
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    return len(tracker.client.search_runs(experiments, max_results=10000)) if experiments else 0


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def fit(*arguments: str) -> list[str]:
    return ["fit", "--experiment", "cli-network", "--device", "cpu", *arguments]


@pytest.fixture(scope="module")
def engel_split(tmp_path_factory) -> tuple[Path, Path]:
    """Engel's households in two files: 180 to fit, 55 to test."""
    folder = tmp_path_factory.mktemp("engel")
    frame = pd.read_csv(ENGEL).sample(frac=1.0, random_state=3).reset_index(drop=True)
    frame.iloc[:180].to_csv(folder / "train.csv", index=False)
    frame.iloc[180:].to_csv(folder / "test.csv", index=False)
    return folder / "train.csv", folder / "test.csv"


def test_network_json_recording_and_model(tracker, capsys, engel_split, tmp_path):
    train, test = engel_split
    code = main(
        fit(
            "--data",
            str(train),
            "--column",
            "foodexp",
            "--family",
            "gamma",
            *NETWORK,
            "--test-data",
            str(test),
            "--json",
        )
    )
    assert code == 0
    result = last_json(capsys.readouterr().out)
    assert result["architecture"] == {"name": "mlp", "hidden": [8], "activation": "tanh", "dropout": 0.0,
                                      "weights": 1 * 8 + 8 + 8 * 2 + 2}  # fmt: skip
    assert result["network"] == {"terms": "log(income)", "outputs": ["concentration", "rate"]}
    assert 1 <= result["epochs"] <= 60 and result["epochs"] == result["steps"]
    assert result["k"] == result["architecture"]["weights"]

    # the oracle of the test NLL: scipy's gamma at the parameters predicted for the test rows
    assert main(["predict", "--run", result["run_id"], "--data", str(test), "--output", str(tmp_path / "p.csv")]) == 0
    predicted, rows = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(test)
    oracle = -stats.gamma.logpdf(rows["foodexp"], predicted["concentration"], scale=1 / predicted["rate"]).sum()
    assert result["test_nll"] == pytest.approx(oracle, rel=1e-9)
    assert result["test_mean_nll"] == pytest.approx(oracle / len(rows), rel=1e-9)

    client = tracker.client
    run = client.get_run(result["run_id"])
    params = run.data.params
    assert (params["network.hidden"], params["training.batch_size"], params["network.terms"]) == (
        "[8]",
        "32",
        "log(income)",
    )
    assert params["optimizer"] == "adam" and float(params["lr"]) == 1e-3 and params["n_validation"] == "36"
    epochs = result["epochs"] + 1
    for metric in ("nll", "val_mean_nll", "learning_rate", "grad_norm:output", "grad_norm:hidden.0"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == epochs, metric
    validation = [m.value for m in client.get_metric_history(run.info.run_id, "val_mean_nll")]
    # the weights kept are those of the best validation epoch
    assert result["validation_mean_nll"] == pytest.approx(min(validation), rel=1e-9)
    assert run.data.metrics["validation_mean_nll"] == pytest.approx(min(validation), rel=1e-9)
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"loss.png", "centiles.png", "pit.png", "residuals_qq.png", "worm.png"} <= plots

    # the logged MLflow model, loaded by mlflow.pyfunc in a process of its own, with the signature's columns
    probe = (
        "import json, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({tracker.uri!r})\n"
        f"model = mlflow.pyfunc.load_model('runs:/{result['run_id']}/model')\n"
        "print(json.dumps(model.metadata.get_input_schema().input_names()))\n"
        f"frame = pd.read_csv({str(test)!r})[['income']]\n"
        "print(model.predict(frame).to_json(orient='columns', double_precision=15))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    inputs, fresh = done.stdout.strip().splitlines()[-2:]
    assert json.loads(inputs) == ["income"]
    fresh = pd.DataFrame(json.loads(fresh))
    np.testing.assert_allclose(fresh[predicted.columns].to_numpy(), predicted.to_numpy(), rtol=1e-12)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-network")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"y": rng.normal(size=40), "x": rng.normal(size=40), "z": rng.normal(size=40)})
    frame.to_csv(folder / "d.csv", index=False)
    frame[["y", "z"]].to_csv(folder / "no_x.csv", index=False)
    return folder


BAD = [
    (["--network", "x + nowhere"], "column 'nowhere' not found in {d}/d.csv; columns: y, x, z"),
    (["--network", "x", "--batch-size", "0"], "training.batch_size: Input should be greater than 0"),
    (
        ["--network", "x", "--hidden", "64,x"],
        "hidden sizes are positive whole numbers like 64,64 (or none), got '64,x'",
    ),
    (["--network", "x", "--hidden", "64,-2"], "hidden sizes are positive whole numbers"),
    (["--network", "x", "--test-data", "{d}/no_x.csv"], "column 'x' not found in {d}/no_x.csv; columns: y, z"),
    (["--network", "x", "--test-data", "{d}/missing.csv"], "test data file not found: {d}/missing.csv"),
    (["--network", "x", "--fix", "loc=0", "--fix", "scale=1"], "no parameter of normal to output: every one is fixed"),
    (["--network", "loc ~ x", "--formula", "loc ~ z"], "loc has a formula and is an output of the network"),
    (["--network", "x", "--activation", "swish"], "unknown activation 'swish'; valid: relu, tanh, gelu"),
    (["--network", "x", "--architecture", "transformer"], "unknown network 'transformer'; valid: mlp"),
    (["--network", "x", "--validation", "1.5"], "training.validation: Input should be less than 1"),
    (["--batch-size", "16"], "--batch-size trains a network: give --network 'TERMS' too"),
    (["--network", "x", "--optimizer", "lbfgs", "--batch-size", "8"], "L-BFGS takes the whole data each step"),
    (["--network", "x", "--optimizer", "newton"], "newton fits distributions and regressions; a network trains with"),
]


@pytest.mark.parametrize("arguments, message", BAD, ids=[case[1][:40] for case in BAD])
def test_bad_network_input_is_one_line_exit_2_and_records_nothing(tracker, bad_data, capsys, arguments, message):
    given = [part.format(d=bad_data) for part in arguments]
    before = run_count(tracker)
    assert main(fit("--data", str(bad_data / "d.csv"), "--column", "y", "--family", "normal", *given)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("nllflow: error: ")
    assert message.format(d=bad_data) in captured.err
    assert run_count(tracker) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_network_on_cuda_without_cuda_is_refused(tracker, bad_data, capsys):
    arguments = ["fit", "--data", str(bad_data / "d.csv"), "--column", "y", "--family", "normal", "--network", "x"]
    assert main([*arguments, "--device", "cuda"]) == 2
    assert "device 'cuda' requested but CUDA is not available here; valid: auto, cpu" in capsys.readouterr().err


def test_test_data_for_a_constant_fit_and_a_regression_against_scipy(tracker, capsys, engel_split):
    train, test = engel_split
    rows = pd.read_csv(test)
    assert (
        main(
            fit(
                "--data", str(train), "--column", "foodexp", "--family", "lognormal", "--test-data", str(test), "--json"
            )
        )
        == 0
    )
    constant = last_json(capsys.readouterr().out)
    loc, scale = constant["params"]["loc"], constant["params"]["scale"]
    oracle = -stats.lognorm.logpdf(rows["foodexp"], scale, scale=np.exp(loc)).sum()
    assert constant["test_nll"] == pytest.approx(oracle, rel=1e-10)

    regression = ["--formula", "mean ~ log(income)", "--formula", "dispersion ~ log(income)"]
    assert main(fit("--data", str(train), "--column", "foodexp", "--family", "gamma", *regression,
                    "--test-data", str(test), "--json")) == 0  # fmt: skip
    fitted = last_json(capsys.readouterr().out)
    mean_coefficients, dispersion_coefficients = fitted["coefficients"]["mean"], fitted["coefficients"]["dispersion"]
    log_income = np.log(rows["income"])
    mean = np.exp(mean_coefficients["Intercept"] + mean_coefficients["log(income)"] * log_income)
    shape = 1 / np.exp(dispersion_coefficients["Intercept"] + dispersion_coefficients["log(income)"] * log_income)
    oracle = -stats.gamma.logpdf(rows["foodexp"], shape, scale=mean / shape).sum()
    assert fitted["test_nll"] == pytest.approx(oracle, rel=1e-9)
    assert fitted["test_mean_nll"] == pytest.approx(oracle / len(rows), rel=1e-9)


def test_a_network_sweep_ranks_its_children_by_validation_nll(tracker, capsys):
    spec = ROOT / "experiments" / "engel_network_lr_sweep.yaml"
    overrides = ["sweep.lr=[0.003, 0.03]", "sweep.hidden=[[4], [8, 8]]", "optimizer.max_steps=40", "device=cpu"]
    code = main(["run", str(spec), *[item for o in overrides for item in ("--set", o)], "--json"])
    assert code == 0
    summary = last_json(capsys.readouterr().out)
    runs = {row["run_name"]: row for row in summary["runs"]}
    assert set(runs) == {f"gamma adam lr={lr} hidden={hidden}" for lr in ("0.003", "0.03") for hidden in ("4", "8x8")}
    client = tracker.client
    validation = {name: client.get_run(row["run_id"]).data.metrics["validation_mean_nll"] for name, row in runs.items()}
    best = min(validation, key=validation.get)
    assert summary["best_run_id"] == runs[best]["run_id"]
    assert [runs[name]["rank"] for name in sorted(validation, key=validation.get)] == [1.0, 2.0, 3.0, 4.0]
    parent = client.get_run(summary["parent_run_id"])
    assert json.loads(parent.data.params["sweep.hidden"]) == [[4], [8, 8]]
    assert parent.data.params["sweep.rank_by"] == '"validation_mean_nll"'
    assert parent.data.metrics["best_validation_mean_nll"] == pytest.approx(validation[best], rel=1e-12)
    widths = {
        name: json.loads(client.get_run(row["run_id"]).data.params["network.hidden"]) for name, row in runs.items()
    }
    assert {name.split("hidden=")[1]: width for name, width in widths.items()} == {"4": [4], "8x8": [8, 8]}
