"""Distributional regression against independent oracles: statsmodels' GLM (Poisson, Gamma with a log
link, Binomial with logit and probit links), NegativeBinomial (NB2) and BetaModel (with a precision
model) on data shipped inside statsmodels, and a normal linear regression with a log-linear scale
checked against a numpy implementation. Every NLL is never worse than the oracle's (+1e-9 relative),
coefficients agree to 1e-4 relative, standard errors to 1e-3 where the oracle uses the observed
information. Gradients pass gradcheck for every link; every family recovers simulated coefficients;
the quantile residuals of a correct model are standard normal."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels
import statsmodels.api as sm
import torch
from scipy import optimize, special, stats
from statsmodels.discrete.discrete_model import NegativeBinomial
from statsmodels.othermod.betareg import BetaModel

from nllflow.data.formulas import build_design
from nllflow.families import get_family
from nllflow.fitting.regression import fit_regression
from nllflow.likelihood.observations import Observations
from nllflow.models.linear import LinearProblem, linear_model_for
from nllflow.models.links import LINKS
from nllflow.pipeline.steps import run_core
from nllflow.spec import parse_spec

RANDHIE = "lncoins + idp + lpi + fmde + physlm + disea + hlthg + hlthf + hlthp"
SCOTLAND = "COUTAX + UNEMPF + MOR + ACT + GDP + AGE + COUTAX_FEMALEUNEMP"
NLL_SLACK = 1e-9


def _fit(tmp_path: Path, frame: pd.DataFrame, column: str, family: str, formulas: dict, **spec):
    path = tmp_path / f"{family}.csv"
    frame.to_csv(path, index=False)
    raw = {
        "name": "regression",
        "family": family,
        "data": {"path": str(path), "column": column},
        "formulas": formulas,
        "device": "cpu",
        **spec,
    }
    _, _, result, evaluation = run_core(parse_spec(raw))
    return result, evaluation


def _assert_matches(result, evaluation, parameter: str, names: list[str], params, bse=None, *, rel=1e-4):
    coefficients = result.coefficients[parameter]
    for name, value in zip(names, params, strict=True):
        assert coefficients[name] == pytest.approx(value, rel=rel, abs=1e-9), name
        if bse is not None:
            se = bse[names.index(name)]
            assert evaluation.stderr[f"{parameter}:{name}"] == pytest.approx(se, rel=1e-3), name


def _not_worse(nll: float, oracle_nll: float) -> None:
    assert nll <= oracle_nll + NLL_SLACK * abs(oracle_nll)


@pytest.fixture(scope="module")
def randhie() -> pd.DataFrame:
    return sm.datasets.randhie.load_pandas().data


OPTIMIZERS = pytest.mark.parametrize("optimizer", ["lbfgs", "newton"])


@OPTIMIZERS
def test_poisson_glm_on_randhie(tmp_path, randhie, optimizer):
    model = sm.GLM.from_formula(f"mdvis ~ {RANDHIE}", randhie, family=sm.families.Poisson())
    oracle = model.fit(method="newton", tol=1e-12, maxiter=100)
    result, evaluation = _fit(tmp_path, randhie, "mdvis", "poisson", {"rate": RANDHIE}, optimizer={"name": optimizer})
    assert result.converged, result.reason
    _not_worse(result.nll, -oracle.llf)
    # canonical link: observed = expected information
    _assert_matches(result, evaluation, "rate", list(oracle.params.index), oracle.params, oracle.bse)


@OPTIMIZERS
def test_negative_binomial_nb2_on_randhie(tmp_path, randhie, optimizer):
    oracle = NegativeBinomial.from_formula(f"mdvis ~ {RANDHIE}", randhie, loglike_method="nb2").fit(
        method="newton", tol=1e-12, maxiter=100, disp=0
    )
    result, evaluation = _fit(
        tmp_path, randhie, "mdvis", "negativebinomial", {"mean": RANDHIE}, optimizer={"name": optimizer}
    )
    assert result.converged, result.reason
    _not_worse(result.nll, -oracle.llf)
    names = list(oracle.params.index[:-1])
    _assert_matches(result, evaluation, "mean", names, oracle.params.iloc[:-1], oracle.bse.iloc[:-1])
    # NB2's alpha is the dispersion: variance = mean + dispersion · mean²
    assert result.params["dispersion"] == pytest.approx(oracle.params["alpha"], rel=1e-4)
    assert evaluation.stderr["dispersion"] == pytest.approx(oracle.bse["alpha"], rel=1e-3)


def test_gamma_glm_with_log_link_on_scotland(tmp_path):
    data = sm.datasets.scotland.load_pandas().data
    glm = sm.GLM.from_formula(f"YES ~ {SCOTLAND}", data, family=sm.families.Gamma(link=sm.families.links.Log()))
    oracle = glm.fit(tol=1e-13, maxiter=1000)
    # statsmodels' llf takes the shape from the Pearson statistic; the MLE of the shape (with the
    # GLM's coefficients, which do not depend on it) is the oracle's best likelihood
    y, mu = glm.endog, oracle.mu
    constant = np.sum(np.log(y / mu) - y / mu + 1)
    shape = optimize.brentq(lambda k: len(y) * (np.log(k) - special.digamma(k)) + constant, 1e-3, 1e8, xtol=1e-14)
    best_nll = -stats.gamma.logpdf(y, a=shape, scale=mu / shape).sum()
    observed = np.sqrt(np.diag(np.linalg.inv(-glm.hessian(oracle.params.values, scale=1 / shape, observed=True))))
    result, evaluation = _fit(tmp_path, data, "YES", "gamma", {"mean": SCOTLAND})
    _not_worse(result.nll, best_nll)
    assert result.nll < -oracle.llf  # below the Pearson-scale likelihood statsmodels reports
    _assert_matches(result, evaluation, "mean", list(oracle.params.index), oracle.params, observed)
    assert result.params["dispersion"] == pytest.approx(1 / shape, rel=1e-4)


@OPTIMIZERS
@pytest.mark.parametrize("link", ["logit", "probit"])
def test_binomial_glm_on_spector(tmp_path, link, optimizer):
    data = sm.datasets.spector.load_pandas().data
    links = {"logit": sm.families.links.Logit(), "probit": sm.families.links.Probit()}
    glm = sm.GLM.from_formula("GRADE ~ GPA + TUCE + PSI", data, family=sm.families.Binomial(link=links[link]))
    oracle = glm.fit(method="newton", tol=1e-12, maxiter=100)  # newton: standard errors from the observed Hessian
    result, evaluation = _fit(
        tmp_path,
        data,
        "GRADE",
        "binomial",
        {"probs": "GPA + TUCE + PSI"},
        fix={"total_count": 1.0},
        links={"probs": link},
        optimizer={"name": optimizer},
    )
    _not_worse(result.nll, -oracle.llf)
    _assert_matches(result, evaluation, "probs", list(oracle.params.index), oracle.params, oracle.bse)


def _betareg_data(name: str) -> pd.DataFrame:
    return pd.read_csv(Path(statsmodels.__file__).parent / "othermod" / "tests" / "results" / name)


@OPTIMIZERS
def test_beta_regression_with_a_precision_model_on_methylation(tmp_path, optimizer):
    data = _betareg_data("methylation-test.csv")[["methylation", "gender", "CpG", "age"]]
    oracle = BetaModel.from_formula(
        "methylation ~ gender + CpG", data, exog_precision_formula="~ age", link_precision=sm.families.links.Log()
    ).fit(method="newton", tol=1e-12, maxiter=200, disp=0)
    result, evaluation = _fit(
        tmp_path,
        data,
        "methylation",
        "beta",
        {"mean": "gender + CpG", "precision": "age"},
        optimizer={"name": optimizer},
    )
    _not_worse(result.nll, -oracle.llf)
    means = [name for name in oracle.params.index if not name.startswith("precision")]
    _assert_matches(result, evaluation, "mean", means, oracle.params[means], oracle.bse[means])
    precision = [name for name in oracle.params.index if name.startswith("precision")]
    _assert_matches(
        result, evaluation, "precision", ["Intercept", "age"], oracle.params[precision], oracle.bse[precision]
    )


def test_beta_regression_with_a_constant_precision_on_food_expenditure(tmp_path):
    data = _betareg_data("foodexpenditure.csv").assign(share=lambda d: d["food"] / d["income"])
    oracle = BetaModel.from_formula("share ~ income + persons", data).fit(method="newton", tol=1e-12, disp=0)
    result, evaluation = _fit(tmp_path, data, "share", "beta", {"mean": "income + persons"})
    _not_worse(result.nll, -oracle.llf)
    names = ["Intercept", "income", "persons"]
    _assert_matches(result, evaluation, "mean", names, oracle.params[names], oracle.bse[names])
    # statsmodels estimates log(precision); the constant is reported on its natural scale
    assert result.params["precision"] == pytest.approx(math.exp(oracle.params["precision"]), rel=1e-4)


@OPTIMIZERS
def test_normal_linear_regression_with_a_log_linear_scale(tmp_path, optimizer):
    """The oracle: the same likelihood written in numpy, minimised by scipy's BFGS with its analytic
    gradient; with a constant scale, the closed form (OLS, σ² = RSS/n)."""
    rng = np.random.default_rng(5)
    n = 600
    x, z = rng.uniform(-2, 2, n), rng.normal(size=n)
    y = 1.0 + 2.0 * x - 0.5 * z + np.exp(-0.3 + 0.4 * x) * rng.normal(size=n)
    frame = pd.DataFrame({"y": y, "x": x, "z": z})
    X = np.column_stack([np.ones(n), x, z])
    S = np.column_stack([np.ones(n), x])

    def nll(theta):
        beta, gamma = theta[:3], theta[3:]
        log_sigma = S @ gamma
        r = (y - X @ beta) / np.exp(log_sigma)
        value = np.sum(0.5 * r**2 + log_sigma) + 0.5 * n * math.log(2 * math.pi)
        gradient = np.concatenate([-(X.T @ (r / np.exp(log_sigma))), S.T @ (1 - r**2)])
        return value, gradient

    oracle = optimize.minimize(nll, np.zeros(5), jac=True, method="BFGS", options={"gtol": 1e-10})
    result, _ = _fit(tmp_path, frame, "y", "normal", {"loc": "x + z", "scale": "x"}, optimizer={"name": optimizer})
    _not_worse(result.nll, oracle.fun)
    found = [*result.coefficients["loc"].values(), *result.coefficients["scale"].values()]
    np.testing.assert_allclose(found, oracle.x, rtol=1e-4)
    # constant scale: ordinary least squares
    ols, rss = np.linalg.lstsq(X, y, rcond=None)[:2]
    closed = 0.5 * n * (math.log(2 * math.pi * rss[0] / n) + 1)
    result, evaluation = _fit(tmp_path, frame, "y", "normal", {"loc": "x + z"}, optimizer={"name": optimizer})
    _not_worse(result.nll, closed)
    np.testing.assert_allclose(list(result.coefficients["loc"].values()), ols, rtol=1e-6)
    assert result.params["scale"] == pytest.approx(math.sqrt(rss[0] / n), rel=1e-6)
    # OLS's standard errors with the MLE of σ² are the observed information's
    covariance = rss[0] / n * np.linalg.inv(X.T @ X)
    assert [evaluation.stderr[f"loc:{t}"] for t in ("Intercept", "x", "z")] == pytest.approx(
        np.sqrt(np.diag(covariance)).tolist(), rel=1e-5
    )


# --- gradients ------------------------------------------------------------------------------------

LINK_CASES = [
    ("normal", "loc", "identity"),
    ("normal", "loc", "inverse"),
    ("normal", "scale", "log"),
    ("poisson", "rate", "log"),
    ("poisson", "rate", "sqrt"),
    ("binomial", "probs", "logit"),
    ("binomial", "probs", "probit"),
    ("binomial", "probs", "cloglog"),
]


def _link_problem(family_name: str, parameter: str, link: str):
    rng = np.random.default_rng(1)
    n = 40
    frame = pd.DataFrame({"x": rng.uniform(0.5, 1.5, n), "g": rng.choice(["a", "b"], n)})
    y = {
        "normal": rng.normal(2.0, 1.0, n),
        "poisson": rng.poisson(3.0, n).astype(float),
        "binomial": rng.binomial(5, 0.4, n).astype(float),
    }[family_name]
    family = get_family(family_name)
    fixed = {"total_count": 5.0} if family_name == "binomial" else {}
    observations = Observations(torch.as_tensor(y))
    model = linear_model_for(family, {parameter: "x + C(g)"}, {parameter: link}, fixed, {}, frame, observations)
    features = {k: torch.as_tensor(v) for k, v in model.features(model.design_matrices()).items()}
    observations = Observations(torch.as_tensor(y), features=features)
    starts = {name: torch.full((1, p.size), 0.1, dtype=torch.float64) for name, p in model.predictors.items()}
    if link == "inverse":
        starts[parameter] = torch.tensor([[2.0, 0.1, 0.1]], dtype=torch.float64)
    return model, LinearProblem(model, observations, [starts])


@pytest.mark.parametrize("family_name, parameter, link", LINK_CASES)
def test_nll_gradients_pass_gradcheck_for_every_link(family_name, parameter, link):
    _, problem = _link_problem(family_name, parameter, link)
    rows = torch.tensor([0])
    flat = problem.flat(rows).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: problem.objective(rows, f), (flat,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("family_name, parameter, link", LINK_CASES)
def test_trace_gradients_on_the_original_scale_equal_finite_differences(family_name, parameter, link):
    model, problem = _link_problem(family_name, parameter, link)
    rows = torch.tensor([0])
    values = problem.evaluate(rows).columns[0]
    labels = model.labels()
    coefficients = values[3 : 3 + len(labels)].clone()
    reported = values[3 + len(labels) :]

    def mean_nll(original: torch.Tensor) -> float:
        pieces, at = {}, 0
        for name in model.optimised:
            size = model.predictors[name].size
            pieces[name] = model.standardised(name, original[at : at + size].reshape(1, -1))
            at += size
        return float(problem.mean_nll(rows, pieces)[0])

    for j in range(len(labels)):
        step = 1e-6 * max(1.0, abs(float(coefficients[j])))
        up, down = coefficients.clone(), coefficients.clone()
        up[j] += step
        down[j] -= step
        assert float(reported[j]) == pytest.approx((mean_nll(up) - mean_nll(down)) / (2 * step), rel=1e-5, abs=1e-8)


def _finite_difference_hessian(problem: LinearProblem, rows: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Central differences of the autograd gradient of the objective, one coefficient at a time."""

    def gradient(point: torch.Tensor) -> torch.Tensor:
        point = point.clone().requires_grad_(True)
        (value,) = torch.autograd.grad(problem.objective(rows, point).sum(), point)
        return value

    columns = []
    for j in range(flat.shape[1]):
        step = torch.zeros_like(flat)
        step[:, j] = 1e-5
        columns.append((gradient(flat + step) - gradient(flat - step)) / 2e-5)
    return torch.stack(columns, 2)


