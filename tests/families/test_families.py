"""The family registry against scipy.stats, one fixture row per family (tests/family_table.py):
densities, cdfs, supports, the families' own scipy mappings, parameter recovery on simulated data,
and NLLs never worse than scipy's own `fit`."""

from __future__ import annotations

import math
import warnings

import mpmath
import numpy as np
import pytest
import torch
import torch.distributions as D
from family_table import CASES, SCIPY_FITTABLE, WITH_CDF, fit_case, scipy_nll
from scipy.special import softmax

from nllflow.errors import InputError
from nllflow.families import family_names, get_family
from nllflow.fitting.mle import FitSettings, fit_mle
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import start_values

ALL = sorted(CASES)


def _tensors(params: dict) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(value, dtype=torch.float64) for name, value in params.items()}


def _labelled(params: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for name, value in params.items():
        value = torch.as_tensor(value, dtype=torch.float64)
        if value.dim() == 0:
            out[name] = float(value)
        else:
            out.update({f"{name}_{i + 1}": float(v) for i, v in enumerate(value.reshape(-1))})
    return out


def _scipy_log_density(case, params: dict[str, float], x: np.ndarray) -> np.ndarray:
    frozen = case.scipy(params)
    return frozen.logpmf(x) if case.discrete else frozen.logpdf(x)


# --- the registry --------------------------------------------------------------------------------


def test_every_registered_family_has_a_fixture_row():
    assert sorted(family_names()) == ALL
    assert len(ALL) == 20


def test_unknown_family_lists_the_valid_ones():
    with pytest.raises(InputError, match=r"unknown family 'nromal'.*normal.*triangular"):
        get_family("nromal")


@pytest.mark.parametrize("name", ALL)
def test_discreteness_matches_scipy(name):
    family, case = get_family(name), CASES[name]
    assert family.discrete == case.discrete == family.support.is_discrete


# --- densities -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_log_prob_matches_scipy_on_a_batch(name):
    case, family = CASES[name], get_family(name)
    x = case.sample(300, seed=7)
    dist = family.build(**_tensors(case.params), validate_args=False)
    # a 2-D batch of values against one parameter set
    batch = torch.as_tensor(x.reshape(30, 10))
    got = dist.log_prob(batch)
    assert got.shape == (30, 10)
    np.testing.assert_allclose(
        got.numpy(), _scipy_log_density(case, case.labels, x).reshape(30, 10), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("name", ALL)
def test_log_prob_broadcasts_a_batch_of_parameters(name):
    """Two parameter sets (the truth and the family's start values on a sample) as a batch of shape
    (2, 1) against values of shape (m,): each row equals scipy at its own parameters."""
    case, family = CASES[name], get_family(name)
    x = case.sample(200, seed=8)
    start = {
        **{
            k: torch.as_tensor(v, dtype=torch.float64)
            for k, v in start_values(family, Observations(torch.as_tensor(x))).items()
        },
        **_tensors(case.fixed),
    }
    truth = _tensors(case.params)
    assert _labelled(start) != case.labels
    stacked = {name: torch.stack([truth[name], start[name].reshape(truth[name].shape)]).unsqueeze(1) for name in truth}
    got = family.build(**stacked, validate_args=False).log_prob(torch.as_tensor(x))
    assert got.shape == (2, 200)
    for row, params in enumerate([case.labels, _labelled(start)]):
        np.testing.assert_allclose(got[row].numpy(), _scipy_log_density(case, params, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", WITH_CDF)
def test_cdf_matches_scipy(name):
    case, family = CASES[name], get_family(name)
    frozen = case.frozen()
    x = np.concatenate([case.sample(200, seed=9), frozen.ppf(np.linspace(0.01, 0.99, 25))])
    got = family.build(**_tensors(case.params), validate_args=False).cdf(torch.as_tensor(x))
    np.testing.assert_allclose(got.numpy(), frozen.cdf(x), rtol=1e-9, atol=1e-12)


# --- supports ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_data_support_holds_samples_and_refuses_outside_points(name):
    case, family = CASES[name], get_family(name)
    inside = family.support.check(torch.as_tensor(case.sample(500, seed=10)))
    assert bool(inside.all())
    outside = torch.tensor([*case.outside, math.nan], dtype=torch.float64)
    assert not bool(family.support.check(outside).any())


# --- the families' own scipy mappings ------------------------------------------------------------


def test_only_categorical_lacks_a_scipy_mapping():
    assert [name for name in ALL if get_family(name).scipy is None] == ["categorical"]


@pytest.mark.parametrize("name", [n for n in ALL if n != "categorical"])
def test_family_scipy_mapping_agrees_with_ours(name):
    case, family = CASES[name], get_family(name)
    theirs, ours = family.scipy(case.labels), case.frozen()
    x = case.sample(100, seed=11)
    if case.discrete:
        np.testing.assert_allclose(theirs.logpmf(x), ours.logpmf(x), rtol=1e-12)
    else:
        np.testing.assert_allclose(theirs.logpdf(x), ours.logpdf(x), rtol=1e-12)
        np.testing.assert_allclose(theirs.cdf(x), ours.cdf(x), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(theirs.mean(), ours.mean(), rtol=1e-12)


@pytest.mark.parametrize("total_count", [0.7, 99.0, 101.0, 1e4, 1e9, 1e15])
def test_negativebinomial_log_prob_is_exact_towards_the_poisson_limit(total_count):
    """Against mpmath at 50 digits: torch's lgamma(n + x) - lgamma(n) loses every digit at n = 1e15
    (errors of order 1 per count), which a fit of underdispersed counts walks into."""
    x = np.array([0.0, 1.0, 3.0, 17.0, 250.0, 4e4])
    probs = 3.0 / (3.0 + total_count)
    got = get_family("negativebinomial").build(*_tensors({"n": total_count, "p": probs}).values())
    with mpmath.workdps(50):
        n, p = mpmath.mpf(total_count), mpmath.mpf(probs)
        rising = [mpmath.loggamma(n + k) - mpmath.loggamma(n) - mpmath.loggamma(k + 1) for k in x]
        exact = [r + n * mpmath.log1p(-p) + k * mpmath.log(p) for r, k in zip(rising, x, strict=True)]
    np.testing.assert_allclose(got.log_prob(torch.as_tensor(x)).numpy(), np.array(exact, dtype=float), rtol=1e-12)


def test_categorical_build_pins_logit_zero():
    logits = torch.tensor([0.5, -0.3, 1.0], dtype=torch.float64)
    dist = get_family("categorical").build(logits=logits)
    np.testing.assert_allclose(dist.probs.numpy(), softmax([0.0, 0.5, -0.3, 1.0]), rtol=1e-14)


# --- recovery and NLL on simulated data ----------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_parameter_recovery(name):
    """With n = 2000 draws from scipy, each estimate is within 4 standard errors of the truth (or
    the row's tolerance where the MLE sits at a data bound or kink and has no standard error)."""
    fit = fit_case(name)
    family, case, result, evaluation = get_family(name), fit.case, fit.result, fit.evaluation
    assert result.converged, result.reason
    assert result.nll == pytest.approx(scipy_nll(case, result.params, fit.x), rel=1e-10)
    if any(name not in family.non_regular for name in result.free_params):
        assert evaluation.information.startswith("ok"), evaluation.information
    else:
        assert evaluation.information == "no regular free parameters"
    for label, truth in case.labels.items():
        estimate = result.params[label]
        name_of = label.split("_")[0] if label.startswith("logits_") else label
        if name_of in case.fixed:
            assert label not in result.free and estimate == truth
            continue
        se = evaluation.stderr[label]
        if name_of in family.non_regular:
            assert math.isnan(se)
            assert abs(estimate - truth) <= case.recovery_tol[label], (label, estimate, truth)
        else:
            assert 0 < se < math.inf, label
            assert abs(estimate - truth) <= 4 * se, (label, estimate, truth, se)


def _scipy_fit(case, x: np.ndarray) -> dict[str, float]:
    family, kwargs, labels = case.scipy_fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's optimisers warn on the way
        return labels(family.fit(x, **kwargs))


@pytest.mark.parametrize("name", SCIPY_FITTABLE)
def test_nll_is_never_worse_than_scipy_fit(name):
    fit = fit_case(name)
    ours = scipy_nll(fit.case, fit.result.params, fit.x)
    theirs = scipy_nll(fit.case, _scipy_fit(fit.case, fit.x), fit.x)
    assert math.isfinite(ours)
    assert ours <= theirs + 1e-9 * abs(theirs)


@pytest.mark.parametrize(
    "lower, peak, upper, n, seed",
    [
        (1.0, 3.5, 5.0, 200, 0),
        (0.0, 0.0, 1.0, 300, 1),
        (0.0, 1.0, 1.0, 300, 2),
        (-2.0, 0.0, 5.0, 50, 3),
        (10.0, 10.5, 20.0, 500, 4),
        (0.0, 0.5, 1.0, 30, 5),
    ],
)
def test_triangular_nll_is_never_worse_than_scipy_triang_fit(lower, peak, upper, n, seed):
    case = CASES["triangular"]
    x = np.random.default_rng(seed).triangular(lower, peak, upper, n)
    result = fit_mle(get_family("triangular"), Observations(torch.as_tensor(x)))
    ours = scipy_nll(case, result.params, x)
    theirs = scipy_nll(case, _scipy_fit(case, x), x)
    assert math.isfinite(ours)
    assert ours <= theirs + 1e-9 * abs(theirs)
    assert result.params["lower"] < x.min() and result.params["upper"] > x.max()


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_binomial_needs_and_keeps_its_total_count(optimizer):
    x = CASES["binomial"].sample(500, seed=12)
    family = get_family("binomial")
    observations = Observations(torch.as_tensor(x))
    with pytest.raises(InputError, match="total_count"):
        fit_mle(family, observations)
    result = fit_mle(family, observations, fixed={"total_count": 12}, settings=FitSettings(optimizer, None, 2000))
    assert result.params["total_count"] == 12.0 and result.free == ("probs",)
    # the binomial MLE of p is the mean over n
    assert result.params["probs"] == pytest.approx(x.mean() / 12, rel=1e-6)


def test_family_builds_are_torch_distributions():
    for name in ALL:
        dist = get_family(name).build(**_tensors(CASES[name].params), validate_args=True)
        assert isinstance(dist, D.Distribution)
