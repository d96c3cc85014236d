"""Property and fuzz tests of the estimation core: random samples of every family, ties, tiny n and
magnitudes from 1e-300 to 1e300 end in a correct fit or a clear InputError, never in a NaN
presented as a result.

Oracles: scipy's log-likelihood at the reported parameters (family_table), closed-form MLEs, and the
equivariance of a scale family's MLE under rescaling the data.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from family_table import CASES, scipy_nll
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nllflow.data.samples import Sample, check_support
from nllflow.errors import InputError
from nllflow.evaluation.summary import evaluate_fit, fit_summary
from nllflow.families import family_names, get_family
from nllflow.fitting.mle import fit_mle
from nllflow.likelihood.observations import Observations


def fit_like_the_pipeline(name: str, x: np.ndarray):
    """What a flow does with a sample (support check, fit, evaluation, the CLI's JSON summary);
    None with the message when the input is refused."""
    family = get_family(name)
    try:
        check_support(family, Sample(x, "fuzz"))
        observations = Observations(torch.as_tensor(x))
        result = fit_mle(family, observations, fixed=CASES[name].fixed)
    except InputError as error:
        return None, str(error)
    evaluation = None if result.diverged else evaluate_fit(family, observations, result)
    return (result, evaluation, fit_summary(result, evaluation)), None


def assert_a_clear_refusal(message: str) -> None:
    assert message and "\n" not in message
    assert "nan" not in message.lower().replace("nan-", "")


def assert_no_nan_presented(name: str, x: np.ndarray, result, evaluation, summary) -> None:
    """Every number shown is finite; a standard error is missing only where `information` says why;
    the NLL shown is scipy's NLL at the parameters shown."""
    json.dumps(summary, allow_nan=False)  # jsonable turns a NaN into null: the checks below find those
    assert all(math.isfinite(v) for v in result.params.values()), result.params
    assert math.isfinite(result.nll) and summary["nll"] is not None
    # the trace keeps finite steps only (a gradient may overflow to ±inf: that is its true value)
    assert np.isfinite(result.trace[["nll", "mean_nll", *result.free]].to_numpy(dtype=float)).all()
    # to 1e-5: underdispersed counts put the negative binomial's MLE at total_count → ∞, where
    # scipy's lgamma differences lose ~6 digits at 1e9 (ours use Stirling's series there)
    assert result.nll == pytest.approx(scipy_nll(CASES[name], result.params, x), rel=1e-5, abs=1e-8)
    if result.diverged:  # a failed fit: its reason says so, and nothing is evaluated
        assert evaluation is None and not result.converged
        return
    # the optimiser never ends worse than it started
    assert result.nll <= result.trace["nll"].iloc[0] + 1e-9 * abs(result.trace["nll"].iloc[0])
    non_regular = get_family(name).non_regular
    for label in result.free:
        se = summary["stderr"][label]
        if se is None:
            explained = summary["information"] != "ok" or label.split("_")[0] in non_regular
            assert explained, f"{label}: no standard error and no note ({summary['information']})"
        else:
            assert se > 0 and summary["ci95"][label][0] <= result.params[label] <= summary["ci95"][label][1]


@settings(max_examples=80)
@given(
    name=st.sampled_from(family_names()),
    n=st.integers(2, 40),
    seed=st.integers(0, 2**32 - 1),
    ties=st.floats(0.0, 0.9),
)
# underdispersed counts: total_count runs towards the Poisson limit, where torch's own log_prob
# (lgamma(n + x) - lgamma(n) at n = 1e15) returned noise the optimiser took for a better fit
@example(name="negativebinomial", n=28, seed=115499, ties=0.6875)
def test_random_samples_of_every_family_fit_or_are_refused(name, n, seed, ties):
    x = CASES[name].sample(n, seed)
    x[: int(ties * n)] = x[-1]  # a share of the sample tied on one value (all of it: constant data)
    fitted, refusal = fit_like_the_pipeline(name, x)
    if fitted is None:
        assert_a_clear_refusal(refusal)
    else:
        assert_no_nan_presented(name, x, *fitted)


def _closed_form(name: str, x: np.ndarray) -> dict[str, float]:
    if name == "normal":
        return {"loc": x.mean(), "scale": x.std()}
    if name == "lognormal":
        return {"loc": np.log(x).mean(), "scale": np.log(x).std()}
    if name == "exponential":
        return {"rate": 1 / x.mean()}
    if name == "halfnormal":
        peak = np.abs(x).max()  # in units of the largest value, so squares neither under- nor overflow
        return {"scale": peak * np.sqrt(np.mean((x / peak) ** 2))}
    if name == "pareto":
        return {"scale": x.min(), "alpha": len(x) / np.log(x / x.min()).sum()}
    if name == "laplace":  # any loc between the two middle values is an MLE for even n; we take the midpoint
        middle = np.sort(x)[[(len(x) - 1) // 2, len(x) // 2]]
        return {"loc": middle.mean(), "scale": np.abs(x - middle.mean()).mean()}
    raise KeyError(name)


CLOSED_FORM = ["normal", "lognormal", "exponential", "halfnormal", "pareto", "laplace"]


@settings(max_examples=60)
@given(
    name=st.sampled_from(CLOSED_FORM),
    n=st.integers(3, 40),
    seed=st.integers(0, 2**32 - 1),
    exponent=st.integers(-300, 300),
)
def test_closed_form_mles_are_recovered_at_any_magnitude(name, n, seed, exponent):
    """Data rescaled by 10**exponent: the fit is the closed-form MLE, or it is refused in one line,
    or it fails as diverged (recorded as a failed run) — it is never a wrong estimate."""
    x = CASES[name].sample(n, seed) * 10.0**exponent
    fitted, refusal = fit_like_the_pipeline(name, x)
    if fitted is None:
        assert_a_clear_refusal(refusal)
        return
    result, evaluation, summary = fitted
    assert_no_nan_presented(name, x, result, evaluation, summary)
    if not result.diverged:
        expected = _closed_form(name, x)
        assert result.params == pytest.approx(expected, rel=1e-6), (result.reason, summary.get("information"))


def rescaled_error(name: str, seed: int, exponent: int) -> float:
    """The largest difference, in standard errors, between the fit of 10**exponent · x (mapped back:
    a location or scale divided by 10**exponent, a rate multiplied) and the fit of x itself."""
    x, c = CASES[name].sample(60, seed), 10.0**exponent
    (base, evaluation, _), _ = fit_like_the_pipeline(name, x)
    (scaled, *_), _ = fit_like_the_pipeline(name, x * c)
    assert base.converged and scaled.converged and not scaled.diverged, scaled.reason
    assert_no_nan_presented(name, x * c, *fit_like_the_pipeline(name, x * c)[0])
    worst = 0.0
    for label, value in base.params.items():
        back = (
            scaled.params[label] * c
            if label == "rate"
            else scaled.params[label] / (c if label in ("loc", "scale") else 1.0)
        )
        spread = evaluation.stderr[label] if math.isfinite(evaluation.stderr[label]) else abs(value)
        worst = max(worst, abs(back - value) / spread)
    return worst


@settings(max_examples=30)
@given(
    name=st.sampled_from(["gamma", "halfcauchy", "halfnormal", "weibull"]),
    seed=st.integers(0, 2**32 - 1),
    exponent=st.integers(-120, 120),
)
def test_scale_families_are_equivariant_under_rescaling(name, seed, exponent):
    """Multiplying the data by c multiplies a scale by c and a rate by 1/c and leaves shapes alone:
    the fit must follow to far below its own standard error."""
    assert rescaled_error(name, seed, exponent) <= 1e-4


@pytest.mark.parametrize("name", ["cauchy", "gumbel", "studentt", "normal", "laplace"])
def test_location_families_are_equivariant_under_rescaling(name):
    """A location is optimised in units of the data's spread, so data of size 1e±8 converges as
    tightly (in standard errors) as data of size 1."""
    assert max(rescaled_error(name, 0, exponent) for exponent in (-8, 8)) <= 1e-4