@pytest.mark.parametrize("family_name, parameter, link", LINK_CASES)
def test_the_newton_derivatives_through_the_linear_predictors_equal_finite_differences(family_name, parameter, link):
    _, problem = _link_problem(family_name, parameter, link)
    rows = torch.tensor([0])
    flat = problem.flat(rows) + 0.05
    value, gradient, hessian = problem.derivatives(rows, flat)
    assert float(value[0]) == pytest.approx(float(problem.objective(rows, flat)[0]), rel=1e-14)
    point = flat.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(problem.objective(rows, point).sum(), point)
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hessian, _finite_difference_hessian(problem, rows, flat), rtol=1e-5, atol=1e-7)


def test_the_newton_derivatives_of_two_linked_parameters_on_weighted_censored_rows_equal_finite_differences():
    """Cross terms ∂²ℓ/∂η_loc∂η_scale, weights and interval-censored rows; rows of a batch apart."""
    from nllflow.likelihood.censoring import CensoredRows

    rng = np.random.default_rng(4)
    n, censored = 60, 15
    frame = pd.DataFrame({"x": rng.uniform(-1, 1, n + censored)})
    y = rng.normal(1.0, 1.5, n)
    low = rng.normal(1.0, 1.5, censored)
    family = get_family("normal")
    observations = Observations(torch.as_tensor(y))
    model = linear_model_for(family, {"loc": "x", "scale": "x"}, {}, {}, {}, frame, observations)
    features = {k: torch.as_tensor(v) for k, v in model.features(model.design_matrices()).items()}
    weights = torch.as_tensor(rng.integers(1, 4, n).astype(float))
    rows_censored = CensoredRows(torch.as_tensor(low), torch.as_tensor(low + 0.7), None)
    observations = Observations(torch.as_tensor(y), weights, rows_censored, features)

    def start(loc: list[float], scale: list[float]) -> dict[str, torch.Tensor]:
        return {"loc": torch.tensor([loc], dtype=torch.float64), "scale": torch.tensor([scale], dtype=torch.float64)}

    starts = [start([0.8, 0.3], [0.2, -0.1]), start([1.1, -0.2], [0.5, 0.3])]
    problem = LinearProblem(model, observations, starts)
    rows = torch.tensor([0, 1])
    flat = problem.flat(rows)
    value, gradient, hessian = problem.derivatives(rows, flat)
    torch.testing.assert_close(value, problem.objective(rows, flat), rtol=1e-14, atol=0)
    assert float(hessian[0, 0, 2]) != 0  # loc and scale interact
    torch.testing.assert_close(hessian, _finite_difference_hessian(problem, rows, flat), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hessian, hessian.transpose(1, 2), rtol=1e-12, atol=1e-14)


