"""The batched bootstrap: its B refits against a slow reference loop of B separate fit_mle calls on
the same resamples (parametric and nonparametric, weighted, censored, a fixed parameter, a kink),
the percentile intervals against numpy's quantiles of the reference estimates, and the parametric
goodness-of-fit p-values roughly calibrated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_table import CASES

from nllflow.errors import InputError
from nllflow.families import get_family
from nllflow.fitting.bootstrap import bootstrap, check_bootstrap, draw_resamples, fit_batch
from nllflow.fitting.engine import Tolerances
from nllflow.fitting.mle import fit_mle
from nllflow.likelihood.censoring import CensoredRows
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import ConstantModel

REPLICATES = 6
TOLERANCES = Tolerances.for_settings(torch.float64, "lbfgs", None, None)


def _t(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def _replicate(batch: Observations, b: int) -> Observations:
    """Resample b of a batch, on its own."""
    if batch.values.dim() == 2:
        return Observations(batch.values[b])
    censored = batch.censored
    rows = None if censored is None else CensoredRows(censored.low, censored.high, censored.weights[b])
    return Observations(batch.values, batch.weights[b], rows)


def _batched_and_looped(family, observations, kind, fixed=None):
    result = fit_mle(family, observations, fixed=fixed)
    batch = draw_resamples(family, observations, result.natural, kind, REPLICATES, torch.Generator().manual_seed(3))
    space = ConstantModel(family, observations, fixed=fixed)
    fitted = fit_batch(space, batch, result.natural, REPLICATES, TOLERANCES)
    reference = [fit_mle(family, _replicate(batch, b), fixed=fixed) for b in range(REPLICATES)]
    return space, fitted, reference


CASES_TO_REFIT = [
    ("normal", "nonparametric"),
    ("normal", "parametric"),
    ("gamma", "nonparametric"),
    ("gamma", "parametric"),
    ("weibull", "nonparametric"),
    ("studentt", "parametric"),
    ("beta", "nonparametric"),
    ("poisson", "parametric"),
    ("negativebinomial", "nonparametric"),
    ("categorical", "nonparametric"),
]


@pytest.mark.parametrize("name, kind", CASES_TO_REFIT)
def test_batched_refits_match_a_loop_of_separate_fits(name, kind):
    case = CASES[name]
    family = get_family(name)
    observations = Observations(_t(case.sample(200, seed=5)))
    space, fitted, reference = _batched_and_looped(family, observations, kind, case.fixed)
    assert bool(fitted.converged.all())
    for b, single in enumerate(reference):
        # both are maxima to their tolerances: the batched NLL is never worse
        assert float(fitted.mean_nll[b]) <= single.mean_nll + 1e-12
        for name_ in space.free:
            np.testing.assert_allclose(
                fitted.natural[name_][b].numpy(), single.natural[name_].numpy(), rtol=2e-6, atol=1e-8
            )


def test_censored_weighted_rows_with_a_fixed_parameter():
    """Nonparametric resamples of weighted exact and censored rows, the gamma's rate held fixed."""
    rng = np.random.default_rng(6)
    x = rng.gamma(2.0, 1.0, 80)
    rows = CensoredRows(_t([-np.inf, 0.5, 3.0, 1.0]), _t([0.3, 1.5, np.inf, 2.0]), _t([2.0, 1.0, 3.0, 1.0]))
    observations = Observations(_t(x), _t(rng.integers(1, 3, 80)), rows)
    family = get_family("gamma")
    for fixed in (None, {"rate": 1.1}):
        space, fitted, reference = _batched_and_looped(family, observations, "nonparametric", fixed)
        assert bool(fitted.converged.all()) and space.free == (
            ("concentration", "rate") if fixed is None else ("concentration",)
        )
        for b, single in enumerate(reference):
            for name in space.free:
                assert float(fitted.natural[name][b]) == pytest.approx(single.params[name], rel=2e-6)
            if fixed:
                assert float(fitted.natural["rate"]) == 1.1


def test_laplace_kink_reaches_at_least_the_loops_likelihood():
    """The location's MLE is a median, where the NLL has a kink and no Hessian: the batched refit
    must still move the scale to its optimum (the NLL is the test: an even-sized resample has a
    whole interval of medians)."""
    family = get_family("laplace")
    observations = Observations(_t(CASES["laplace"].sample(201, seed=7)))
    _, fitted, reference = _batched_and_looped(family, observations, "nonparametric")
    for b, single in enumerate(reference):
        assert float(fitted.mean_nll[b]) <= single.mean_nll + 1e-10


def test_percentile_intervals_are_quantiles_of_the_reference_estimates():
    """bootstrap() end to end against the same resamples refitted one by one."""
    family = get_family("weibull")
    observations = Observations(_t(CASES["weibull"].sample(150, seed=8)))
    result = fit_mle(family, observations)
    boot = bootstrap(family, observations, result, replicates=40, kind="nonparametric", seed=11, level=0.9)
    batch = draw_resamples(family, observations, result.natural, "nonparametric", 40, torch.Generator().manual_seed(11))
    reference = np.array(
        [[fit_mle(family, _replicate(batch, b)).params[k] for k in ("scale", "concentration")] for b in range(40)]
    )
    assert boot.converged == 40 and list(boot.estimates.columns) == ["scale", "concentration"]
    for j, label in enumerate(("scale", "concentration")):
        np.testing.assert_allclose(boot.estimates[label].to_numpy(), reference[:, j], rtol=2e-6)
        low, high = boot.intervals[label]
        assert low == pytest.approx(np.quantile(reference[:, j], 0.05), rel=2e-6)
        assert high == pytest.approx(np.quantile(reference[:, j], 0.95), rel=2e-6)
        assert boot.stderr[label] == pytest.approx(reference[:, j].std(ddof=1), rel=1e-4)
        # the percentile interval covers the estimate, about as wide as the Wald interval
        assert low < result.params[label] < high
    assert boot.gof_pvalue == {}  # only a parametric bootstrap tests the fit


def test_parametric_gof_pvalues_are_roughly_calibrated():
    """Data from the family: p-values not small. Lognormal data fitted by a gamma: tiny."""
    rng = np.random.default_rng(12)
    family = get_family("gamma")
    p_values = {}
    for label, x in (("gamma", rng.gamma(2.5, 1 / 1.7, 300)), ("lognormal", rng.lognormal(0.0, 0.9, 300))):
        observations = Observations(_t(x))
        result = fit_mle(family, observations)
        boot = bootstrap(family, observations, result, replicates=199, kind="parametric", seed=1)
        assert boot.converged == 199 and set(boot.gof_pvalue) == {"ks", "cvm", "ad"}
        p_values[label] = boot.gof_pvalue
    assert min(p_values["gamma"].values()) > 0.05
    assert max(p_values["lognormal"].values()) <= 0.01


def test_what_the_bootstrap_refuses():
    observations = Observations(_t([1.0, 2.0, 3.0]), censored=CensoredRows(_t([4.0]), _t([np.inf])))
    with pytest.raises(InputError, match="parametric bootstrap of censored data"):
        check_bootstrap(get_family("gamma"), observations, ("concentration", "rate"), "parametric")
    with pytest.raises(InputError, match="no bootstrap for pareto with scale free"):
        check_bootstrap(get_family("pareto"), observations, ("scale", "alpha"), "nonparametric")
    check_bootstrap(get_family("pareto"), observations, ("alpha",), "nonparametric")  # the scale fixed: regular
