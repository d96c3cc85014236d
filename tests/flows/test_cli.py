"""The `nllflow` command: results against scipy, bad input refused in one line with exit 2 and
nothing recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nllflow.flows.cli import main

ROOT = Path(__file__).resolve().parents[2]
GROUNDBEEF = ROOT / "experiments" / "data" / "groundbeef.parquet"


def run_count(tracker) -> int:
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    return len(tracker.client.search_runs(experiments, max_results=10000)) if experiments else 0


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_fit_json_matches_the_closed_form_lognormal_mle(tracker, capsys):
    code = main(
        [
            "fit",
            "--data",
            str(GROUNDBEEF),
            "--column",
            "serving",
            "--family",
            "lognormal",
            "--json",
            "--experiment",
            "cli-test",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    result = last_json(capsys.readouterr().out)
    logs = np.log(pd.read_parquet(GROUNDBEEF)["serving"].to_numpy())
    assert result["params"]["loc"] == pytest.approx(logs.mean(), rel=1e-9)
    assert result["params"]["scale"] == pytest.approx(logs.std(), rel=1e-7)
    shape, _, scale = stats.lognorm.fit(np.exp(logs), floc=0)
    scipy_nll = -stats.lognorm.logpdf(np.exp(logs), shape, scale=scale).sum()
    assert result["nll"] <= scipy_nll + 1e-9 * abs(scipy_nll)
    assert result["n"] == 254 and result["converged"] is True
    assert result["stderr"]["loc"] == pytest.approx(logs.std() / np.sqrt(254), rel=1e-6)
    low, high = result["ci95"]["loc"]
    assert (high - low) / 2 == pytest.approx(1.959964 * result["stderr"]["loc"], rel=1e-6)
    assert result["aic"] == pytest.approx(2 * 2 + 2 * result["nll"])
    assert result["bic"] == pytest.approx(2 * np.log(254) + 2 * result["nll"])
    assert set(result["gof"]) == {"ks", "cvm", "ad"}
    assert result["gof"]["ks"] == pytest.approx(
        stats.kstest(
            np.exp(logs), stats.lognorm(result["params"]["scale"], scale=np.exp(result["params"]["loc"])).cdf
        ).statistic
    )
    assert tracker.client.get_run(result["run_id"]).info.status == "FINISHED"


def test_a_commands_plots_come_after_its_answer_and_match_the_ones_drawn_at_once(tracker, capsys):
    """`main` answers with a complete run, then renders its figures (nllflow.tracking.deferred):
    until then the run is tagged pending and has none; after, the same files as the API's own
    figures of the same fit, and the tag is gone."""
    from nllflow.flows.cli import run_in_process
    from nllflow.tracking import deferred
    from nllflow.tracking.recorder import PLOTS_PENDING_TAG

    arguments = ["fit", "--data", str(GROUNDBEEF), "--column", "serving", "--family", "gamma", "--json"]
    deferred.start()
    try:
        assert run_in_process([*arguments, "--experiment", "cli-deferred"]) == 0
        run_id = last_json(capsys.readouterr().out)["run_id"]
        answered = tracker.client.get_run(run_id)
        assert answered.info.status == "FINISHED" and answered.data.tags[PLOTS_PENDING_TAG] == "true"
        assert answered.data.metrics["nll"] > 0 and tracker.client.list_artifacts(run_id, "plots") == []
    finally:
        assert deferred.run_deferred() == []
    assert PLOTS_PENDING_TAG not in tracker.client.get_run(run_id).data.tags
    drawn = {Path(a.path).name for a in tracker.client.list_artifacts(run_id, "plots")}

    import nllflow

    fitted = nllflow.fit(pd.read_parquet(GROUNDBEEF)["serving"], "gamma")
    assert drawn == set(fitted.plot()) == {"loss.png", "density.png", "cdf.png", "pp.png", "qq.png"}
    # `main` renders them before it returns
    assert main([*arguments, "--experiment", "cli-at-once"]) == 0
    at_once = last_json(capsys.readouterr().out)["run_id"]
    assert {Path(a.path).name for a in tracker.client.list_artifacts(at_once, "plots")} == drawn


def test_fit_with_a_fixed_parameter(tracker, capsys):
    code = main(
        [
            "fit",
            "--data",
            str(GROUNDBEEF),
            "--column",
            "serving",
            "--family",
            "normal",
            "--fix",
            "scale=30",
            "--json",
            "--experiment",
            "cli-test",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    result = last_json(capsys.readouterr().out)
    assert result["params"]["scale"] == 30.0 and result["fixed"] == ["scale"]
    assert result["params"]["loc"] == pytest.approx(pd.read_parquet(GROUNDBEEF)["serving"].mean(), rel=1e-9)
    assert set(result["stderr"]) == {"loc"} and result["stderr"]["loc"] == pytest.approx(30 / np.sqrt(254), rel=1e-6)
    assert result["aic"] == pytest.approx(2 * 1 + 2 * result["nll"])


@pytest.fixture
def bad_files(tmp_path):
    pd.DataFrame(
        {"x": [1.0, 2.0, np.nan, np.inf, 3.0], "name": list("abcde"), "neg": [-1.0, 2, 3, 4, 5], "const": [2.0] * 5}
    ).to_csv(tmp_path / "bad.csv", index=False)
    pd.DataFrame({"x": pd.Series([], dtype=float)}).to_parquet(tmp_path / "empty.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    (tmp_path / "spec_unknown_key.yaml").write_text(
        "name: s\nfamily: normal\ncolour: red\ndata: {simulate: {params: {loc: 0, scale: 1}, n: 10}}\n"
    )
    (tmp_path / "spec_wrong_type.yaml").write_text(
        "name: s\nfamily: normal\noptimizer: {max_steps: many}\ndata: {simulate: {params: {loc: 0, scale: 1}, n: 10}}\n"
    )
    (tmp_path / "spec_family.yaml").write_text(
        "name: s\nfamily: gausian\ndata: {simulate: {params: {loc: 0, scale: 1}, n: 10}}\n"
    )
    (tmp_path / "spec_missing.yaml").write_text("name: s\nfamily: normal\ndata: {path: nowhere.csv, column: x}\n")
    return tmp_path


BAD_FITS = [
    (["--family", "gausian"], "unknown family 'gausian'; valid: beta, binomial"),
    (["--data", "{d}/nowhere.csv"], "data file not found"),
    (["--column", "y"], "column 'y' not found in {d}/bad.csv; columns: x, name, neg, const"),
    (["--column", "name"], "column 'name' in {d}/bad.csv is not numeric"),
    (["--column", "x"], "has 1 missing/NaN and 1 infinite value(s) out of 5"),
    (["--column", "neg", "--family", "gamma"], "1 of 5 values in {d}/bad.csv#neg are outside the support of gamma"),
    (["--column", "const"], "all 5 value(s) in {d}/bad.csv#const equal 2: a family cannot be fitted to constant data"),
    (["--data", "{d}/empty.parquet"], "column 'x' in {d}/empty.parquet is empty"),
    (["--data", "{d}/broken.parquet"], "cannot read {d}/broken.parquet as Parquet"),
    (["--column", "neg", "--fix", "scale=-1"], "fixed value scale=-1 is outside the parameter space of normal"),
    (
        ["--column", "neg", "--fix", "sigma=1"],
        "unknown parameter 'sigma' in the fixed values for normal; valid: loc, scale",
    ),
    (["--column", "neg", "--init", "loc=abc"], "--init 'loc=abc': value must be a number"),
    (["--column", "neg", "--lr", "0"], "argument --lr: must be a positive number, got '0'"),
    (["--column", "neg", "--lr", "-1e-3"], "argument --lr: must be a positive number, got '-1e-3'"),
    (["--column", "neg", "--lr", "fast"], "argument --lr: must be a positive number, got 'fast'"),
    (["--column", "neg", "--optimizer", "bfgs"], "invalid choice: 'bfgs'"),
]


@pytest.mark.parametrize("arguments, message", BAD_FITS, ids=[m[:40] for _, m in BAD_FITS])
def test_bad_fit_input_is_one_line_exit_2_and_records_nothing(tracker, bad_files, capsys, arguments, message):
    base = {"--data": f"{bad_files}/bad.csv", "--column": "x", "--family": "normal"}
    given = dict(zip(arguments[::2], arguments[1::2], strict=False))
    merged = {**base, **given}
    argv = ["fit"] + [f"{key}={value.format(d=bad_files)}" for key, value in merged.items()]
    before = run_count(tracker)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nllflow: error: ")
    assert message.format(d=bad_files) in lines[0]
    assert run_count(tracker) == before


BAD_SPECS = [
    ("spec_unknown_key.yaml", "at colour: unknown key 'colour'"),
    ("spec_wrong_type.yaml", "at optimizer.max_steps: Input should be a valid integer"),
    ("spec_family.yaml", "at family: unknown family 'gausian'"),
    ("spec_missing.yaml", "at data: data file not found: nowhere.csv"),
]


@pytest.mark.parametrize("name, message", BAD_SPECS)
def test_bad_spec_fails_before_any_run(tracker, bad_files, capsys, name, message):
    before = run_count(tracker)
    assert main(["run", str(bad_files / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(bad_files / name) in err[0]
    assert run_count(tracker) == before


def test_run_set_override_turns_a_spec_into_a_sweep(tracker, capsys):
    spec = ROOT / "experiments" / "studentt_heavy_tails.yaml"
    code = main(
        [
            "run",
            str(spec),
            "--set",
            "data.simulate.n=400",
            "--set",
            "optimizer.name=adam",
            "--set",
            "optimizer.max_steps=30",
            "--set",
            "sweep.lr=[0.01, 0.1]",
            "--json",
        ]
    )
    assert code == 0
    summary = last_json(capsys.readouterr().out)
    assert sorted(r["run_name"] for r in summary["runs"]) == ["studentt adam lr=0.01", "studentt adam lr=0.1"]
    assert all(r["steps"] == 30 for r in summary["runs"])


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "NLLFLOW_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    nllflow = Path(sys.executable).with_name("nllflow")
    done = subprocess.run(
        [str(nllflow), "fit", "--data", str(GROUNDBEEF), "--column", "serving", "--family", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "Traceback" not in done.stderr and "unknown family 'nope'" in done.stderr
    assert not (tmp_path / "m.db").exists()