# --- recovery of simulated coefficients -----------------------------------------------------------

# family, fixed values, {parameter: (intercept, slope)} on the link scale; each parameter has a formula
RECOVERY = [
    ("normal", {}, {"loc": (1.0, 0.8), "scale": (-0.5, 0.4)}),
    ("lognormal", {}, {"loc": (0.5, 0.6), "scale": (-1.0, 0.3)}),
    ("gamma", {}, {"mean": (1.0, 0.5), "dispersion": (-1.0, 0.4)}),
    ("exponential", {}, {"rate": (0.3, -0.6)}),
    ("weibull", {}, {"scale": (0.5, 0.4), "concentration": (0.6, 0.3)}),
    ("studentt", {}, {"df": (1.5, 0.3), "loc": (0.0, 1.0), "scale": (-0.3, 0.2)}),
    ("laplace", {}, {"loc": (1.0, -0.7), "scale": (-0.2, 0.3)}),
    ("cauchy", {}, {"loc": (0.5, 0.5), "scale": (-0.5, 0.3)}),
    ("gumbel", {}, {"loc": (1.0, 0.6), "scale": (-0.4, 0.3)}),
    ("beta", {}, {"mean": (0.2, 0.8), "precision": (2.0, 0.5)}),
    ("halfnormal", {}, {"scale": (0.3, 0.5)}),
    ("halfcauchy", {}, {"scale": (0.2, 0.4)}),
    ("pareto", {"scale": 1.0}, {"alpha": (1.0, 0.4)}),
    ("poisson", {}, {"rate": (1.0, 0.5)}),
    ("binomial", {"total_count": 10.0}, {"probs": (-0.3, 0.9)}),
    ("negativebinomial", {}, {"mean": (1.2, 0.5), "dispersion": (-0.7, 0.5)}),
    ("geometric", {}, {"probs": (-1.0, 0.6)}),
]


