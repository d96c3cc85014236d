"""Ranking families (`nllflow compare`), censored and bootstrapped fits through the CLI, and their bad
input, under the real Prefect harness and MLflow store; results checked against scipy and against
what was recorded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nllflow.flows.cli import main
from nllflow.spec import ComparisonSpec
from nllflow.tracking.recorder import PARENT_TAG

ROOT = Path(__file__).resolve().parents[2]
GROUNDBEEF = ROOT / "experiments" / "data" / "groundbeef.parquet"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCIPY = {
    "gamma": lambda p: stats.gamma(p["concentration"], scale=1 / p["rate"]),
    "lognormal": lambda p: stats.lognorm(p["scale"], scale=math.exp(p["loc"])),
    "weibull": lambda p: stats.weibull_min(p["concentration"], scale=p["scale"]),
    "normal": lambda p: stats.norm(p["loc"], p["scale"]),
}


def last_json(text: str):
    return json.loads(text.strip().splitlines()[-1])


def run_count(tracker) -> int:
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    return len(tracker.client.search_runs(experiments, max_results=10000)) if experiments else 0


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    shape = matplotlib.image.imread(path).shape
    assert len(shape) == 3 and min(shape[:2]) > 100


@pytest.mark.parametrize("truth", ["gamma", "weibull"])
def test_compare_ranks_by_aic_and_picks_the_generating_family(tracker, tmp_path, truth):
    from nllflow.flows.compare import compare

    generating = {"gamma": stats.gamma(2.0, scale=1.5), "weibull": stats.weibull_min(0.8, scale=2.0)}[truth]
    x = generating.rvs(size=800, random_state=np.random.default_rng(21))
    pd.DataFrame({"x": x}).to_csv(tmp_path / "x.csv", index=False)
    families = ["gamma", "lognormal", "weibull", "normal"]
    spec = ComparisonSpec(name="test-compare", families=families, data={"path": str(tmp_path / "x.csv"), "column": "x"})
    summary = compare(spec)
    ranking = summary["ranking"]
    assert summary["best_family"] == truth and not summary["failed"]
    assert [row["rank"] for row in ranking] == [1, 2, 3, 4] and sorted(row["family"] for row in ranking) == sorted(
        families
    )
    assert [row["aic"] for row in ranking] == sorted(row["aic"] for row in ranking) and ranking[0]["delta_aic"] == 0
    for row in ranking:
        frozen = SCIPY[row["family"]](row["params"])
        nll = -frozen.logpdf(x).sum()
        assert row["aic"] == pytest.approx(2 * 2 + 2 * nll, rel=1e-10)
        assert row["bic"] == pytest.approx(2 * math.log(800) + 2 * nll, rel=1e-10)
        assert row["ks"] == pytest.approx(stats.kstest(x, frozen.cdf).statistic, rel=1e-8)

    parent = tracker.client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["best_run"] == ranking[0]["run_id"]
    children = tracker.client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert sorted(child.info.run_name for child in children) == sorted(families)
    table = pd.read_parquet(tracker.client.download_artifacts(parent.info.run_id, "comparison.parquet", str(tmp_path)))
    assert list(table["run_name"]) == [row["family"] for row in ranking]
    np.testing.assert_allclose(table["aic"], [row["aic"] for row in ranking], rtol=1e-12)
    plots = Path(tracker.client.download_artifacts(parent.info.run_id, "plots", str(tmp_path)))
    assert {p.name for p in plots.iterdir()} == {"density.png", "cdf.png", "pp.png", "qq.png"}
    for path in plots.iterdir():
        assert_png(path)


def test_compare_cli_with_a_group_prints_the_ranking_as_json_and_writes_the_plots(tracker, tmp_path, capsys):
    code = main(
        [
            "compare",
            "--data",
            str(GROUNDBEEF),
            "--column",
            "serving",
            "--families",
            "continuous",
            "--json",
            "--plots",
            str(tmp_path / "plots"),
            "--device",
            "cpu",
            "--experiment",
            "cli-compare",
        ]
    )
    assert code == 0
    ranking = last_json(capsys.readouterr().out)
    assert isinstance(ranking, list)
    fitted = {row["family"] for row in ranking}
    # every continuous family with scalar parameters whose support holds positive data above 1
    assert fitted == {
        "normal",
        "studentt",
        "laplace",
        "cauchy",
        "gumbel",
        "lognormal",
        "gamma",
        "exponential",
        "weibull",
        "halfnormal",
        "halfcauchy",
        "pareto",
        "uniform",
        "triangular",
    }
    finished = [row for row in ranking if row["status"] == "FINISHED"]
    assert [row["rank"] for row in finished] == list(range(1, len(finished) + 1)) and len(finished) >= 12
    serving = pd.read_parquet(GROUNDBEEF)["serving"].to_numpy()
    best = finished[0]
    assert best["aic"] == min(row["aic"] for row in finished)
    lognormal = next(row for row in finished if row["family"] == "lognormal")
    assert lognormal["params"]["loc"] == pytest.approx(np.log(serving).mean(), rel=1e-9)
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"density.png", "cdf.png", "pp.png", "qq.png"}
    for name in ("lognormal", "gamma"):
        assert {p.name for p in (tmp_path / "plots" / name).glob("*.png")} == {
            "loss.png",
            "density.png",
            "cdf.png",
            "pp.png",
            "qq.png",
        }
    assert_png(tmp_path / "plots" / "qq.png")


def test_censored_fit_with_bootstrap_and_plots_through_the_cli(tracker, shared_data, tmp_path, capsys):
    code = main(
        [
            "fit",
            "--data",
            str(shared_data / "smokedfish.csv"),
            "--censored",
            "left,right",
            "--family",
            "lognormal",
            "--bootstrap",
            "60",
            "--bootstrap-seed",
            "3",
            "--plots",
            str(tmp_path / "plots"),
            "--json",
            "--device",
            "cpu",
            "--experiment",
            "cli-censored",
        ]
    )
    assert code == 0
    result = last_json(capsys.readouterr().out)
    assert result["n"] == 103 and result["converged"] and result["gof"] == {}
    assert result["params"]["loc"] == pytest.approx(-3.6280, abs=1e-3)  # fitdistrplus: meanlog -3.63, sdlog 3.54
    assert result["params"]["scale"] == pytest.approx(3.5447, abs=1e-3)
    boot = result["bootstrap"]
    assert boot["kind"] == "nonparametric" and boot["replicates"] == 60 and boot["converged"] == 60
    for label in ("loc", "scale"):
        low, high = boot["intervals"][label]
        assert low < result["params"][label] < high
        # a percentile interval about as wide as the Wald one
        assert 0.5 < (high - low) / (2 * 1.96 * result["stderr"][label]) < 2
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"loss.png", "cdf.png"}
    assert_png(tmp_path / "plots" / "cdf.png")
    estimates = pd.read_parquet(tracker.client.download_artifacts(result["run_id"], "bootstrap.parquet", str(tmp_path)))
    assert len(estimates) == 60 and np.quantile(estimates["loc"], 0.025) == pytest.approx(boot["intervals"]["loc"][0])
    table = pd.read_parquet(tracker.client.download_artifacts(result["run_id"], "fit.parquet", str(tmp_path)))
    assert list(table["bootstrap_low"]) == pytest.approx([boot["intervals"][k][0] for k in table["parameter"]])


def test_parametric_bootstrap_gives_gof_pvalues_through_the_cli(tracker, capsys):
    code = main(
        [
            "fit",
            "--data",
            str(GROUNDBEEF),
            "--column",
            "serving",
            "--family",
            "lognormal",
            "--bootstrap",
            "50",
            "--bootstrap-kind",
            "parametric",
            "--json",
            "--device",
            "cpu",
            "--experiment",
            "cli-gof",
        ]
    )
    assert code == 0
    result = last_json(capsys.readouterr().out)
    pvalues = result["bootstrap"]["gof_pvalue"]
    assert set(pvalues) == {"ks", "cvm", "ad"} and all(1 / 51 <= p <= 1 for p in pvalues.values())
    run = tracker.client.get_run(result["run_id"])
    assert run.data.metrics["gof_pvalue_ks"] == pvalues["ks"]


@pytest.fixture
def files(tmp_path):
    pd.DataFrame({"l": [1.0, np.nan, 3.0], "r": [1.0, 2.0, np.nan], "k": [1.0, 2.0, 3.0]}).to_csv(
        tmp_path / "c.csv", index=False
    )
    return tmp_path


BAD = [
    (["compare", "--column", "serving", "--families", "gausian,gamma"], "unknown family 'gausian'"),
    (["compare", "--column", "serving", "--families", "beta"], "values in {g}#serving are outside the support of beta"),
    (["compare", "--column", "serving", "--families", "continuous,normal"], "the group 'continuous' cannot be mixed"),
    (
        ["fit", "--column", "serving", "--family", "pareto", "--bootstrap", "20"],
        "no bootstrap for pareto with scale free",
    ),
    (
        ["fit", "--column", "serving", "--family", "gamma", "--bootstrap", "1"],
        "at bootstrap.replicates: Input should be greater",
    ),
    (["fit", "--family", "gamma"], "give --column COL, or --censored LEFT,RIGHT"),
    (["fit", "--data", "{f}/c.csv", "--censored", "l", "--family", "gamma"], "censored needs two different columns"),
    (
        ["fit", "--data", "{f}/c.csv", "--censored", "l,r", "--family", "poisson"],
        "censored rows, which need a continuous family",
    ),
    (
        [
            "fit",
            "--data",
            "{f}/c.csv",
            "--censored",
            "l,r",
            "--family",
            "gamma",
            "--bootstrap",
            "10",
            "--bootstrap-kind",
            "parametric",
        ],
        "parametric bootstrap of censored data",
    ),
]


@pytest.mark.parametrize("arguments, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_is_one_line_exit_2_and_records_nothing(tracker, files, capsys, arguments, message):
    argv = [a.format(f=files) for a in arguments]
    if "--data" not in argv:
        argv[1:1] = ["--data", str(GROUNDBEEF)]
    before = run_count(tracker)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("nllflow: error: ")
    assert message.format(g=GROUNDBEEF) in lines[0]
    assert run_count(tracker) == before
