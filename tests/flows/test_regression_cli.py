"""`nllflow fit --formula` and `nllflow predict`: the JSON contract against statsmodels, the coefficient
tables, bad input refused in one line (exit 2, nothing recorded), hostile formulas never executed,
and the MLflow model of a regression run predicting the fit's own numbers in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from statsmodels.discrete.discrete_model import NegativeBinomial

from nllflow.flows.cli import main

ROOT = Path(__file__).resolve().parents[2]
RANDHIE = ROOT / "experiments" / "data" / "randhie.parquet"
ENGEL = ROOT / "experiments" / "data" / "engel.csv"
TERMS = "lncoins + idp + lpi + fmde + physlm + disea + hlthg + hlthf + hlthp"


def run_count(tracker) -> int:
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    return len(tracker.client.search_runs(experiments, max_results=10000)) if experiments else 0


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def fit(*arguments: str) -> list[str]:
    return ["fit", "--experiment", "cli-regression", "--device", "cpu", *arguments]


def test_fit_json_adds_coefficients_stderr_and_deviance_matching_statsmodels(tracker, capsys):
    code = main(
        fit(
            "--data",
            str(RANDHIE),
            "--column",
            "mdvis",
            "--family",
            "negativebinomial",
            "--formula",
            f"mean ~ {TERMS}",
            "--json",
        )
    )
    assert code == 0
    result = last_json(capsys.readouterr().out)
    oracle = NegativeBinomial.from_formula(f"mdvis ~ {TERMS}", pd.read_parquet(RANDHIE), loglike_method="nb2").fit(
        method="newton", tol=1e-12, disp=0
    )
    assert result["nll"] <= -oracle.llf + 1e-9 * abs(oracle.llf)
    assert result["deviance"] == pytest.approx(2 * result["nll"], rel=1e-12)
    assert set(result["coefficients"]) == {"mean"} and set(result["params"]) == {"dispersion"}
    for term, value in oracle.params.iloc[:-1].items():
        assert result["coefficients"]["mean"][term] == pytest.approx(value, rel=1e-4)
        assert result["coef_stderr"]["mean"][term] == pytest.approx(oracle.bse[term], rel=1e-3)
    assert result["params"]["dispersion"] == pytest.approx(oracle.params["alpha"], rel=1e-4)
    assert result["aic"] == pytest.approx(2 * 11 + 2 * result["nll"], rel=1e-12)
    run = tracker.client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    # the per-step trace of every coefficient, under metric names MLflow accepts
    history = tracker.client.get_metric_history(run.info.run_id, "mean:lncoins")
    assert len(history) == result["steps"] + 1
    assert history[-1].value == pytest.approx(result["coefficients"]["mean"]["lncoins"], rel=1e-12)
    artifacts = {a.path for a in tracker.client.list_artifacts(run.info.run_id)}
    assert {"fit.parquet", "trace.parquet", "residuals.parquet", "model", "plots"} <= artifacts


def test_readable_output_prints_one_coefficient_table_per_parameter(tracker, capsys):
    code = main(
        fit(
            "--data",
            str(ENGEL),
            "--column",
            "foodexp",
            "--family",
            "gamma",
            "--formula",
            "mean ~ log(income)",
            "--formula",
            "dispersion ~ log(income)",
        )
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "mean ~ log(income)   (link: log)" in out and "dispersion ~ log(income)   (link: log)" in out
    assert out.count("Intercept") == 2 and "global deviance" in out


def test_a_categorical_and_a_probit_link(tracker, capsys, tmp_path):
    data = sm.datasets.spector.load_pandas().data.assign(group=lambda d: np.where(d["PSI"] > 0, "psi", "none"))
    path = tmp_path / "spector.csv"
    data.to_csv(path, index=False)
    code = main(
        fit(
            "--data",
            str(path),
            "--column",
            "GRADE",
            "--family",
            "binomial",
            "--fix",
            "total_count=1",
            "--formula",
            "probs ~ GPA + TUCE + C(group)",
            "--link",
            "probs=probit",
            "--json",
        )
    )
    assert code == 0
    result = last_json(capsys.readouterr().out)
    glm = sm.GLM.from_formula(
        "GRADE ~ GPA + TUCE + C(group)", data, family=sm.families.Binomial(link=sm.families.links.Probit())
    )
    oracle = glm.fit(method="newton", tol=1e-12)
    assert result["links"] == {"probs": "probit"}
    for term, value in oracle.params.items():
        assert result["coefficients"]["probs"][term] == pytest.approx(value, rel=1e-4)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-regression")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"y": rng.gamma(2.0, 1.0, 30), "x": rng.normal(size=30), "one": "a", "text": "word", "gap": rng.normal(size=30)}
    )
    frame.loc[[3, 7], "gap"] = np.nan
    frame.to_csv(folder / "d.csv", index=False)
    frame.head(3).to_csv(folder / "tiny.csv", index=False)
    return folder


BAD = [
    (["--formula", "shape ~ x"], "'shape' is not a parameter of gamma; valid: concentration, rate or mean, dispersion"),
    (["--formula", "mean ~ nowhere"], "column 'nowhere' not found in {d}/d.csv; columns: y, x, one, text, gap"),
    (["--column", "text", "--formula", "mean ~ x"], "column 'text' in"),
    (["--formula", "mean ~ C(one)"], "a categorical with a single level cannot be estimated"),
    (["--formula", "mean ~ x", "--link", "mean=identity"], "link 'identity' could take mean outside"),
    (["--formula", "mean ~ x", "--link", "mean=loglog"], "unknown link 'loglog' for mean; valid: log"),
    (["--formula", "mean ~ x", "--fix", "mean=2"], "mean is fixed (--fix) and has a formula"),
    (["--formula", "mean ~ gap"], "column 'gap' in {d}/d.csv has 2 missing value(s) (first at row 3)"),
    (["--formula", "mean ~ x", "--formula", "concentration ~ x"], "are not parameters of one parametrisation"),
    (["--formula", "mean ~ x + I(2 * x)"], "is rank-deficient: I(2 * x) is aliased with earlier terms"),
    (["--formula", "mean x"], "--formula needs 'PARAM ~ TERMS'"),
]


@pytest.mark.parametrize("arguments, message", BAD)
def test_bad_regression_input_is_one_line_exit_2_and_records_nothing(tracker, bad_data, capsys, arguments, message):
    given = [part.format(d=bad_data) for part in arguments]
    base = ["--data", str(bad_data / "d.csv"), "--column", "y", "--family", "gamma"]
    for option in ("--data", "--column"):
        if option in given:
            at = base.index(option)
            del base[at : at + 2]
    before = run_count(tracker)
    assert main(fit(*base, *given)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("nllflow: error: ")
    assert message.format(d=bad_data) in captured.err
    assert run_count(tracker) == before


def test_more_coefficients_than_observations_are_refused(tracker, bad_data, capsys):
    assert (
        main(
            fit(
                "--data",
                str(bad_data / "tiny.csv"),
                "--column",
                "y",
                "--family",
                "gamma",
                "--formula",
                "mean ~ x",
                "--formula",
                "dispersion ~ x",
            )
        )
        == 2
    )
    assert "4 coefficients for 3 observations" in capsys.readouterr().err


def test_drop_missing_says_how_many_rows_it_left_out(tracker, bad_data, capsys):
    assert (
        main(
            fit(
                "--data",
                str(bad_data / "d.csv"),
                "--column",
                "y",
                "--family",
                "gamma",
                "--formula",
                "mean ~ gap",
                "--drop-missing",
                "--json",
            )
        )
        == 0
    )
    result = last_json(capsys.readouterr().out)
    assert result["n"] == 28 and result["dropped"] == 2


HOSTILE = [
    "__import__('os').system('touch {sentinel}')",
    "I(__import__('os').system('touch {sentinel}'))",
    "I(x.__class__.__base__.__subclasses__())",
    "I((lambda: open('{sentinel}', 'w'))())",
    "{{open('{sentinel}', 'w').write('x')}}",
    "x + np.save('{sentinel}', x)",
    "I(eval('1'))",
]


@pytest.mark.parametrize("formula", HOSTILE)
def test_hostile_formulas_are_refused_and_never_run(tracker, bad_data, capsys, tmp_path, formula):
    sentinel = tmp_path / "sentinel"
    text = formula.format(sentinel=sentinel)
    assert (
        main(
            fit("--data", str(bad_data / "d.csv"), "--column", "y", "--family", "gamma", "--formula", f"mean ~ {text}")
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("nllflow: error: ")
    # the same through a spec file and as the flow's parameter
    spec = tmp_path / "hostile.yaml"
    spec.write_text(
        json.dumps(
            {
                "name": "hostile",
                "family": "gamma",
                "device": "cpu",
                "data": {"path": str(bad_data / "d.csv"), "column": "y"},
                "formulas": {"mean": text},
            }
        )
    )
    assert main(["run", str(spec)]) == 2
    from nllflow.flows.fit import fit as fit_flow

    state = fit_flow(json.loads(spec.read_text()), return_state=True)
    assert state.is_failed()
    assert not sentinel.exists()


def test_predict_and_the_mlflow_model_give_the_fit_s_own_numbers(tracker, capsys, tmp_path):
    code = main(
        fit(
            "--data",
            str(ENGEL),
            "--column",
            "foodexp",
            "--family",
            "gamma",
            "--formula",
            "mean ~ log(income)",
            "--formula",
            "dispersion ~ log(income)",
            "--json",
        )
    )
    assert code == 0
    result = last_json(capsys.readouterr().out)
    new = pd.DataFrame({"income": [400.0, 1000.0, 4000.0]})
    new.to_csv(tmp_path / "new.csv", index=False)
    assert (
        main(
            [
                "predict",
                "--run",
                result["run_id"],
                "--data",
                str(tmp_path / "new.csv"),
                "--quantiles",
                "0.05,0.5,0.95",
                "--output",
                str(tmp_path / "predicted.csv"),
            ]
        )
        == 0
    )
    predicted = pd.read_csv(tmp_path / "predicted.csv")
    # the oracle: the JSON coefficients through the log links, and scipy's gamma quantiles
    coefficients = result["coefficients"]
    log_income = np.log(new["income"].to_numpy())
    mean = np.exp(coefficients["mean"]["Intercept"] + coefficients["mean"]["log(income)"] * log_income)
    dispersion = np.exp(
        coefficients["dispersion"]["Intercept"] + coefficients["dispersion"]["log(income)"] * log_income
    )
    np.testing.assert_allclose(predicted["mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(predicted["dispersion"], dispersion, rtol=1e-10)
    from scipy import stats

    shape = 1 / dispersion
    for p in (0.05, 0.5, 0.95):
        np.testing.assert_allclose(predicted[f"q{p:g}"], stats.gamma.ppf(p, shape, scale=mean / shape), rtol=1e-8)
    # the logged MLflow model, loaded by mlflow.pyfunc in a process of its own
    probe = (
        "import json, sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({tracker.uri!r})\n"
        f"model = mlflow.pyfunc.load_model('runs:/{result['run_id']}/model')\n"
        "frame = pd.DataFrame({'income': [400.0, 1000.0, 4000.0]})\n"
        "predicted = model.predict(frame, params={'quantiles': [0.05, 0.5, 0.95]})\n"
        "print(predicted.to_json(orient='columns', double_precision=15))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = pd.DataFrame(json.loads(done.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(fresh[predicted.columns].to_numpy(), predicted.to_numpy(), rtol=1e-12)


def test_predict_refuses_a_run_without_a_model_and_data_without_the_covariates(tracker, capsys, tmp_path):
    code = main(fit("--data", str(ENGEL), "--column", "foodexp", "--family", "gamma", "--json"))
    assert code == 0
    constant = last_json(capsys.readouterr().out)
    pd.DataFrame({"income": [1.0]}).to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--run", constant["run_id"], "--data", str(tmp_path / "new.csv")]) == 2
    assert "has no model to predict with" in capsys.readouterr().err
    main(fit("--data", str(ENGEL), "--column", "foodexp", "--family", "gamma", "--formula", "mean ~ income", "--json"))
    regression = last_json(capsys.readouterr().out)
    pd.DataFrame({"other": [1.0]}).to_csv(tmp_path / "other.csv", index=False)
    assert main(["predict", "--run", regression["run_id"], "--data", str(tmp_path / "other.csv")]) == 2
    assert "lacks the column(s) income" in capsys.readouterr().err