def _simulate(family_name: str, fixed: dict, truth: dict, n: int, seed: int) -> pd.DataFrame:
    """y drawn from the family at parameters linear in x on each default link's scale."""
    family = get_family(family_name)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n)
    from nllflow.models.linear import choose_parametrisation, parameter_constraint
    from nllflow.models.links import resolve_link

    parametrisation = choose_parametrisation(family, [*truth, *fixed])
    values = {
        name: resolve_link(name, parameter_constraint(family, parametrisation, name), None).inverse(
            torch.as_tensor(a + b * x)
        )
        for name, (a, b) in truth.items()
    }
    values.update({name: torch.full((n,), value, dtype=torch.float64) for name, value in fixed.items()})
    natural = values if parametrisation is None else parametrisation.to_natural(values)
    torch.manual_seed(seed)
    y = family.build(**natural, validate_args=False).sample().double().numpy()
    return pd.DataFrame({"y": y, "x": x})


@OPTIMIZERS
@pytest.mark.parametrize("family_name, fixed, truth", RECOVERY, ids=[case[0] for case in RECOVERY])
def test_every_family_recovers_simulated_coefficients(tmp_path, family_name, fixed, truth, optimizer):
    frame = _simulate(family_name, fixed, truth, 3000, seed=11)
    result, evaluation = _fit(
        tmp_path, frame, "y", family_name, {name: "x" for name in truth}, fix=fixed, optimizer={"name": optimizer}
    )
    assert result.converged, result.reason
    for name, (a, b) in truth.items():
        for term, value in (("Intercept", a), ("x", b)):
            estimate = result.coefficients[name][term]
            se = evaluation.stderr[f"{name}:{term}"]
            # a kinked likelihood (the Laplace's location) has no Wald standard error
            tolerance = 5 * se if math.isfinite(se) else 0.1
            assert abs(estimate - value) < tolerance, (name, term, estimate, value, se)


