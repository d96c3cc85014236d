"""Goodness of fit: KS, Cramér–von Mises and Anderson–Darling statistics of a continuous fit (with
frequency weights, those of the expanded sample), and a pooled chi-square test of a discrete one."""

from __future__ import annotations

import math

import numpy as np
import torch

from nllflow.families import Family
from nllflow.families import scipy_stats as stats
from nllflow.fitting.mle import FitResult
from nllflow.likelihood.observations import Observations


def goodness_of_fit(family: Family, observations: Observations, result: FitResult) -> dict[str, float]:
    """KS, Cramér–von Mises and Anderson–Darling statistics for continuous families (with frequency
    weights, those of the sample expanded by its weights); a pooled chi-square statistic with its
    degrees of freedom and p-value for discrete ones. None for censored data, which has no
    empirical distribution function of exact points, or for a family without a cdf."""
    if family.discrete:
        return _chi_square(family, observations, result)
    natural = {name: value.detach() for name, value in result.natural.items()}
    dist = family.build(**natural, validate_args=False)
    if observations.censored is not None or not family.has_tails:
        return {}
    order = torch.argsort(observations.values)
    with torch.no_grad():
        log_cdf, log_sf = family.log_tails(dist, observations.values[order])
    weights = None if observations.weights is None else observations.weights[order].double().cpu().numpy()
    statistics = edf_statistics(log_cdf.double().cpu().numpy(), log_sf.double().cpu().numpy(), weights)
    return {name: float(value) for name, value in statistics.items()}


def edf_statistics(log_cdf: np.ndarray, log_sf: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """KS, Cramér–von Mises and Anderson–Darling statistics from the fitted log F and log S at the
    sorted data (the last axis; leading axes are independent samples). A point of weight w stands
    for w tied points: it covers the ranks before+1 … before+w, whose sums are taken in closed form
    (for whole weights exactly the statistics of the expanded sample)."""
    cdf = np.exp(log_cdf)
    w = np.ones_like(cdf) if weights is None else np.broadcast_to(weights, cdf.shape)
    after = np.cumsum(w, axis=-1)
    before = after - w
    n = after[..., -1:]
    ks = np.maximum(np.max(after / n - cdf, axis=-1), np.max(cdf - before / n, axis=-1))
    # Σ over the block of (F - (2i-1)/2n)²: the block's mean rank term and its spread w(w²-1)/3
    centre = (before + after) / (2 * n)
    cvm = 1 / (12 * n[..., 0]) + np.sum(w * (cdf - centre) ** 2 + w * (w * w - 1) / (12 * n * n), axis=-1)
    # Σ over the block of (2i-1) = w(before+after), of (2n+1-2i) = w(2n-before-after)
    ad = -n[..., 0] - np.sum(w * ((before + after) * log_cdf + (2 * n - before - after) * log_sf), axis=-1) / n[..., 0]
    return {"ks": ks, "cvm": cvm, "ad": ad}


MIN_EXPECTED = 5.0


def _chi_square(family: Family, observations: Observations, result: FitResult) -> dict[str, float]:
    values = observations.values.detach().double().cpu()
    weights = None if observations.weights is None else observations.weights.detach().double().cpu()
    top = int(values.max())
    counts = torch.bincount(values.long(), weights=weights, minlength=top + 1).numpy()
    natural = {name: v.detach().double().cpu() for name, v in result.natural.items()}
    dist = family.build(**natural, validate_args=False)
    support = torch.arange(top + 1, dtype=torch.float64)
    pmf = dist.log_prob(support).exp().numpy()
    n = counts.sum()
    expected = np.append(n * pmf, max(n * (1 - pmf.sum()), 0.0))
    observed = np.append(counts, 0.0)
    bins_o, bins_e, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed[::-1], expected[::-1], strict=False):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= MIN_EXPECTED:
            bins_o.append(acc_o)
            bins_e.append(acc_e)
            acc_o = acc_e = 0.0
    if bins_e:
        bins_o[-1] += acc_o
        bins_e[-1] += acc_e
    bins_o, bins_e = np.array(bins_o), np.array(bins_e)
    statistic = float(np.sum((bins_o - bins_e) ** 2 / bins_e)) if len(bins_e) else math.nan
    dof = len(bins_e) - 1 - len(result.free)
    p_value = float(stats.chi2.sf(statistic, dof)) if dof > 0 else math.nan
    return {"chi2": statistic, "chi2_dof": float(dof), "chi2_pvalue": p_value}
