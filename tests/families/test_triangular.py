"""The Triangular distribution against a scalar reference (the seed's per-value formula),
scipy.stats.triang, hand-derived gradients, finite differences and gradcheck."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from nllflow.families import get_family
from nllflow.families.triangular import Triangular, _polish_peak
from nllflow.fitting.mle import FitSettings, fit_mle
from nllflow.likelihood.observations import Observations


def _scalar_log_prob(x: float, a: float, c: float, b: float) -> float:
    """The seed's scalar log density, in plain floats (with c == a or c == b handled by the branch
    that exists)."""
    if x < a or x > b:
        return -math.inf
    if x < c or (x == c == b):
        return math.log(2) + math.log(x - a) - math.log(c - a) - math.log(b - a) if x > a else -math.inf
    return math.log(2) + math.log(b - x) - math.log(b - c) - math.log(b - a) if x < b else -math.inf


def _triang(a, c, b):
    return stats.triang((c - a) / (b - a), loc=a, scale=b - a)


def _t(*values):
    return [torch.tensor(v, dtype=torch.float64) for v in values]


# --- the seed's example --------------------------------------------------------------------------


def test_seed_example_gradients_equal_the_hand_derived_ones():
    """At x = 3 < peak the rising branch applies: NLL = -log 2 - log(x-a) + log(c-a) + log(b-a), so
    dNLL/da = 1/(x-a) - 1/(c-a) - 1/(b-a), dNLL/dc = 1/(c-a), dNLL/db = 1/(b-a)."""
    x, a, c, b = 3.0, 1.0, 3.5, 5.0
    lower, peak, upper = (torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (a, c, b))
    nll = -Triangular(lower, peak, upper).log_prob(torch.tensor([x], dtype=torch.float64)).mean()
    nll.backward()
    expected = {"lower": 1 / (x - a) - 1 / (c - a) - 1 / (b - a), "peak": 1 / (c - a), "upper": 1 / (b - a)}
    assert expected == pytest.approx({"lower": -0.15, "peak": 0.4, "upper": 0.25}, abs=1e-15)
    assert float(lower.grad) == pytest.approx(expected["lower"], abs=1e-14)
    assert float(peak.grad) == pytest.approx(expected["peak"], abs=1e-14)
    assert float(upper.grad) == pytest.approx(expected["upper"], abs=1e-14)
    assert float(nll.detach()) == pytest.approx(-math.log(2 * (x - a) / ((c - a) * (b - a))), abs=1e-14)


def test_seed_example_through_the_fitter_trace():
    """Row 0 of the trace holds the same partial derivatives (mean NLL, natural parameters)."""
    result = fit_mle(
        get_family("triangular"),
        Observations(torch.tensor([3.0], dtype=torch.float64)),
        init={"lower": 1.0, "peak": 3.5, "upper": 5.0},
        settings=FitSettings("sgd", 0.01, max_steps=1),
    )
    row = result.trace.iloc[0]
    assert (row["lower"], row["peak"], row["upper"]) == pytest.approx((1.0, 3.5, 5.0), abs=1e-12)
    assert row["grad_lower"] == pytest.approx(-0.15, abs=1e-12)
    assert row["grad_peak"] == pytest.approx(0.4, abs=1e-12)
    assert row["grad_upper"] == pytest.approx(0.25, abs=1e-12)


# --- log_prob ------------------------------------------------------------------------------------


def test_batched_log_prob_equals_scalar_loop_and_scipy():
    rng = np.random.default_rng(3)
    shape = (6, 5)
    a = rng.uniform(-2, 1, shape)
    b = a + rng.uniform(0.5, 4, shape)
    c = a + (b - a) * rng.uniform(0, 1, shape)
    c[0, :] = a[0, :]  # peak on the lower bound
    c[1, :] = b[1, :]  # peak on the upper bound
    x = rng.uniform(a - 0.5, b + 0.5, shape)  # some outside the support
    x[2, 0], x[2, 1], x[2, 2] = a[2, 0], b[2, 1], c[2, 2]  # on the edges and on the peak
    x[0, 0], x[1, 0] = a[0, 0], b[1, 0]  # on a degenerate peak
    got = Triangular(*_t(a, c, b), validate_args=False).log_prob(torch.as_tensor(x)).numpy()
    assert got.shape == shape
    loop = np.array([[_scalar_log_prob(x[i, j], a[i, j], c[i, j], b[i, j]) for j in range(5)] for i in range(6)])
    np.testing.assert_allclose(got, loop, rtol=1e-12)
    np.testing.assert_allclose(got, _triang(a, c, b).logpdf(x), rtol=1e-12)
    assert np.isneginf(got).any() and np.isfinite(got).any()


def test_log_prob_broadcasts_parameters_against_values():
    a, c, b = _t([0.0, 1.0, -1.0], [0.5, 2.0, 0.0], [1.0, 4.0, 3.0])
    x = torch.linspace(-1.5, 4.5, 13, dtype=torch.float64).unsqueeze(-1)
    got = Triangular(a, c, b, validate_args=False).log_prob(x)
    assert got.shape == (13, 3)
    np.testing.assert_allclose(got.numpy(), _triang(a.numpy(), c.numpy(), b.numpy()).logpdf(x.numpy()), rtol=1e-12)


@given(
    a=st.floats(-50, 50),
    widths=st.tuples(st.floats(0.0, 30), st.floats(0.0, 30)).filter(lambda w: w[0] + w[1] > 1e-3),
    # on the edges exactly, or clearly off them (no subnormal distances for scipy to underflow on)
    u=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-0.2, 1.2).filter(lambda u: min(abs(u), abs(1 - u)) > 1e-6)),
)
def test_log_prob_matches_scipy_for_any_parameters(a, widths, u):
    c, b = a + widths[0], a + widths[0] + widths[1]
    x = a + u * (b - a)
    got = float(Triangular(*_t(a, c, b), validate_args=False).log_prob(torch.tensor(x, dtype=torch.float64)))
    expected = _scalar_log_prob(x, a, c, b)
    if math.isinf(expected):
        assert got == expected
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
    if min(abs(u), abs(1 - u)) > 1e-6:
        # scipy standardises x first, which loses the last digits of a distance to an edge
        assert got == pytest.approx(float(_triang(a, c, b).logpdf(x)), rel=1e-7, abs=1e-7)


def test_log_prob_validates_samples_when_asked():
    dist = Triangular(*_t(0.0, 1.0, 2.0), validate_args=True)
    assert float(dist.log_prob(torch.tensor(0.5, dtype=torch.float64))) == pytest.approx(math.log(0.5), abs=1e-15)
    with pytest.raises(ValueError):
        dist.log_prob(torch.tensor(3.0, dtype=torch.float64))


# --- cdf, icdf, moments --------------------------------------------------------------------------


@pytest.mark.parametrize("a, c, b", [(1.0, 3.5, 5.0), (0.0, 0.0, 2.0), (-1.0, 3.0, 3.0), (-3.0, -2.9, 7.0)])
def test_cdf_matches_scipy_and_round_trips_with_icdf(a, c, b):
    dist = Triangular(*_t(a, c, b), validate_args=False)
    x = torch.linspace(a - 1, b + 1, 101, dtype=torch.float64)
    cdf = dist.cdf(x)
    np.testing.assert_allclose(cdf.numpy(), _triang(a, c, b).cdf(x.numpy()), rtol=1e-12, atol=1e-15)
    inside = (x > a) & (x < b)
    np.testing.assert_allclose(dist.icdf(cdf[inside]).numpy(), x[inside].numpy(), rtol=1e-9, atol=1e-9)
    u = torch.linspace(0.0, 1.0, 51, dtype=torch.float64)
    np.testing.assert_allclose(dist.cdf(dist.icdf(u)).numpy(), u.numpy(), atol=1e-12)
    np.testing.assert_allclose(dist.icdf(u).numpy(), _triang(a, c, b).ppf(u.numpy()), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("a, c, b", [(1.0, 3.5, 5.0), (0.0, 0.0, 2.0), (-1.0, 3.0, 3.0)])
def test_mean_variance_mode_entropy_match_scipy(a, c, b):
    dist, frozen = Triangular(*_t(a, c, b), validate_args=False), _triang(a, c, b)
    assert float(dist.mean) == pytest.approx(frozen.mean(), rel=1e-12)
    assert float(dist.variance) == pytest.approx(frozen.var(), rel=1e-12)
    assert float(dist.entropy()) == pytest.approx(frozen.entropy(), rel=1e-12)
    assert float(dist.mode) == c


def test_rsample_shape_distribution_and_gradient():
    a, c, b = _t([1.0, 0.0], [3.5, 0.0], [5.0, 2.0])
    torch.manual_seed(0)
    draws = Triangular(a, c, b).rsample((4000,))
    assert draws.shape == (4000, 2) and draws.dtype == torch.float64
    for j in range(2):
        pvalue = stats.kstest(draws[:, j].numpy(), _triang(float(a[j]), float(c[j]), float(b[j])).cdf).pvalue
        assert pvalue > 1e-3
    # reparametrised: the draws are differentiable in the parameters
    lower = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    sample = Triangular(lower, *_t(3.5, 5.0)).rsample((10,))
    sample.sum().backward()
    assert lower.grad is not None and math.isfinite(float(lower.grad)) and float(lower.grad) > 0


def test_expand_keeps_parameters():
    dist = Triangular(*_t(0.0, 1.0, 3.0)).expand((2, 3))
    assert dist.batch_shape == (2, 3)
    np.testing.assert_allclose(
        dist.log_prob(torch.full((2, 3), 2.0, dtype=torch.float64)).numpy(),
        np.full((2, 3), _triang(0.0, 1.0, 3.0).logpdf(2.0)),
        rtol=1e-12,
    )


# --- gradients -----------------------------------------------------------------------------------


def test_gradcheck_log_prob_and_cdf_on_interior_points():
    # values on both branches, none at the kink (the peak) or the edges
    x = torch.tensor([[1.2, 2.0, 3.0, 4.0, 4.9], [-0.5, 0.1, 0.5, 1.5, 1.9]], dtype=torch.float64)
    params = [
        torch.tensor([[v1], [v2]], dtype=torch.float64, requires_grad=True)
        for v1, v2 in ((1.0, -1.0), (3.5, 0.25), (5.0, 2.0))
    ]
    assert torch.autograd.gradcheck(lambda a, c, b: Triangular(a, c, b).log_prob(x), params)
    assert torch.autograd.gradcheck(lambda a, c, b: Triangular(a, c, b).cdf(x), params)
    values = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: Triangular(*[p.detach() for p in params]).log_prob(v), [values])
    assert torch.autograd.gradcheck(
        lambda u: Triangular(*[p.detach() for p in params]).icdf(u),
        [torch.tensor([[0.1, 0.4, 0.9]], dtype=torch.float64, requires_grad=True)],
    )


def test_log_prob_gradient_is_finite_outside_the_support():
    """The branch not taken must not poison the gradient with NaN (torch.where's classic trap)."""
    params = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (1.0, 3.5, 5.0)]
    x = torch.tensor([0.0, 2.0, 6.0], dtype=torch.float64)
    log_prob = Triangular(*params, validate_args=False).log_prob(x)
    assert torch.isneginf(log_prob[[0, 2]]).all()
    log_prob[1].backward()
    for p in params:
        assert torch.isfinite(p.grad).all()