def test_quantile_residuals_of_a_correct_model_are_standard_normal_and_a_wrong_one_is_detected(tmp_path):
    frame = _simulate("negativebinomial", {}, {"mean": (1.0, 0.8), "dispersion": (-0.5, 0.0)}, 3000, seed=3)
    _, correct = _fit(tmp_path, frame, "y", "negativebinomial", {"mean": "x"})
    assert correct.gof["residual_ks_pvalue"] > 0.01
    assert stats.kstest(correct.residuals, "norm").pvalue == pytest.approx(correct.gof["residual_ks_pvalue"])
    assert abs(correct.gof["residual_mean"]) < 0.1 and abs(correct.gof["residual_variance"] - 1) < 0.1
    # the same overdispersed counts as a Poisson: the residuals say so
    _, wrong = _fit(tmp_path, frame, "y", "poisson", {"rate": "x"})
    assert wrong.gof["residual_ks_pvalue"] < 1e-6 and wrong.gof["residual_variance"] > 1.5
    frame = _simulate("gamma", {}, {"mean": (1.0, 0.5), "dispersion": (-1.0, 0.4)}, 3000, seed=4)
    _, continuous = _fit(tmp_path, frame, "y", "gamma", {"mean": "x", "dispersion": "x"})
    assert continuous.gof["residual_ks_pvalue"] > 0.01


