"""Censored observations: log-CDF and log-survival of every continuous family against scipy (far tails
included), the incomplete gamma and beta derivatives against finite differences, censored fits
against scipy's fits on CensoredData (the real smokedfish and fluazinam data), standard errors
against a finite-difference Hessian of scipy's censored NLL, and the data side (two columns in
fitdistrplus's convention)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from family_table import CASES, CONTINUOUS
from scipy import optimize, special, stats

from nllflow.data.samples import check_support, load_censored_sample
from nllflow.errors import InputError
from nllflow.evaluation.summary import evaluate_fit
from nllflow.families import get_family
from nllflow.fitting.mle import fit_mle
from nllflow.likelihood.censoring import CensoredRows
from nllflow.likelihood.observations import Observations
from nllflow.likelihood.special import log_beta_tails, log_gamma_tails


def _t(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


# --- log F and log S of every continuous family ---------------------------------------------------

PROBABILITIES = (1e-100, 1e-30, 1e-12, 1e-3, 0.3, 0.5)


def _tail_points(name: str):
    """(side, q, x): x = ppf(q) in the lower tail and isf(q) in the upper one. Next to a support
    end that the parameters set (pareto's scale, the triangular's upper bound) scipy computes
    1 - (s/x)^a and loses the digits below 1e-3, so those points are left out."""
    frozen = CASES[name].frozen()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for side in ("ppf", "isf"):
            for q in PROBABILITIES:
                if q < 1e-3 and (name, side) in {("pareto", "ppf"), ("triangular", "isf")}:
                    continue
                x = float(getattr(frozen, side)(q))
                if math.isfinite(x):
                    yield side, q, x


@pytest.mark.parametrize("name", CONTINUOUS)
def test_log_tails_match_scipy_into_the_far_tails(name):
    case = CASES[name]
    frozen = case.frozen()
    dist = get_family(name).build(**{k: torch.tensor(v, dtype=torch.float64) for k, v in case.params.items()})
    points = list(_tail_points(name))
    x = np.array([p[2] for p in points])
    log_cdf, log_sf = (t.numpy() for t in get_family(name).log_tails(dist, _t(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_cdf, expected_sf = frozen.logcdf(x), frozen.logsf(x)
    for ours, theirs in ((log_cdf, expected_cdf), (log_sf, expected_sf)):
        finite = np.isfinite(theirs)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-10, atol=1e-14)
        assert np.array_equal(ours[~finite], theirs[~finite])


def test_gamma_upper_tail_beyond_scipys_underflow():
    """log Q(2.5, 800): scipy's gamma.logsf underflows to -inf; the asymptotic series
    Q ≈ x^(a-1) e^-x / Γ(a) · (1 + (a-1)/x + (a-1)(a-2)/x² + …) is the oracle."""
    a, x = 2.5, 800.0
    terms, term = [1.0], 1.0
    for k in range(1, 12):
        term *= (a - k) / x
        terms.append(term)
    expected = (a - 1) * math.log(x) - x - math.lgamma(a) + math.log(math.fsum(terms))
    log_p, log_q = log_gamma_tails(torch.tensor(a, dtype=torch.float64), torch.tensor(x, dtype=torch.float64))
    assert float(log_q) == pytest.approx(expected, rel=1e-14)
    assert float(log_p) == pytest.approx(-math.exp(expected), rel=1e-12)


def test_normal_and_lognormal_far_tails_are_closed_form():
    """log Φ(-40) from its asymptotic expansion; the lognormal is the normal of log x."""
    z = 40.0
    expected = -z * z / 2 - math.log(z) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / z**2 + 3 / z**4 - 15 / z**6)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    assert float(get_family("normal").log_tails(normal, torch.tensor(-z, dtype=torch.float64))[0]) == pytest.approx(
        expected, rel=1e-12
    )
    lognormal = torch.distributions.LogNormal(normal.loc, normal.scale)
    log_cdf, log_sf = get_family("lognormal").log_tails(lognormal, torch.tensor(math.exp(z), dtype=torch.float64))
    assert float(log_sf) == pytest.approx(expected, rel=1e-12) and float(log_cdf) == pytest.approx(
        -math.exp(expected), rel=1e-10
    )


# --- derivatives of the incomplete gamma and beta functions ---------------------------------------


@pytest.mark.parametrize(
    "a, x", [(0.05, 0.01), (0.7, 0.3), (2.5, 1.0), (3.0, 8.0), (40.0, 35.0), (40.0, 60.0), (400.0, 380.0)]
)
def test_incomplete_gamma_shape_derivative_matches_finite_differences_of_scipy(a, x):
    """∂ log P/∂a and ∂ log Q/∂a (what torch's gammainc lacks) against central differences of
    scipy's gammainc/gammaincc."""
    shape = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    log_p, log_q = log_gamma_tails(shape, torch.tensor(x, dtype=torch.float64))
    assert log_p.item() == pytest.approx(math.log(special.gammainc(a, x)), rel=1e-12)
    assert log_q.item() == pytest.approx(math.log(special.gammaincc(a, x)), rel=1e-12)
    h = 1e-6 * a
    for value, reference in ((log_p, special.gammainc), (log_q, special.gammaincc)):
        (derivative,) = torch.autograd.grad(value, shape, retain_graph=True)
        numeric = (math.log(reference(a + h, x)) - math.log(reference(a - h, x))) / (2 * h)
        assert float(derivative) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    "a, b, x", [(0.5, 0.5, 0.2), (2.0, 5.0, 0.5), (50.0, 0.5, 0.95), (0.1, 30.0, 0.01), (300.0, 400.0, 0.45)]
)
def test_incomplete_beta_shape_derivatives_match_finite_differences_of_scipy(a, b, x):
    first = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    second = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    log_i, log_j = log_beta_tails(first, second, torch.tensor(x, dtype=torch.float64))
    assert log_i.item() == pytest.approx(math.log(special.betainc(a, b, x)), rel=1e-11)
    assert log_j.item() == pytest.approx(math.log(special.betaincc(a, b, x)), rel=1e-11)
    for value, reference in ((log_i, special.betainc), (log_j, special.betaincc)):
        grad_a, grad_b = torch.autograd.grad(value, (first, second), retain_graph=True)
        ha, hb = 1e-6 * a, 1e-6 * b
        numeric_a = (math.log(reference(a + ha, b, x)) - math.log(reference(a - ha, b, x))) / (2 * ha)
        numeric_b = (math.log(reference(a, b + hb, x)) - math.log(reference(a, b - hb, x))) / (2 * hb)
        assert float(grad_a) == pytest.approx(numeric_a, rel=1e-5, abs=1e-8)
        assert float(grad_b) == pytest.approx(numeric_b, rel=1e-5, abs=1e-8)


