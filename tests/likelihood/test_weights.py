"""Frequency weights: a weighted fit is the fit of the data expanded by its integer weights —
estimates, NLL, standard errors, AIC/BIC and EDF statistics — also with censored rows and with a
fixed parameter; rows of weight 0 are no rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_table import CASES
from scipy import stats

from nllflow.data.samples import Sample
from nllflow.evaluation.summary import evaluate_fit
from nllflow.families import get_family
from nllflow.fitting.mle import fit_mle
from nllflow.likelihood.censoring import CensoredRows
from nllflow.likelihood.observations import Observations


def _t(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def _compare(family, weighted: Observations, expanded: Observations, fixed=None) -> None:
    r_w, r_e = fit_mle(family, weighted, fixed=fixed), fit_mle(family, expanded, fixed=fixed)
    e_w, e_e = evaluate_fit(family, weighted, r_w), evaluate_fit(family, expanded, r_e)
    assert r_w.converged and r_e.converged
    for label in r_e.params:
        assert r_w.params[label] == pytest.approx(r_e.params[label], rel=1e-6, abs=1e-9)
    assert r_w.nll == pytest.approx(r_e.nll, rel=1e-10)
    assert (e_w.n, e_w.k) == (e_e.n, e_e.k)
    assert e_w.aic == pytest.approx(e_e.aic, rel=1e-10) and e_w.bic == pytest.approx(e_e.bic, rel=1e-10)
    assert set(e_w.stderr) == set(e_e.stderr)
    for label, se in e_e.stderr.items():
        assert e_w.stderr[label] == pytest.approx(se, rel=1e-5)
    assert set(e_w.gof) == set(e_e.gof)
    for name, value in e_e.gof.items():
        assert e_w.gof[name] == pytest.approx(value, rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("name", ["normal", "gamma", "weibull", "studentt", "lognormal", "poisson", "negativebinomial"])
def test_weighted_fit_equals_the_fit_of_the_expanded_data(name, rng):
    case = CASES[name]
    # distinct values on a grid (off 0, outside the gamma's support), each repeated by its weight
    draws = case.sample(150, seed=4)
    x = np.unique(np.round(draws)) if case.discrete else np.unique(np.round(draws, 1)) + 0.05
    w = rng.integers(1, 5, len(x)).astype(np.float64)
    _compare(get_family(name), Observations(_t(x), _t(w)), Observations(_t(np.repeat(x, w.astype(int)))))


def test_weights_on_censored_rows_and_a_fixed_parameter(rng):
    """Exact and censored rows, both weighted, with the gamma's rate fixed: the same as repeating
    every row its weight's number of times."""
    x = np.round(rng.gamma(2.0, 1.0, 60), 2) + 0.01
    low = np.array([-np.inf, 0.5, 2.0, 4.0, 1.0])
    high = np.array([0.2, 1.5, np.inf, np.inf, 3.0])
    w_exact, w_censored = rng.integers(1, 4, len(x)).astype(float), np.array([3.0, 1.0, 2.0, 4.0, 2.0])
    weighted = Observations(_t(x), _t(w_exact), CensoredRows(_t(low), _t(high), _t(w_censored)))
    repeat = w_censored.astype(int)
    expanded = Observations(
        _t(np.repeat(x, w_exact.astype(int))),
        censored=CensoredRows(_t(np.repeat(low, repeat)), _t(np.repeat(high, repeat))),
    )
    assert weighted.total_weight == expanded.total_weight == w_exact.sum() + w_censored.sum()
    family = get_family("gamma")
    _compare(family, weighted, expanded)
    _compare(family, weighted, expanded, fixed={"rate": 1.2})


def test_rows_of_weight_zero_are_no_rows(rng):
    """A weight of 0 drops the row before anything sees it: the uniform's bounds and the fit are
    those of the other rows (a zero-weight outlier would otherwise widen the support)."""
    x = rng.uniform(1.0, 2.0, 50)
    sample = Sample(np.append(x, 40.0), "with an outlier of weight 0", weights=np.append(np.ones(50), 0.0))
    observations = sample.observations()
    assert observations.values.numel() == 50 and observations.bounds().max == x.max()
    result = fit_mle(get_family("uniform"), observations)
    assert result.params["high"] == pytest.approx(x.max(), rel=1e-12)


def test_weighted_edf_statistics_are_scipys_on_the_expanded_sample(rng):
    """KS and Cramér–von Mises of weighted, tied data against scipy's kstest and cramervonmises on
    the expanded sample (Anderson–Darling against its textbook formula there)."""
    x = np.unique(np.round(rng.gamma(2.0, 1.5, 200), 1)) + 0.05
    w = rng.integers(1, 6, len(x)).astype(np.float64)
    family = get_family("gamma")
    observations = Observations(_t(x), _t(w))
    result = fit_mle(family, observations)
    gof = evaluate_fit(family, observations, result).gof
    expanded = np.repeat(x, w.astype(int))
    frozen = stats.gamma(result.params["concentration"], scale=1 / result.params["rate"])
    assert gof["ks"] == pytest.approx(stats.kstest(expanded, frozen.cdf).statistic, rel=1e-10)
    assert gof["cvm"] == pytest.approx(stats.cramervonmises(expanded, frozen.cdf).statistic, rel=1e-10)
    n, i = len(expanded), np.arange(1, len(expanded) + 1)
    ad = -n - np.sum((2 * i - 1) * (frozen.logcdf(expanded) + frozen.logsf(expanded[::-1]))) / n
    assert gof["ad"] == pytest.approx(ad, rel=1e-10)
