"""The one optimisation loop: typed outcomes (never decided on a message's wording), the warning for
library callers, rows that end on their own, and the batched path where torch refuses one row's
parameters."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from family_table import CASES
from scipy import stats

from nllflow.errors import ConvergenceWarning
from nllflow.families import get_family
from nllflow.fitting.batched import fit_batched
from nllflow.fitting.engine import Outcome
from nllflow.fitting.mle import FitSettings, fit_mle
from nllflow.likelihood.censoring import CensoredRows
from nllflow.likelihood.observations import Observations


def _obs(x) -> Observations:
    return Observations(torch.as_tensor(np.asarray(x, dtype=np.float64)))


@pytest.fixture(scope="module")
def normal_data() -> np.ndarray:
    return np.random.default_rng(1).normal(3.0, 2.0, 400)


def test_each_way_a_fit_ends_has_its_outcome(normal_data):
    """The outcome and the flags follow from the situation, checked against what it must be."""
    normal = get_family("normal")
    converged = fit_mle(normal, _obs(normal_data))
    assert converged.outcome is Outcome.GRADIENT and converged.converged and not converged.diverged
    # the MLE of a normal: the mean and the root mean square deviation
    assert converged.params["loc"] == pytest.approx(normal_data.mean(), rel=1e-9)
    assert converged.params["scale"] == pytest.approx(normal_data.std(), rel=1e-8)

    budget = fit_mle(normal, _obs(normal_data), init={"loc": 0.0, "scale": 1.0}, settings=FitSettings("adam", 0.01, 3))
    assert budget.outcome is Outcome.MAX_STEPS and not budget.converged and budget.steps == 3

    settled = fit_mle(
        normal, _obs(normal_data), init={"loc": 0.0, "scale": 1.0}, settings=FitSettings("adam", 0.01, 400, ftol=0.5)
    )
    assert settled.outcome is Outcome.CHANGE and settled.converged and settled.steps == 1

    fixed = fit_mle(normal, _obs(normal_data), fixed={"loc": 3.0, "scale": 2.0})
    assert fixed.outcome is Outcome.FIXED and fixed.converged and fixed.steps == 0
    assert fixed.nll == pytest.approx(-stats.norm(3.0, 2.0).logpdf(normal_data).sum(), rel=1e-12)

    # ∂NLL/∂σ = 1/σ - mean((x-μ)²)/σ³ > 0 at σ = 10: the seed's step takes σ below 0
    diverged = fit_mle(
        normal, _obs(normal_data), init={"loc": 3.0, "scale": 10.0}, settings=FitSettings("sgd", 1e6, 50)
    )
    assert diverged.outcome is Outcome.DIVERGED and diverged.diverged and not diverged.converged
    assert np.isfinite(diverged.trace[["nll", "loc", "scale"]].to_numpy()).all()


def test_an_sgd_step_past_a_data_bound_stops_without_diverging():
    """The uniform's low must stay below the smallest point: the seed's SGD stops at that bound
    (the polish then holds low on the data), it does not diverge."""
    x = np.random.default_rng(2).uniform(1.0, 4.0, 200)
    result = fit_mle(get_family("uniform"), _obs(x), settings=FitSettings("sgd", 5.0, 200))
    assert not result.diverged
    assert result.params["low"] == pytest.approx(x.min(), abs=1e-12)
    assert result.params["high"] >= x.max()


def test_non_convergence_warns_library_callers_and_convergence_does_not(normal_data):
    normal = get_family("normal")
    with pytest.warns(ConvergenceWarning, match="normal fit: max steps reached"):
        fit_mle(normal, _obs(normal_data), init={"loc": 0.0, "scale": 1.0}, settings=FitSettings("adam", 0.01, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert fit_mle(normal, _obs(normal_data)).converged


def test_outcomes_do_not_depend_on_the_messages_wording(normal_data, monkeypatch):
    """Rewording every message leaves the control flow (and the flags) as they were."""
    from nllflow.fitting import engine

    before = fit_mle(
        get_family("normal"), _obs(normal_data), init={"loc": 3.0, "scale": 10.0}, settings=FitSettings("sgd", 1e6, 50)
    )
    original = engine.refused_message
    monkeypatch.setattr(engine, "refused_message", lambda *args: "refused: " + original(*args).upper())
    after = fit_mle(
        get_family("normal"), _obs(normal_data), init={"loc": 3.0, "scale": 10.0}, settings=FitSettings("sgd", 1e6, 50)
    )
    assert before.outcome is after.outcome is Outcome.DIVERGED
    assert before.steps == after.steps


def _censored_studentt() -> Observations:
    x = CASES["studentt"].sample(300, seed=4)
    low = torch.tensor([2.0, -math.inf, 0.5], dtype=torch.float64)
    high = torch.tensor([math.inf, -1.0, 1.5], dtype=torch.float64)
    return Observations(torch.as_tensor(x), None, CensoredRows(low, high))


def test_a_batched_row_whose_parameters_torch_refuses_ends_as_diverged_and_the_rest_go_on():
    """A huge Adam step takes df to exp(-1e6) = 0; the Student-t's inner Chi2 refuses it (whatever
    validate_args says) for the whole batch. That row alone ends as diverged, at its last finite
    step; every other row is the fit_mle of its configuration."""
    observations = _censored_studentt()
    family = get_family("studentt")
    # the data's df is 4: at df 9 the NLL falls with df, so Adam's first step lowers log df by 1e6
    init = {"df": 9.0, "loc": -1.0, "scale": 0.5}
    settings = [FitSettings("adam", 0.01, 40), FitSettings("adam", 1e6, 40), FitSettings("sgd", 0.001, 30)]
    rows = fit_batched(family, observations, settings, init=init)
    refused = rows[1]
    assert refused.outcome is Outcome.DIVERGED and refused.diverged
    assert refused.reason.startswith("diverged: studentt refused the parameters tried at step 1")
    assert refused.steps == 0 and refused.params["df"] == pytest.approx(9.0)
    for s, got in zip(settings, rows, strict=True):
        alone = fit_mle(family, observations, init=init, settings=s)
        assert (got.outcome, got.reason, got.steps) == (alone.outcome, alone.reason, alone.steps)
        np.testing.assert_allclose(got.trace.to_numpy(), alone.trace.to_numpy(), rtol=1e-10, atol=1e-12)


def test_step_times_grow_and_match_the_trace(normal_data):
    result = fit_mle(
        get_family("normal"), _obs(normal_data), init={"loc": 0.0, "scale": 1.0}, settings=FitSettings("adam", 0.05, 20)
    )
    assert len(result.step_times) == len(result.trace)
    assert all(b >= a for a, b in zip(result.step_times, result.step_times[1:], strict=False))