def test_second_derivatives_pass_gradgradcheck():
    """The observed information of a censored fit differentiates twice (x analytic, shapes by
    central differences of the exact first derivatives)."""
    a = torch.tensor([0.7, 3.0, 3.0, 40.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.3, 1.0, 8.0, 35.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(log_gamma_tails, (a, x))
    assert torch.autograd.gradgradcheck(log_gamma_tails, (a, x), atol=1e-5, rtol=1e-4)
    p = torch.tensor([0.7, 3.0, 2.0, 40.0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([2.0, 0.5, 5.0, 30.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.3, 0.9, 0.5, 0.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(log_beta_tails, (p, q, y))
    assert torch.autograd.gradgradcheck(log_beta_tails, (p, q, y), atol=1e-5, rtol=1e-4)


def test_studentt_tails_are_differentiable_in_df():
    """∂ log F/∂ν of the Student-t (through the incomplete beta) against central differences of scipy."""
    df = torch.tensor(3.5, dtype=torch.float64, requires_grad=True)
    dist = torch.distributions.StudentT(
        df, torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    )
    for x in (-30.0, -1.0, 0.7, 4.0):
        log_cdf = get_family("studentt").log_tails(dist, torch.tensor(x, dtype=torch.float64))[0]
        (derivative,) = torch.autograd.grad(log_cdf, df)
        numeric = (stats.t.logcdf(x, 3.5 + 1e-6, 0.5, 2.0) - stats.t.logcdf(x, 3.5 - 1e-6, 0.5, 2.0)) / 2e-6
        assert log_cdf.item() == pytest.approx(stats.t.logcdf(x, 3.5, 0.5, 2.0), rel=1e-12)
        assert float(derivative) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


# --- censored fits against scipy.stats on CensoredData --------------------------------------------


def _scipy_censored(sample) -> stats.CensoredData:
    low, high = sample.censored_low, sample.censored_high
    left, right = np.isinf(low), np.isinf(high)
    interval = ~left & ~right
    return stats.CensoredData(
        uncensored=sample.values,
        left=high[left],
        right=low[right],
        interval=np.column_stack([low[interval], high[interval]]),
    )


def _scipy_nll(frozen, sample) -> float:
    """The censored NLL from scipy's own logpdf, logcdf and logsf."""
    low, high = sample.censored_low, sample.censored_high
    left, right = np.isinf(low), np.isinf(high)
    interval = ~left & ~right
    return -float(
        frozen.logpdf(sample.values).sum()
        + frozen.logcdf(high[left]).sum()
        + frozen.logsf(low[right]).sum()
        + np.log(frozen.cdf(high[interval]) - frozen.cdf(low[interval])).sum()
    )


CENSORED_FITS = [
    ("smokedfish.csv", "lognormal", stats.lognorm, {"floc": 0}, lambda t: {"loc": math.log(t[2]), "scale": t[0]}),
    ("smokedfish.csv", "gamma", stats.gamma, {"floc": 0}, lambda t: {"concentration": t[0], "rate": 1 / t[2]}),
    ("smokedfish.csv", "weibull", stats.weibull_min, {"floc": 0}, lambda t: {"concentration": t[0], "scale": t[2]}),
    ("fluazinam_log10.csv", "normal", stats.norm, {}, lambda t: {"loc": t[0], "scale": t[1]}),
    ("fluazinam_log10.csv", "gumbel", stats.gumbel_r, {}, lambda t: {"loc": t[0], "scale": t[1]}),
]


@pytest.mark.parametrize(
    "file, name, scipy_family, fit_args, labels", CENSORED_FITS, ids=[f"{c[0]}-{c[1]}" for c in CENSORED_FITS]
)
def test_censored_fit_on_real_data_matches_scipy(shared_data, file, name, scipy_family, fit_args, labels):
    """smokedfish has left-, right- and interval-censored rows; fluazinam right-censored ones."""
    sample = load_censored_sample(shared_data / file, "left", "right")
    family = get_family(name)
    observations = sample.observations()
    result = fit_mle(family, observations)
    assert result.converged, result.reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = scipy_family.fit(_scipy_censored(sample), **fit_args)
    theirs = _scipy_nll(scipy_family(*fitted), sample)
    assert result.nll == pytest.approx(_scipy_nll(family.scipy(result.params), sample), rel=1e-11)
    assert result.nll <= theirs + 1e-9 * abs(theirs)
    # the same maximum: scipy's optimiser stops earlier on a flat likelihood (smokedfish's weibull
    # scale differs by 3e-4 relative, 0.05% of its standard error, at a slightly higher NLL)
    stderr = evaluate_fit(family, observations, result).stderr
    for label, value in labels(fitted).items():
        assert result.params[label] == pytest.approx(value, abs=0.01 * stderr[label])


def test_smokedfish_counts_follow_the_fitdistrplus_convention(shared_data):
    sample = load_censored_sample(shared_data / "smokedfish.csv", "left", "right")
    observations = sample.observations()
    assert sample.n == 103 and list(sample.values) == [15.0]
    assert observations.censored.counts() == {"left": 57, "right": 3, "interval": 42}
    assert observations.total_weight == 103.0


def test_simulated_interval_censoring_for_beta_and_studentt(rng):
    """Every row interval-censored on a grid: the incomplete beta carries both fits."""
    for name, frozen, scipy_family, fit_args in [
        ("beta", stats.beta(2.0, 5.0), stats.beta, {"floc": 0, "fscale": 1}),
        ("studentt", stats.t(4.0, 1.0, 2.0), stats.t, {}),
    ]:
        x = frozen.rvs(size=300, random_state=rng)
        step = 0.05 if name == "beta" else 0.5
        low = np.floor(x / step) * step
        sample = load_like(low, low + step)
        result = fit_mle(get_family(name), sample.observations())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = scipy_family.fit(_scipy_censored(sample), **fit_args)
        theirs = _scipy_nll(scipy_family(*fitted), sample)
        assert result.converged and result.nll <= theirs + 1e-8 * abs(theirs)
        assert result.nll == pytest.approx(_scipy_nll(get_family(name).scipy(result.params), sample), rel=1e-10)


def load_like(low: np.ndarray, high: np.ndarray):
    from nllflow.data.samples import Sample

    return Sample(np.empty(0), "censored rows", censored_low=low, censored_high=high)


def test_censored_standard_errors_match_a_finite_difference_hessian_of_scipys_nll(shared_data):
    """The observed information of the censored gamma (second derivatives in the shape through the
    incomplete gamma) against central differences of scipy's censored NLL."""
    sample = load_censored_sample(shared_data / "smokedfish.csv", "left", "right")
    family = get_family("gamma")
    observations = sample.observations()
    result = fit_mle(family, observations)
    evaluation = evaluate_fit(family, observations, result)
    theta = np.array([result.params["concentration"], result.params["rate"]])

    def nll(point):
        return _scipy_nll(stats.gamma(point[0], scale=1 / point[1]), sample)

    h = 1e-4 * theta
    hessian = np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            ei, ej = np.eye(2)[i] * h[i], np.eye(2)[j] * h[j]
            hessian[i, j] = (
                nll(theta + ei + ej) - nll(theta + ei - ej) - nll(theta - ei + ej) + nll(theta - ei - ej)
            ) / (4 * h[i] * h[j])
    se = np.sqrt(np.diag(np.linalg.inv(hessian)))
    assert evaluation.stderr["concentration"] == pytest.approx(se[0], rel=1e-4)
    assert evaluation.stderr["rate"] == pytest.approx(se[1], rel=1e-4)
    assert evaluation.n == 103 and evaluation.gof == {}


def test_a_fixed_parameter_with_censored_rows(shared_data):
    """lognormal with the scale fixed: the location is the 1-D minimum of scipy's censored NLL."""
    sample = load_censored_sample(shared_data / "smokedfish.csv", "left", "right")
    result = fit_mle(get_family("lognormal"), sample.observations(), fixed={"scale": 3.0})
    best = optimize.minimize_scalar(
        lambda m: _scipy_nll(stats.lognorm(3.0, scale=math.exp(m)), sample), bracket=(-5, -3), tol=1e-12
    )
    assert result.params["scale"] == 3.0 and result.free == ("loc",)
    assert result.params["loc"] == pytest.approx(best.x, abs=1e-6)
    assert result.nll <= best.fun + 1e-9


def test_bounds_of_censored_rows_reach_the_support_ends():
    """The uniform's ends must pass the finite upper bounds below the data and the finite lower
    bounds above it; its fit puts them there (left-censored at 1, right-censored at 5)."""
    rows = CensoredRows(_t([-np.inf, 5.0]), _t([1.0, np.inf]))
    observations = Observations(_t([2.0, 3.0, 2.5]), censored=rows)
    bounds = observations.bounds()
    assert (bounds.min, bounds.max) == (1.0, 5.0)
    result = fit_mle(get_family("uniform"), observations)
    # L = (1-a)/(b-a) · (b-5)/(b-a) / (b-a)³: a = 1 - (b-a)/5 and b = 5 + (b-a)/5 at the maximum
    width = result.params["high"] - result.params["low"]
    assert width == pytest.approx(4 / 0.6, rel=1e-6)
    assert result.params["low"] == pytest.approx(1 - width / 5, rel=1e-6)


# --- the data side ---------------------------------------------------------------------------------


@pytest.fixture
def censored_files(tmp_path):
    pd.DataFrame({"l": [1.0, np.nan, 2.0, 4.0], "r": [1.0, 3.0, np.nan, 5.0], "w": [1.0, 2.0, 0.0, 3.0]}).to_csv(
        tmp_path / "ok.csv", index=False
    )
    pd.DataFrame({"l": [1.0, np.nan], "r": [2.0, np.nan]}).to_csv(tmp_path / "both.csv", index=False)
    pd.DataFrame({"l": [1.0, 3.0], "r": [2.0, 2.5]}).to_csv(tmp_path / "reversed.csv", index=False)
    pd.DataFrame({"l": [1.0, "x"], "r": [2.0, 3.0]}).to_csv(tmp_path / "text.csv", index=False)
    return tmp_path


def test_censored_columns_become_rows_with_weights(censored_files):
    sample = load_censored_sample(censored_files / "ok.csv", "l", "r", weights="w")
    assert list(sample.values) == [1.0] and list(sample.weights) == [1.0]
    assert list(sample.censored_low) == [-np.inf, 2.0, 4.0] and list(sample.censored_high) == [3.0, np.inf, 5.0]
    observations = sample.observations()
    # the row of weight 0 (right-censored at 2) is no row at all
    assert observations.total_weight == 6.0 and observations.censored.counts() == {"left": 1, "right": 0, "interval": 1}
    with pytest.raises(InputError, match="censored rows, which need a continuous family; poisson is discrete"):
        check_support(get_family("poisson"), sample)


@pytest.mark.parametrize(
    "file, message",
    [
        ("both.csv", r"row 1 of .*both.csv has neither 'l' nor 'r' \(1 such row\(s\)\)"),
        ("reversed.csv", r"row 1 of .*reversed.csv has l=3 > r=2.5 \(1 such row\(s\)\): 'l' must be <= 'r'"),
        ("text.csv", r"column 'l' in .*text.csv is not numeric"),
    ],
)
def test_bad_censored_columns_are_one_line_input_errors(censored_files, file, message):
    with pytest.raises(InputError, match=message) as error:
        load_censored_sample(censored_files / file, "l", "r")
    assert "\n" not in str(error.value)
