"""How good a regression is: coefficient tables from the observed information, randomized quantile
residuals (Dunn & Smyth 1996; gamlss' and DHARMa's convention) with their moments, and the natural
parameters of new rows.

The observed information is taken in the coordinates that are reported: each coefficient of a
parameter with a formula on the original scale of its covariates, and each formula-free parameter on
its natural scale.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from nllflow.evaluation.summary import Z_95
from nllflow.families import Family
from nllflow.families import scipy_stats as stats
from nllflow.fitting.mle import FitResult
from nllflow.likelihood.observations import Observations
from nllflow.models.linear import LinearModel

RESIDUAL_SEED = 20260101


def estimates(result: FitResult) -> dict[str, float]:
    """Every estimated quantity by label: `parameter:term` coefficients and formula-free parameters
    (a network's outputs are neither)."""
    values = {f"{name}:{term}": value for name, terms in result.coefficients.items() for term, value in terms.items()}
    values.update(
        {
            name: result.params[name]
            for name in result.free_params
            if name not in result.coefficients and name in result.params
        }
    )
    return values


def _reported(model: LinearModel) -> list[tuple[str, str | None]]:
    """(parameter, term) in the model's order; term None for a formula-free parameter."""
    return [
        (name, term) if name in model.formula_parameters else (name, None)
        for name in model.optimised
        for term in model.predictors[name].design.columns
    ]


def information(model: LinearModel, observations: Observations, result: FitResult):
    """Standard errors and correlations of every estimated quantity (see the module's docstring)."""
    from nllflow.evaluation.summary import invert_information

    reported = _reported(model)
    labels = [f"{name}:{term}" if term is not None else name for name, term in reported]
    point = torch.tensor(
        [estimates(result)[label] for label in labels], dtype=observations.dtype, device=observations.device
    )
    sizes = [model.predictors[name].size for name in model.optimised]

    def total_nll(flat: Tensor) -> Tensor:
        coefficients = {}
        for name, piece in zip(model.optimised, flat.split(sizes), strict=True):
            if name in model.formula_parameters:
                coefficients[name] = model.standardised(name, piece.reshape(1, -1))
            else:
                coefficients[name] = model.predictors[name].link.forward(piece).reshape(1, 1)
        natural = model.natural(model.values(coefficients, observations.features))
        return -observations.log_likelihood(model.family, natural, per_row=True).sum()

    hessian = torch.autograd.functional.hessian(total_nll, point)
    return invert_information(hessian, labels)


def natural_for(result: FitResult, observations: Observations) -> dict[str, Tensor]:
    """The family's natural parameters per row of `observations` (which carry the model's features):
    a linear model's or a network's (in evaluation mode)."""
    model = result.model
    coefficients = {
        name: value.reshape(1, -1).to(observations.dtype).to(observations.device)
        for name, value in result.standardised.items()
    }
    with torch.no_grad():
        natural = model.natural(model.values(coefficients, observations.features))
    return {name: value.reshape(-1) if value.dim() > 1 else value for name, value in natural.items()}


def quantile_residuals(
    family: Family, observations: Observations, natural: Mapping[str, Tensor], seed: int = RESIDUAL_SEED
) -> np.ndarray:
    """r_i = Φ⁻¹(u_i): u_i = F(y_i) for an exact continuous observation, uniform on (F(y_i - 1), F(y_i)]
    for a discrete one and on (F(low), F(high)] for a censored row (seeded), so a correctly specified
    model gives standard normal residuals. Rows in exact-then-censored order; weights are ignored."""
    generator = np.random.default_rng(seed)
    n_exact = observations.n_exact
    with torch.no_grad():
        exact = {name: value[..., :n_exact] if value.dim() else value for name, value in natural.items()}
        dist = family.build(**exact, validate_args=False)
        y = observations.values
        if family.discrete:
            upper = _discrete_log_cdf(family, dist, y)
            lower = _discrete_log_cdf(family, dist, y - 1)
            u = _uniform_between(lower, upper, generator)
        else:
            log_cdf, log_sf = family.log_tails(dist, y)
            u = _from_tails(log_cdf.double().cpu().numpy(), log_sf.double().cpu().numpy())
        parts = [u]
        if observations.censored is not None:
            rows = observations.censored
            censored = {name: value[..., n_exact:] if value.dim() else value for name, value in natural.items()}
            dist = family.build(**censored, validate_args=False)
            lower = family.log_tails(dist, rows.low)[0]
            upper = family.log_tails(dist, rows.high)[0]
            parts.append(_uniform_between(lower, upper, generator))
    return stats.norm.ppf(np.clip(np.concatenate(parts), 1e-300, 1 - 1e-16))


def _discrete_log_cdf(family: Family, dist, y: Tensor) -> Tensor:
    """log F(y) of a discrete family, -inf below its support."""
    below = y < 0
    safe = torch.where(below, torch.zeros_like(y), y)
    support = torch.arange(int(safe.max()) + 1, dtype=y.dtype, device=y.device)
    pmf = dist.log_prob(support.reshape(-1, *([1] * y.dim()))).exp()  # (support, rows)
    cdf = torch.cumsum(pmf, 0)
    index = safe.long().reshape(1, *y.shape)
    value = torch.gather(cdf, 0, index).reshape(y.shape).clamp(0.0, 1.0).log()
    return torch.where(below, torch.full_like(value, -math.inf), value)


def _uniform_between(log_lower: Tensor, log_upper: Tensor, generator: np.random.Generator) -> np.ndarray:
    low = np.exp(log_lower.double().cpu().numpy())
    high = np.exp(log_upper.double().cpu().numpy())
    return low + (high - low) * generator.uniform(size=low.shape)


def _from_tails(log_cdf: np.ndarray, log_sf: np.ndarray) -> np.ndarray:
    """u from whichever tail keeps its digits (Φ⁻¹ of u near 1 needs 1 - u exactly)."""
    return np.where(log_cdf < math.log(0.5), np.exp(log_cdf), -np.expm1(log_sf))


def residual_summary(residuals: np.ndarray) -> dict[str, float]:
    """The residuals' mean, variance, skewness and kurtosis (normal: 0, 1, 0, 3), Filliben's
    correlation with the normal order statistics, and the KS test against the standard normal."""
    r = residuals[np.isfinite(residuals)]
    if len(r) < 3:
        return {}
    test = stats.kstest(r, "norm")
    filliben = stats.probplot(r, dist="norm", fit=True)[1][2]
    return {
        "residual_mean": float(r.mean()),
        "residual_variance": float(r.var(ddof=1)),
        "residual_skewness": float(stats.skew(r)),
        "residual_kurtosis": float(stats.kurtosis(r, fisher=False)),
        "residual_filliben": float(filliben),
        "residual_ks": float(test.statistic),
        "residual_ks_pvalue": float(test.pvalue),
    }


def coefficient_table(result: FitResult, stderr: Mapping[str, float]) -> pd.DataFrame:
    """One row per coefficient (and per formula-free parameter): estimate, standard error, z, the
    two-sided p-value of z and the 95 % Wald interval."""
    rows = []
    for label, estimate in estimates(result).items():
        parameter, _, term = label.partition(":")
        se = stderr.get(label, math.nan)
        z = estimate / se if se and math.isfinite(se) and se > 0 else math.nan
        rows.append(
            {
                "parameter": parameter,
                "term": term or "(constant)",
                "estimate": estimate,
                "stderr": se,
                "z": z,
                "p_value": float(2 * stats.norm.sf(abs(z))) if math.isfinite(z) else math.nan,
                "ci95_low": estimate - Z_95 * se,
                "ci95_high": estimate + Z_95 * se,
            }
        )
    return pd.DataFrame(rows)