# --- argument validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, c, b", [(2.0, 1.0, 3.0), (0.0, 4.0, 3.0), (1.0, 1.0, 1.0), ([0.0, 2.0], [1.0, 1.5], [2.0, 3.0])]
)
def test_invalid_parameters_raise_value_error(a, c, b):
    with pytest.raises(ValueError, match="lower <= peak <= upper"):
        Triangular(*_t(a, c, b), validate_args=True)


def test_valid_degenerate_peaks_are_accepted():
    Triangular(*_t(0.0, 0.0, 1.0), validate_args=True)
    Triangular(*_t(0.0, 1.0, 1.0), validate_args=True)


# --- the peak polish rule ------------------------------------------------------------------------


def test_polish_offers_the_best_data_points_as_peak():
    """For fixed bounds the candidates are the data points with the highest log-likelihood as the
    peak, computed here by brute force."""
    x = torch.as_tensor(np.random.default_rng(4).triangular(0.0, 1.0, 4.0, 60))
    lower, upper = torch.tensor(-0.1, dtype=torch.float64), torch.tensor(4.2, dtype=torch.float64)
    candidates = _polish_peak(x, {"lower": lower, "upper": upper}, frozenset({"lower", "peak", "upper"}), None)
    brute = torch.stack([Triangular(lower, p, upper).log_prob(x).sum() for p in x])
    best = set(torch.topk(brute, 5).indices.tolist())
    assert {int((x == c["peak"]).nonzero()) for c in candidates} == best
    assert _polish_peak(x, {"lower": lower, "upper": upper}, frozenset({"lower", "upper"}), None) == []


def test_polish_with_weights_equals_repeated_points():
    rng = np.random.default_rng(5)
    x = torch.as_tensor(rng.triangular(0.0, 1.0, 4.0, 30))
    w = torch.as_tensor(rng.integers(1, 4, 30).astype(np.float64))
    params = {"lower": torch.tensor(-0.1, dtype=torch.float64), "upper": torch.tensor(4.2, dtype=torch.float64)}
    free = frozenset({"lower", "peak", "upper"})
    weighted = [float(c["peak"]) for c in _polish_peak(x, params, free, w)]
    repeated = [float(c["peak"]) for c in _polish_peak(x.repeat_interleave(w.long()), params, free, None)]
    # repeated points tie with themselves, so the repeated data offer fewer distinct candidates
    assert weighted[0] == repeated[0]
    assert set(repeated) <= set(weighted) and len(set(weighted)) == 5
