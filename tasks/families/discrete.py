"""The discrete families that ship with nllflow, each declared once."""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.distributions as D
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints

from nllflow.families import Family, Parametrisation, register_family
from nllflow.families import scipy_stats as stats
from nllflow.likelihood.statistics import ExactData


def _poisson_likelihood(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    x, rate = data.moments("x"), p["rate"]
    return torch.xlogy(x.sum, rate) - x.total * rate - data.moments("lgamma1p").sum


@register_family(
    "poisson",
    statistics=("x", "lgamma1p"),
    build=D.Poisson,
    params=("rate",),
    discrete=True,
    support=constraints.nonnegative_integer,
    likelihood=_poisson_likelihood,
    scipy=lambda p: stats.poisson(mu=p["rate"]),
)
def _poisson_start(data: ExactData) -> dict[str, Tensor]:
    return {"rate": data.moments("x").mean.clamp_min(1e-12)}


def _binomial(total_count: Tensor, probs: Tensor, validate_args: bool | None = None) -> Distribution:
    return D.Binomial(total_count=total_count, probs=probs, validate_args=validate_args)


@register_family(
    "binomial",
    statistics=("x",),
    build=_binomial,
    params=("total_count", "probs"),
    discrete=True,
    required_fixed=("total_count",),
    support=constraints.nonnegative_integer,
    constraints={"total_count": constraints.nonnegative_integer, "probs": constraints.unit_interval},
    # a count above total_count has probability 0: refuse such a total_count, not a NaN fit
    constraint_rules={"total_count": lambda b, known: constraints.integer_interval(b.max, math.inf)},
    scipy=lambda p: stats.binom(n=round(p["total_count"]), p=p["probs"]),
)
def _binomial_start(data: ExactData) -> dict[str, Tensor]:
    # total_count is always fixed by the user; max(x) is only its lower bound
    total_count = data.max
    return {"total_count": total_count, "probs": (data.moments("x").mean / total_count).clamp(1e-3, 1 - 1e-3)}


def log_rising_factorial(n: Tensor, x: Tensor) -> Tensor:
    """log Γ(n + x) - log Γ(n), by Stirling's series where n is so large that the two log-gammas
    cancel to noise (at n = 1e15 each is 3e16 and their difference has errors of order 1: an
    optimiser walking towards the Poisson limit mistakes them for a better fit)."""
    large = n > 100  # the first neglected term, 1/(1260 n⁵), is below 1e-13 there
    safe = torch.where(large, torch.ones_like(n), n)
    exact = torch.lgamma(safe + x) - torch.lgamma(safe)
    big = torch.where(large, n, torch.full_like(n, 1e3))
    # (n+x-½)log(n+x) - (n-½)log n - x + δ(n+x) - δ(n) with δ(z) = 1/(12z) - 1/(360z³), grouped so
    # that nothing cancels
    end = big + x
    series = (big - 0.5) * torch.log1p(x / big) - x + x * torch.log(end) - x / (12 * big * end)
    series = series + (1 / big**3 - 1 / end**3) / 360
    return torch.where(large, series, exact)


class NegativeBinomial(D.NegativeBinomial):
    """torch's negative binomial with its normalising constant kept exact at any total_count (its
    log-probabilities stay exact while probs is above torch's clamp at machine epsilon: total_count
    up to about mean / 2.2e-16)."""

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        n = self.total_count
        log_unnormalised = n * F.logsigmoid(-self.logits) + value * F.logsigmoid(self.logits)
        # n = 0 and a zero count: probability 1, where lgamma(0) is infinite
        rising = log_rising_factorial(n, value).masked_fill(n + value == 0.0, 0.0)
        return log_unnormalised + rising - torch.lgamma(1.0 + value)


def _negativebinomial_from_mean(p: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # NB2 (statsmodels, Stata): variance = mean + dispersion · mean²; torch's probs is the
    # probability of a success, mean = total_count · probs / (1 - probs)
    total_count = 1 / p["dispersion"]
    return {"total_count": total_count, "probs": p["mean"] / (p["mean"] + total_count)}


@register_family(
    "negativebinomial",
    statistics=("x",),
    build=NegativeBinomial,
    params=("total_count", "probs"),
    discrete=True,
    support=constraints.nonnegative_integer,
    parametrisations={
        "mean": Parametrisation(
            params=("mean", "dispersion"),
            constraints={"mean": constraints.positive, "dispersion": constraints.positive},
            to_natural=_negativebinomial_from_mean,
            from_natural=lambda p: {
                "mean": p["total_count"] * p["probs"] / (1 - p["probs"]),
                "dispersion": 1 / p["total_count"],
            },
            variance="mean + dispersion · mean² (NB2)",
            description="total_count = 1/dispersion, probs = mean / (mean + total_count)",
        ),
    },
    scipy=lambda p: stats.nbinom(n=p["total_count"], p=1 - p["probs"]),
)
def _negativebinomial_start(data: ExactData) -> dict[str, Tensor]:
    m = data.moments("x")
    mean, var = m.mean.clamp_min(1e-6), m.std**2
    total_count = (mean**2 / (var - mean).clamp_min(1e-3 * mean)).clamp(1e-3, 1e6)
    return {"total_count": total_count, "probs": mean / (mean + total_count)}


def _geometric_likelihood(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    x, probs = data.moments("x"), p["probs"]
    # torch's rule: a zero count contributes nothing even at probs = 1 (0 · log 0)
    zero = x.sum == 0
    failures = torch.where(zero, 0.0, x.sum * torch.log1p(-torch.where(zero, 0.0, probs)))
    return failures + x.total * probs.log()


@register_family(
    "geometric",
    statistics=("x",),
    build=D.Geometric,
    params=("probs",),
    discrete=True,
    support=constraints.nonnegative_integer,
    likelihood=_geometric_likelihood,
    scipy=lambda p: stats.geom(p=p["probs"], loc=-1),
)
def _geometric_start(data: ExactData) -> dict[str, Tensor]:
    return {"probs": 1 / (1 + data.moments("x").mean)}


def _categorical(logits: Tensor, validate_args: bool | None = None) -> Distribution:
    """Category 0 is the reference: its logit is pinned at 0, so the fitted logits are log-odds
    against it and the likelihood has a unique maximum (all K logits would be shift-invariant)."""
    reference = torch.zeros(logits.shape[:-1] + (1,), dtype=logits.dtype, device=logits.device)
    return D.Categorical(logits=torch.cat([reference, logits], dim=-1), validate_args=validate_args)


@register_family(
    "categorical",
    build=_categorical,
    params=("logits",),
    discrete=True,
    support=constraints.nonnegative_integer,
    constraints={"logits": constraints.real_vector},
    param_shapes=lambda x: {"logits": (int(x.max().item()),)},
)
def _categorical_start(data: ExactData) -> dict[str, Tensor]:
    x = data.values
    counts = torch.bincount(x.long(), weights=data.weights).to(x.dtype).clamp_min(0.5)
    return {"logits": (counts[1:] / counts[0]).log()}