def test_fit_regression_directly_matches_the_pipeline(tmp_path, randhie):
    """The library call (a model and observations built by hand) is the pipeline's fit."""
    sample = randhie.head(2000)
    family = get_family("poisson")
    observations = Observations(torch.as_tensor(sample["mdvis"].to_numpy(dtype=float)))
    model = linear_model_for(family, {"rate": "lncoins + idp"}, {}, {}, {}, sample, observations)
    features = {k: torch.as_tensor(v) for k, v in model.features(model.design_matrices()).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        direct = fit_regression(model, Observations(observations.values, features=features))
    piped, _ = _fit(tmp_path, sample, "mdvis", "poisson", {"rate": "lncoins + idp"})
    for term, value in piped.coefficients["rate"].items():
        assert direct.coefficients["rate"][term] == pytest.approx(value, rel=1e-10)
    assert build_design("rate", "lncoins + idp", sample).columns == ["Intercept", "lncoins", "idp"]


def test_links_cover_the_issue_list():
    assert {"identity", "log", "logit", "probit", "inverse", "sqrt"} <= set(LINKS)


@pytest.mark.parametrize("kind", ["nonparametric", "parametric"])
def test_the_bootstrap_of_a_regression_agrees_with_the_observed_information(tmp_path, kind):
    """Asymptotic theory is the oracle: for a well-specified model, bootstrap standard errors of the
    coefficients match the Wald ones (to Monte Carlo error at B = 300)."""
    frame = _simulate("poisson", {}, {"rate": (1.0, 0.5)}, 1500, seed=8)
    result, evaluation = _fit(
        tmp_path, frame, "y", "poisson", {"rate": "x"}, bootstrap={"replicates": 300, "kind": kind, "seed": 1}
    )
    boot = evaluation.bootstrap
    assert boot.converged == 300
    for label in ("rate:Intercept", "rate:x"):
        assert boot.stderr[label] == pytest.approx(evaluation.stderr[label], rel=0.15)
        low, high = boot.intervals[label]
        estimate = estimates_of(result)[label]
        assert low < estimate < high


def estimates_of(result):
    from nllflow.evaluation.regression import estimates

    return estimates(result)


def test_the_python_api_fits_a_regression_of_a_dataframe_as_the_pipeline_fits_its_file(tmp_path):
    import nllflow

    frame = _simulate("gamma", {}, {"mean": (1.0, 0.5), "dispersion": (-1.0, 0.4)}, 800, seed=6)
    piped, _ = _fit(tmp_path, frame, "y", "gamma", {"mean": "x", "dispersion": "x"})
    fitted = nllflow.fit(frame, "gamma", column="y", formulas={"mean": "x", "dispersion": "x"}, device="cpu")
    for name, terms in piped.coefficients.items():
        for term, value in terms.items():
            assert fitted.coefficients[name][term] == pytest.approx(value, rel=1e-10)
    assert "mean ~ x   (link: log)" in fitted.summary()
    assert set(fitted.to_frame()["term"]) == {"Intercept", "x"}
