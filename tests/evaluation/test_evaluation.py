"""Evaluation of a finished fit: standard errors from the observed information against analytic and
finite-difference Hessians, information criteria, goodness of fit against scipy, held-out NLL,
recovery error, and a singular information reported rather than hidden."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from family_table import CASES, scipy_nll
from scipy import stats
from scipy.special import softmax

from nllflow.evaluation.summary import Z_95, evaluate_fit
from nllflow.families import get_family
from nllflow.fitting.mle import FitSettings, fit_mle
from nllflow.likelihood.observations import Observations


def _obs(x, weights=None) -> Observations:
    return Observations(
        torch.as_tensor(x, dtype=torch.float64),
        None if weights is None else torch.as_tensor(weights, dtype=torch.float64),
    )


def _fit(name: str, x, **kwargs):
    family, observations = get_family(name), _obs(x)
    result = fit_mle(family, observations, **kwargs)
    return family, observations, result


def _fd_hessian(f, theta: np.ndarray, rel: float = 1e-4) -> np.ndarray:
    """Central second differences of `f` at `theta`, steps relative to each component."""
    h = rel * np.maximum(np.abs(theta), 1e-3)
    k = len(theta)
    hessian = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            ei, ej = np.eye(k)[i] * h[i], np.eye(k)[j] * h[j]
            hessian[i, j] = (f(theta + ei + ej) - f(theta + ei - ej) - f(theta - ei + ej) + f(theta - ei - ej)) / (
                4 * h[i] * h[j]
            )
    return hessian


# --- standard errors -----------------------------------------------------------------------------


def test_normal_standard_errors_are_analytic():
    """At the MLE the observed information of the normal is diag(n/σ², 2n/σ²)."""
    x = np.random.default_rng(0).normal(1.5, 2.0, 400)
    family, observations, result = _fit("normal", x)
    evaluation = evaluate_fit(family, observations, result)
    sigma, n = x.std(), len(x)
    assert evaluation.stderr["loc"] == pytest.approx(sigma / math.sqrt(n), rel=1e-8)
    assert evaluation.stderr["scale"] == pytest.approx(sigma / math.sqrt(2 * n), rel=1e-8)
    assert evaluation.correlation["loc"]["scale"] == pytest.approx(0.0, abs=1e-6)
    assert evaluation.correlation["loc"]["loc"] == pytest.approx(1.0, abs=1e-12)
    low, high = evaluation.ci95["loc"]
    assert (low, high) == pytest.approx(
        (x.mean() - 1.959964 * sigma / math.sqrt(n), x.mean() + 1.959964 * sigma / math.sqrt(n)), rel=1e-6
    )
    assert Z_95 == pytest.approx(1.959963984540054, rel=1e-12)
    assert evaluation.information == "ok"


def test_gamma_standard_errors_match_a_finite_difference_hessian():
    x = np.random.default_rng(1).gamma(2.5, 1 / 1.7, 500)
    family, observations, result = _fit("gamma", x)
    evaluation = evaluate_fit(family, observations, result)
    theta = np.array([result.params["concentration"], result.params["rate"]])
    hessian = _fd_hessian(lambda t: -stats.gamma(t[0], scale=1 / t[1]).logpdf(x).sum(), theta)
    covariance = np.linalg.inv(hessian)
    se = np.sqrt(np.diag(covariance))
    assert evaluation.stderr["concentration"] == pytest.approx(se[0], rel=1e-4)
    assert evaluation.stderr["rate"] == pytest.approx(se[1], rel=1e-4)
    corr = covariance[0, 1] / (se[0] * se[1])
    assert evaluation.correlation["concentration"]["rate"] == pytest.approx(corr, abs=1e-4)
    assert corr > 0.5  # shape and rate are strongly correlated: the check is not vacuous


def test_categorical_standard_errors_are_the_multinomial_ones():
    """For free logits against category 0 the information is n (diag(p) − p pᵀ) over categories 1..K-1."""
    x = CASES["categorical"].sample(1000, seed=2)
    family, observations, result = _fit("categorical", x)
    evaluation = evaluate_fit(family, observations, result)
    p = np.bincount(x.astype(int)) / len(x)
    q = p[1:]
    covariance = np.linalg.inv(len(x) * (np.diag(q) - np.outer(q, q)))
    for i in range(3):
        assert evaluation.stderr[f"logits_{i + 1}"] == pytest.approx(math.sqrt(covariance[i, i]), rel=1e-5)
    np.testing.assert_allclose(softmax([0.0, *[result.params[f"logits_{i}"] for i in (1, 2, 3)]]), p, atol=1e-6)


def test_exponential_standard_error_is_rate_over_root_n():
    x = CASES["exponential"].sample(300, seed=3)
    family, observations, result = _fit("exponential", x)
    evaluation = evaluate_fit(family, observations, result)
    rate = 1 / x.mean()
    assert result.params["rate"] == pytest.approx(rate, rel=1e-9)
    assert evaluation.stderr["rate"] == pytest.approx(rate / math.sqrt(len(x)), rel=1e-7)


def test_pareto_gives_no_interval_for_its_scale_and_the_analytic_one_for_alpha():
    x = CASES["pareto"].sample(400, seed=4)
    family, observations, result = _fit("pareto", x)
    evaluation = evaluate_fit(family, observations, result)
    alpha = len(x) / np.log(x / x.min()).sum()
    assert result.params["alpha"] == pytest.approx(alpha, rel=1e-7)
    assert evaluation.stderr["alpha"] == pytest.approx(alpha / math.sqrt(len(x)), rel=1e-6)
    assert math.isnan(evaluation.stderr["scale"]) and all(math.isnan(v) for v in evaluation.ci95["scale"])
    assert evaluation.information == "ok; no Wald interval for scale (MLE at a data bound or kink)"


def test_laplace_scale_has_its_analytic_error_and_loc_none():
    """loc's MLE is the median (a kink: zero second derivative); scale's observed information at
    the MLE is n/b², so its standard error is b/√n."""
    x = CASES["laplace"].sample(501, seed=5)
    family, observations, result = _fit("laplace", x)
    evaluation = evaluate_fit(family, observations, result)
    b = np.abs(x - np.median(x)).mean()
    assert result.params["loc"] == pytest.approx(np.median(x), abs=1e-6)
    assert result.params["scale"] == pytest.approx(b, rel=1e-6)
    assert evaluation.stderr["scale"] == pytest.approx(b / math.sqrt(len(x)), rel=1e-5)
    assert math.isnan(evaluation.stderr["loc"])
    assert "no Wald interval for loc" in evaluation.information


def test_uniform_has_no_regular_parameters():
    x = CASES["uniform"].sample(200, seed=6)
    family, observations, result = _fit("uniform", x)
    evaluation = evaluate_fit(family, observations, result)
    assert evaluation.information == "no regular free parameters"
    assert all(math.isnan(se) for se in evaluation.stderr.values()) and set(evaluation.stderr) == {"low", "high"}


def test_singular_information_is_reported_with_nan_errors():
    """Far from the optimum, at σ² > 3·mean((x−μ)²), d²NLL/dσ² = n/σ² (3·mean((x−μ)²)/σ² − 1) < 0:
    the observed information is not positive definite."""
    x = np.random.default_rng(7).normal(0.0, 1.0, 200)
    family, observations = get_family("normal"), _obs(x)
    result = fit_mle(family, observations, init={"loc": 0.0, "scale": 10.0}, settings=FitSettings("adam", 1e-9, 1))
    mu, sigma = result.params["loc"], result.params["scale"]
    assert len(x) / sigma**2 * (3 * np.mean((x - mu) ** 2) / sigma**2 - 1) < 0
    evaluation = evaluate_fit(family, observations, result)
    assert "not positive definite" in evaluation.information
    assert set(evaluation.stderr) == {"loc", "scale"}
    assert all(math.isnan(se) for se in evaluation.stderr.values())
    assert evaluation.correlation == {}
    assert math.isnan(evaluation.metrics()["se_scale"])


def test_weighted_evaluation_counts_the_weights():
    rng = np.random.default_rng(8)
    x = rng.gamma(2.0, 1.0, 80)
    w = rng.integers(1, 4, 80).astype(np.float64)
    family = get_family("gamma")
    weighted = _obs(x, w)
    repeated = _obs(np.repeat(x, w.astype(int)))
    e_w = evaluate_fit(family, weighted, fit_mle(family, weighted))
    e_r = evaluate_fit(family, repeated, fit_mle(family, repeated))
    assert e_w.n == int(w.sum()) == e_r.n
    for label in ("concentration", "rate"):
        assert e_w.stderr[label] == pytest.approx(e_r.stderr[label], rel=1e-5)
    assert e_w.bic == pytest.approx(e_r.bic, rel=1e-9)
    # KS/CvM/AD of weighted data are those of the sample expanded by its weights
    assert set(e_w.gof) == {"ks", "cvm", "ad"}
    for statistic in ("ks", "cvm", "ad"):
        assert e_w.gof[statistic] == pytest.approx(e_r.gof[statistic], rel=1e-6)


# --- information criteria ------------------------------------------------------------------------


@pytest.mark.parametrize("name, fixed", [("gamma", {}), ("weibull", {}), ("binomial", {"total_count": 12.0})])
def test_aic_and_bic(name, fixed):
    case = CASES[name]
    x = case.sample(300, seed=9)
    family, observations, result = _fit(name, x, fixed=fixed)
    evaluation = evaluate_fit(family, observations, result)
    nll = scipy_nll(case, result.params, x)
    k = 2 if name != "binomial" else 1
    assert (evaluation.n, evaluation.k) == (300, k)
    assert evaluation.nll == pytest.approx(nll, rel=1e-10)
    assert evaluation.aic == pytest.approx(2 * k + 2 * nll, rel=1e-10)
    assert evaluation.bic == pytest.approx(k * math.log(300) + 2 * nll, rel=1e-10)


# --- goodness of fit -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["normal", "gamma", "weibull", "triangular", "studentt"])
def test_ks_cvm_ad_match_scipy(name):
    case = CASES[name]
    x = case.sample(250, seed=10)
    family, observations, result = _fit(name, x)
    gof = evaluate_fit(family, observations, result).gof
    frozen = case.scipy(result.params)
    assert gof["ks"] == pytest.approx(stats.kstest(x, frozen.cdf).statistic, rel=1e-10)
    assert gof["cvm"] == pytest.approx(stats.cramervonmises(x, frozen.cdf).statistic, rel=1e-8)
    # Anderson–Darling: A² = −n − (1/n) Σ (2i−1) [ln F(x_(i)) + ln(1 − F(x_(n+1−i)))]
    u = np.sort(frozen.cdf(x))
    n, i = len(u), np.arange(1, len(u) + 1)
    ad = -n - np.sum((2 * i - 1) * (np.log(u) + np.log1p(-u[::-1]))) / n
    assert gof["ad"] == pytest.approx(ad, rel=1e-8)
    assert 0 < gof["ks"] < 0.2


def test_gof_detects_a_wrong_family():
    x = CASES["gamma"].sample(1000, seed=11)
    family, observations, result = _fit("normal", x)
    gof = evaluate_fit(family, observations, result).gof
    frozen = stats.norm(result.params["loc"], result.params["scale"])
    assert stats.kstest(x, frozen.cdf).pvalue < 1e-3
    assert gof["ks"] == pytest.approx(stats.kstest(x, frozen.cdf).statistic, rel=1e-10)


def _pooled_chi_square(x: np.ndarray, frozen, k: int) -> tuple[float, int, float]:
    """Pool cells from the upper tail down until each expected count is at least 5; the last
    (lowest) leftover joins its neighbour. The open upper tail is the survival function."""
    top = int(x.max())
    n = len(x)
    observed = np.append(np.bincount(x.astype(int), minlength=top + 1), 0.0)
    expected = np.append(n * frozen.pmf(np.arange(top + 1)), n * frozen.sf(top))
    cells_o, cells_e, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed[::-1], expected[::-1], strict=False):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            cells_o.append(acc_o), cells_e.append(acc_e)
            acc_o = acc_e = 0.0
    cells_o[-1] += acc_o
    cells_e[-1] += acc_e
    result = stats.chisquare(cells_o, cells_e, ddof=k)
    return float(result.statistic), len(cells_o) - 1 - k, float(result.pvalue)


@pytest.mark.parametrize(
    "name, fixed, k", [("poisson", {}, 1), ("binomial", {"total_count": 12.0}, 1), ("negativebinomial", {}, 2)]
)
def test_chi_square_for_discrete_fits(name, fixed, k):
    case = CASES[name]
    x = case.sample(800, seed=12)
    family, observations, result = _fit(name, x, fixed=fixed)
    gof = evaluate_fit(family, observations, result).gof
    statistic, dof, pvalue = _pooled_chi_square(x, case.scipy(result.params), k)
    assert set(gof) == {"chi2", "chi2_dof", "chi2_pvalue"}
    assert gof["chi2_dof"] == dof and dof >= 3
    assert gof["chi2"] == pytest.approx(statistic, rel=1e-6)
    assert gof["chi2_pvalue"] == pytest.approx(pvalue, rel=1e-5)
    assert math.isfinite(gof["chi2"]) and 0 < gof["chi2_pvalue"] <= 1


# --- held-out NLL and recovery -------------------------------------------------------------------


def test_heldout_nll_is_the_scipy_nll_of_the_heldout_part():
    case = CASES["weibull"]
    x = case.sample(500, seed=13)
    train, heldout = x[:400], x[400:]
    family, observations, result = _fit("weibull", train)
    evaluation = evaluate_fit(family, observations, result, heldout=_obs(heldout))
    expected = scipy_nll(case, result.params, heldout)
    assert evaluation.heldout_nll == pytest.approx(expected, rel=1e-10)
    assert evaluation.heldout_mean_nll == pytest.approx(expected / 100, rel=1e-10)
    assert evaluation.metrics()["heldout_nll"] == evaluation.heldout_nll
    assert evaluate_fit(family, observations, result).heldout_nll is None


def test_recovery_error_is_the_absolute_difference_from_the_truth():
    case = CASES["gamma"]
    x = case.sample(300, seed=14)
    family, observations, result = _fit("gamma", x)
    truth = {"concentration": 2.5, "rate": 1.7, "not_a_parameter": 3.0}
    evaluation = evaluate_fit(family, observations, result, truth=truth)
    assert evaluation.recovery == {
        "concentration": abs(result.params["concentration"] - 2.5),
        "rate": abs(result.params["rate"] - 1.7),
    }
    assert evaluation.recovery["rate"] > 0
    metrics = evaluation.metrics()
    assert metrics["abs_error_rate"] == evaluation.recovery["rate"]
    assert metrics["se_rate"] == evaluation.stderr["rate"]
    assert metrics["aic"] == evaluation.aic and metrics["gof_ks"] == evaluation.gof["ks"]
