"""The Python API (`import nllflow`) against the CLI for the same fit: the same numbers as
`nllflow fit --json`, `summary()` as `nllflow fit` prints it, the same `InputError` messages,
the same MLflow run from `record()`; data as a path, a NumPy array, a pandas Series or DataFrame,
a torch tensor or a list; and against scipy."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import nllflow
from nllflow.errors import ConvergenceWarning, InputError
from nllflow.flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
GROUNDBEEF = ROOT / "experiments" / "data" / "groundbeef.parquet"
SMOKEDFISH = ROOT / "experiments" / "data" / "smokedfish.csv"
# what only the CLI's flow adds to a fit's JSON: where and how it ran
RUN_KEYS = {"run_id", "experiment", "experiment_id", "tracking_uri", "device", "dtype", "timings"}
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def serving() -> np.ndarray:
    return pd.read_parquet(GROUNDBEEF)["serving"].to_numpy()


def test_import_nllflow_loads_nothing_heavy_until_the_api_is_used():
    probe = (
        "import json, sys\n"
        "import nllflow\n"
        "before = [m for m in ('torch', 'scipy', 'mlflow', 'prefect', 'nllflow.api') if m in sys.modules]\n"
        "names = sorted(n for n in dir(nllflow) if not n.startswith('_'))\n"
        "callable_fit = callable(nllflow.fit)\n"
        "print(json.dumps({'before': before, 'names': names, 'fit': callable_fit,"
        " 'prefect_after': 'prefect' in sys.modules, 'mlflow_after': 'mlflow' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] == []
    assert {"fit", "compare", "sweep", "load_spec", "Fit", "Comparison", "Sweep"} <= set(result["names"])
    assert result["fit"] is True
    # fitting needs neither Prefect nor MLflow: they load when a flow runs or a fit is recorded
    assert result["prefect_after"] is False and result["mlflow_after"] is False
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        nllflow.fitt  # noqa: B018


@pytest.fixture(scope="module")
def cli_gamma(tracker_module):
    """`nllflow fit --json` and the plain table for gamma on groundbeef (two CLI runs)."""
    argv = ["fit", "--data", str(GROUNDBEEF), "--column", "serving", "--family", "gamma", "--experiment", "api-test"]
    runs = {}
    for mode in ("json", "text"):
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(argv + (["--json"] if mode == "json" else []))
        assert code == 0
        runs[mode] = out.getvalue()
    return json.loads(runs["json"].strip().splitlines()[-1]), runs["text"]


@pytest.fixture(scope="module")
def tracker_module(prefect_harness):
    from nllflow.tracking.recorder import Tracker

    return Tracker()


DATA_FORMS = {
    "path": lambda: (str(GROUNDBEEF), {"column": "serving"}),
    "ndarray": lambda: (serving(), {}),
    "list": lambda: (serving().tolist(), {}),
    "series": lambda: (pd.read_parquet(GROUNDBEEF)["serving"], {}),
    "dataframe": lambda: (pd.read_parquet(GROUNDBEEF).assign(other=1.0), {"column": "serving"}),
    "one-column dataframe": lambda: (pd.read_parquet(GROUNDBEEF)[["serving"]], {}),
    "tensor": lambda: (torch.tensor(serving()), {}),
}


@pytest.mark.parametrize("form", DATA_FORMS)
def test_fit_gives_the_cli_json_numbers_for_every_form_of_data(cli_gamma, form):
    expected, _ = cli_gamma
    data, options = DATA_FORMS[form]()
    fit = nllflow.fit(data, "gamma", **options)
    # the whole JSON contract, number for number
    assert fit.to_dict() == {k: v for k, v in expected.items() if k not in RUN_KEYS}
    assert fit.params == expected["params"] and fit.nll == expected["nll"]
    assert fit.stderr == expected["stderr"] and fit.aic == expected["aic"] and fit.bic == expected["bic"]
    assert {k: list(v) for k, v in fit.ci95.items()} == expected["ci95"]
    assert fit.gof == expected["gof"] and fit.steps == expected["steps"] and fit.n == expected["n"] == 254
    # and scipy's MLE (location fixed at 0) for the same data
    shape, _, scale = stats.gamma.fit(serving(), floc=0)
    assert fit.params["concentration"] == pytest.approx(shape, rel=1e-5)
    assert fit.params["rate"] == pytest.approx(1 / scale, rel=1e-5)
    assert fit.nll == pytest.approx(-stats.gamma.logpdf(serving(), shape, scale=scale).sum(), rel=1e-10)


def test_summary_is_the_table_the_cli_prints(cli_gamma, tracker_module):
    expected, printed = cli_gamma
    fit = nllflow.fit(GROUNDBEEF, "gamma", column="serving", experiment="api-test")
    lines = printed.strip().splitlines()
    # the CLI's fit was recorded: it adds where (two lines)
    assert fit.summary() == "\n".join(lines[:-2])
    run_id = fit.record()
    assert RUN_ID.sub("<run>", fit.summary()) == RUN_ID.sub("<run>", printed.strip())
    experiment = tracker_module.client.get_experiment_by_name("api-test")
    assert f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning" in lines[-1]
    assert run_id != expected["run_id"]


def test_record_writes_the_run_the_cli_writes(cli_gamma, tracker_module):
    expected, _ = cli_gamma
    client = tracker_module.client
    fit = nllflow.fit(serving(), "gamma", experiment="api-record")
    assert fit.run_id is None
    run_id = fit.record()
    assert fit.record() == run_id == fit.run_id  # recording twice is one run
    experiment = client.get_experiment_by_name("api-record")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    run, cli_run = client.get_run(run_id), client.get_run(expected["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.source.name"] == "nllflow.fit"
    # the same metrics as the CLI's run of the same fit, and the same params but for the data's source
    assert run.data.metrics == cli_run.data.metrics
    differs = {"spec", "data.source", "device"}
    assert {k: v for k, v in run.data.params.items() if k not in differs} == {
        k: v for k, v in cli_run.data.params.items() if k not in differs
    }
    assert run.data.metrics["nll"] == fit.nll and run.data.metrics["aic"] == fit.aic
    history = client.get_metric_history(run_id, "nll")
    assert [m.step for m in history] == list(range(fit.steps + 1)) and history[-1].value == fit.nll
    (dataset,) = run.inputs.dataset_inputs
    digest = hashlib.sha256(np.ascontiguousarray(serving(), dtype=np.float64).tobytes()).hexdigest()[:16]
    assert dataset.dataset.digest == digest == cli_run.inputs.dataset_inputs[0].dataset.digest
    assert dataset.dataset.name == "NumPy array" and json.loads(dataset.dataset.source) == {"memory": "NumPy array"}
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"trace.parquet", "fit.parquet", "spec.yaml", "plots"} <= artifacts


def test_record_true_records_at_once(tracker_module):
    fit = nllflow.fit(serving(), "lognormal", record=True, experiment="api-record-now")
    run = tracker_module.client.get_run(fit.run_id)
    logs = np.log(serving())
    assert run.data.metrics["estimate.loc"] == pytest.approx(logs.mean(), rel=1e-9)
    assert run.data.metrics["estimate.scale"] == pytest.approx(logs.std(), rel=1e-7)


@pytest.fixture
def bad_csv(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"values": [1.0, 2.0, np.nan, 4.0, 5.0], "neg": [-1.0, 2, 3, 4, 5], "const": [2.0] * 5}).to_csv(
        path, index=False
    )
    return path


# (CLI arguments over --data bad.csv --column neg --family normal, the same as API keywords)
BAD_INPUT = {
    "unknown family": (["--family", "gausian"], {"family": "gausian"}),
    "missing file": (["--data", "{d}/nowhere.csv"], {"data": "{d}/nowhere.csv"}),
    "unknown column": (["--column", "y"], {"column": "y"}),
    "missing values": (["--column", "values"], {"column": "values"}),
    "outside the support": (["--family", "gamma"], {"family": "gamma"}),
    "constant": (["--column", "const"], {"column": "const"}),
    "fixed outside": (["--fix", "scale=-1"], {"fix": {"scale": -1}}),
    "unknown fixed": (["--fix", "sigma=1"], {"fix": {"sigma": 1}}),
    "init outside": (["--init", "scale=0"], {"init": {"scale": 0}}),
    "unknown optimizer": (["--optimizer", "bfgs"], {"optimizer": "bfgs"}),
    "bad bootstrap": (["--bootstrap", "1"], {"bootstrap": 1}),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_the_clis_input_error(bad_csv, capsys, case):
    arguments, keywords = BAD_INPUT[case]
    folder = str(bad_csv.parent)
    given = {"--data": str(bad_csv), "--column": "neg", "--family": "normal"}
    given.update(dict(zip(arguments[::2], arguments[1::2], strict=True)))
    argv = ["fit"] + [f"{k}={v.format(d=folder)}" for k, v in given.items()]
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    options = {"data": str(bad_csv), "column": "neg", "family": "normal"}
    options.update({k: v.format(d=folder) if isinstance(v, str) else v for k, v in keywords.items()})
    data, family = options.pop("data"), options.pop("family")
    with pytest.raises(InputError) as raised:
        nllflow.fit(data, family, **options)
    message = str(raised.value)
    if case == "unknown optimizer":  # argparse's choices and the spec's literal say it in their own words
        assert "invalid choice: 'bfgs'" in line and "optimizer.name" in message and "'lbfgs'" in message
        return
    assert line == f"nllflow: error: {message}"
    assert "\n" not in message


IN_MEMORY_BAD = {
    "missing values": ("values", np.array([1.0, 2.0, np.nan, 4.0, 5.0]), "normal"),
    "outside the support": ("neg", np.array([-1.0, 2, 3, 4, 5]), "gamma"),
    "constant": ("const", np.full(5, 2.0), "normal"),
}


@pytest.mark.parametrize("case", IN_MEMORY_BAD)
def test_data_in_memory_is_refused_with_the_messages_of_a_file(bad_csv, capsys, case):
    column, values, family = IN_MEMORY_BAD[case]
    code, _, err = cli(capsys, "fit", "--data", str(bad_csv), "--column", column, "--family", family)
    assert code == 2
    expected = err.strip().removeprefix("nllflow: error: ")
    for data, where, source in [
        (values, "the NumPy array", "NumPy array"),
        (torch.as_tensor(values), "the torch tensor", "torch tensor"),
        (pd.DataFrame({column: values}), "the DataFrame", f"DataFrame column {column!r}"),
    ]:
        with pytest.raises(InputError) as raised:
            nllflow.fit(data, family, **({"column": column} if isinstance(data, pd.DataFrame) else {}))
        named = expected.replace(f"{bad_csv}#{column}", source).replace(str(bad_csv), where)
        if not isinstance(data, pd.DataFrame):
            named = named.replace(f"column {column!r}", "column 'values'")
        assert str(raised.value) == named


@pytest.mark.parametrize(
    "data, options, message",
    [
        (np.ones((3, 2)), {}, "data must be one-dimensional, got a NumPy array of shape (3, 2)"),
        (pd.DataFrame({"a": [1.0, 2], "b": [3.0, 4]}), {}, "the DataFrame has 2 columns (a, b): name one with column="),
        (pd.DataFrame({"a": [1.0, 2]}), {"column": "b"}, "column 'b' not found in the DataFrame; columns: a"),
        (np.arange(1.0, 5), {"column": "x"}, "column=, censored= and formulas name columns of a DataFrame"),
        (np.arange(1.0, 5), {"weights": [1, 2]}, "weights has 2 values for 4 data values"),
        (np.arange(1.0, 5), {"weights": [1, -2, 1, 1]}, "weights column 'weights' in the NumPy array has negative"),
        (
            np.arange(1.0, 5),
            {"formulas": {"loc": "x"}},
            "column=, censored= and formulas name columns of a DataFrame; the data are a ndarray",
        ),
        (np.arange(1.0, 5), {"lr": -1.0}, "invalid arguments at optimizer.lr: Input should be greater than 0"),
    ],
)
def test_data_in_memory_that_is_not_a_sample_is_an_input_error(data, options, message):
    with pytest.raises(InputError) as raised:
        nllflow.fit(data, "normal", **options)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_censored_and_weighted_data_in_memory_fit_as_from_a_file():
    from_file = nllflow.fit(SMOKEDFISH, "lognormal", censored=("left", "right"))
    frame = pd.read_csv(SMOKEDFISH)
    in_memory = nllflow.fit(frame, "lognormal", censored=("left", "right"))
    assert in_memory.to_dict() == from_file.to_dict()
    assert from_file.params == pytest.approx({"loc": -3.63, "scale": 3.54}, abs=5e-3)  # fitdistrplus's estimates
    # frequency weights: the fit of the sample with each row repeated by its weight
    values = np.array([0.5, 1.2, 2.0, 3.1, 4.4, 6.0])
    weights = np.array([3, 1, 4, 1, 5, 2])
    weighted = nllflow.fit(values, "gamma", weights=weights)
    expanded = np.repeat(values, weights)
    shape, _, scale = stats.gamma.fit(expanded, floc=0)
    assert weighted.params["concentration"] == pytest.approx(shape, rel=1e-5)
    assert weighted.params["rate"] == pytest.approx(1 / scale, rel=1e-5)
    assert weighted.n == len(expanded)
    frame = pd.DataFrame({"x": values, "w": weights})
    assert nllflow.fit(frame, "gamma", column="x", weights="w").to_dict() == weighted.to_dict()


def test_trace_to_frame_and_plot_agree_with_scipy():
    x = stats.gamma(2.5, scale=1 / 1.5).rvs(size=600, random_state=np.random.default_rng(3))
    fit = nllflow.fit(x, "gamma", optimizer="adam", lr=0.05, max_steps=300, init={"concentration": 1.0, "rate": 1.0})
    trace = fit.trace
    assert len(trace) == fit.steps + 1 and list(trace["step"]) == list(range(fit.steps + 1))
    a, rate = fit.params["concentration"], fit.params["rate"]
    assert trace["nll"].iloc[-1] == fit.nll == pytest.approx(-stats.gamma.logpdf(x, a, scale=1 / rate).sum())
    frame = fit.to_frame().set_index("parameter")
    for label in ("concentration", "rate"):
        assert frame.loc[label, "estimate"] == fit.params[label] and frame.loc[label, "stderr"] == fit.stderr[label]
        assert (frame.loc[label, "ci95_low"], frame.loc[label, "ci95_high"]) == fit.ci95[label]
        low, high = fit.ci95[label]
        assert (high - low) / 2 == pytest.approx(stats.norm.ppf(0.975) * fit.stderr[label], rel=1e-9)
    figures = fit.plot()
    assert set(figures) == {"loss.png", "density.png", "cdf.png", "pp.png", "qq.png"}
    (line,) = figures["density.png"].axes[0].get_lines()
    grid, density = line.get_data()
    inside = grid > 0  # the grid reaches below the support, where nothing is drawn
    assert inside.sum() > 50 and np.isnan(density[~inside]).all()
    np.testing.assert_allclose(density[inside], stats.gamma.pdf(grid[inside], a, scale=1 / rate), rtol=1e-9)
    (loss,) = figures["loss.png"].axes[0].get_lines()
    np.testing.assert_array_equal(loss.get_ydata(), trace["nll"].to_numpy())
    for figure in figures.values():
        plt.close(figure)


def test_a_fit_that_does_not_converge_warns_and_says_so():
    x = stats.norm(3, 2).rvs(size=200, random_state=np.random.default_rng(5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fit = nllflow.fit(x, "normal", optimizer="adam", lr=0.001, max_steps=5, init={"loc": 0.0, "scale": 1.0})
    assert fit.converged is False and fit.steps == 5 and "max steps" in fit.reason
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught)


def test_compare_and_sweep_are_the_clis(tracker_module, capsys, tmp_path):
    code, printed, _ = cli(
        capsys, "compare", "--data", str(GROUNDBEEF), "--column", "serving", "--families", "gamma,lognormal"
    )
    assert code == 0
    # the same data handed over in memory: written once to nllflow's home for the flow's fits
    comparison = nllflow.compare(pd.read_parquet(GROUNDBEEF)["serving"], "gamma,lognormal")
    assert RUN_ID.sub("<run>", comparison.summary()) == RUN_ID.sub("<run>", printed.strip())
    assert comparison.best_family == "gamma" and list(comparison.ranking["family"]) == ["gamma", "lognormal"]
    for row in comparison.ranking.itertuples():
        fit = nllflow.fit(serving(), row.family)
        assert row.aic == pytest.approx(fit.aic, rel=1e-12) and row.params == pytest.approx(fit.params, rel=1e-9)

    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        "name: api-sweep\nfamily: normal\n"
        "data: {simulate: {params: {loc: 1.0, scale: 2.0}, n: 300, seed: 4}}\n"
        "init: {loc: 0.0, scale: 1.0}\noptimizer: {name: adam, max_steps: 60}\nsweep: {lr: [0.01, 0.1]}\ndevice: cpu\n"
    )
    code, printed, _ = cli(capsys, "run", str(spec))
    assert code == 0
    swept = nllflow.sweep(nllflow.load_spec(spec))
    assert RUN_ID.sub("<run>", swept.summary()) == RUN_ID.sub("<run>", printed.strip())
    children = tracker_module.children(swept.parent_run_id)
    recorded = {child.info.run_name: child.data.metrics["nll"] for child in children}
    assert dict(zip(swept.table["run_name"], swept.table["nll"], strict=True)) == recorded
    assert set(recorded) == {"normal adam lr=0.01", "normal adam lr=0.1"}
    assert swept.best_run_id == min(children, key=lambda c: c.data.metrics["nll"]).info.run_id


def test_a_network_fitted_in_memory_is_the_network_fitted_from_files(tmp_path):
    """`nllflow.fit(frame, network=..., test_data=frame)` trains the network the pipeline trains on the
    same rows in files (same seed, same trace), its test NLL is scipy's at the predicted parameters,
    and `predict` gives them."""
    generator = np.random.default_rng(4)
    frame = pd.DataFrame({"x": generator.uniform(-2, 2, 600)})
    frame["y"] = np.sin(2 * frame["x"]) + 0.4 * generator.standard_normal(600)
    train, test = frame.iloc[:450].reset_index(drop=True), frame.iloc[450:].reset_index(drop=True)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    options = {
        "column": "y",
        "network": {"terms": "x", "hidden": [8], "activation": "tanh"},
        "training": {"batch_size": 64, "seed": 3},
        "lr": 0.01,
        "max_steps": 40,
        "device": "cpu",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        in_memory = nllflow.fit(train, "normal", test_data=test, **options)
        from_files = nllflow.fit(tmp_path / "train.csv", "normal", test_data=tmp_path / "test.csv", **options)
        mixed = nllflow.fit(train, "normal", test_data=tmp_path / "test.csv", **options)
    pd.testing.assert_frame_equal(in_memory.trace, from_files.trace)
    predicted = in_memory.predict(test, quantiles=[0.5])
    oracle = -stats.norm.logpdf(test["y"], predicted["loc"], predicted["scale"]).mean()
    for fitted in (in_memory, from_files, mixed):
        assert fitted.test_mean_nll == pytest.approx(oracle, rel=1e-10)
    np.testing.assert_allclose(predicted["q0.5"], predicted["loc"], rtol=1e-9)
    assert in_memory.validation_mean_nll == pytest.approx(in_memory.to_dict()["validation_mean_nll"])
    with pytest.raises(InputError, match="predicts the same distribution for every row"):
        nllflow.fit(train, "normal", column="y").predict(test)
