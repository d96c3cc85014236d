"""Censored observations: rows known only to lie in an interval, and their log-likelihood from the
family's log-CDF and log-survival function (`Family.log_tails`).

A censored row contributes log F(high) (left-censored), log S(low) (right-censored) or
log(F(high) - F(low)) (an interval), computed from whichever tail keeps its digits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.distributions import Distribution

from nllflow.likelihood.special import log_diff

if TYPE_CHECKING:
    from nllflow.families import Family

LOG_HALF = math.log(0.5)


def log_interval(family: Family, dist: Distribution, low: Tensor, high: Tensor) -> Tensor:
    """log P(low < X <= high), from the survival function where low is in the upper half (there the
    CDF has no digits left to subtract) and from the CDF elsewhere."""
    cdf_low, sf_low = family.log_tails(dist, low)
    cdf_high, sf_high = family.log_tails(dist, high)
    upper = cdf_low > LOG_HALF
    return torch.where(upper, log_diff(sf_low, sf_high), log_diff(cdf_high, cdf_low))


@dataclass(frozen=True)
class CensoredRows:
    """Rows known only to lie in (low, high]: low = -inf is left-censored at high, high = +inf is
    right-censored at low. `weights` are frequency weights (the last dimension is the row; a
    leading dimension holds a batch of resamples)."""

    low: Tensor
    high: Tensor
    weights: Tensor | None = None
    _groups: dict[str, Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        left, right = torch.isinf(self.low), torch.isinf(self.high)
        groups = {"left": left & ~right, "right": right & ~left, "interval": ~left & ~right}
        object.__setattr__(self, "_groups", {k: torch.nonzero(v).reshape(-1) for k, v in groups.items()})

    def __len__(self) -> int:
        return self.low.shape[-1]

    @property
    def total_weight(self) -> Tensor | float:
        return float(len(self)) if self.weights is None else self.weights.sum(-1)

    def counts(self) -> dict[str, int]:
        return {kind: len(index) for kind, index in self._groups.items()}

    def stand_in_values(self) -> Tensor:
        """One point per row for start values and plots: the midpoint of an interval, the bound of a
        left- or right-censored row (fitdistrplus's convention)."""
        finite_low = torch.where(torch.isinf(self.low), self.high, self.low)
        finite_high = torch.where(torch.isinf(self.high), self.low, self.high)
        return (finite_low + finite_high) / 2

    def finite_bounds(self) -> tuple[Tensor, Tensor]:
        """The finite upper bounds (a support must reach below them) and finite lower bounds (it
        must reach above them)."""
        return self.high[torch.isfinite(self.high)], self.low[torch.isfinite(self.low)]

    def log_likelihood(self, family: Family, dist: Distribution) -> Tensor:
        """Σ w log P(low < X <= high) under `family`'s `dist`, summed over the last (row) dimension."""
        total = None
        for kind, index in self._groups.items():
            if len(index) == 0:
                continue
            if kind == "left":
                terms = family.log_tails(dist, self.high.index_select(-1, index))[0]
            elif kind == "right":
                terms = family.log_tails(dist, self.low.index_select(-1, index))[1]
            else:
                terms = log_interval(family, dist, self.low.index_select(-1, index), self.high.index_select(-1, index))
            if self.weights is not None:
                terms = self.weights.index_select(-1, index) * terms
            part = terms.sum(-1)
            total = part if total is None else total + part
        return total if total is not None else self.low.new_zeros(())

    def select(self, index: Tensor) -> CensoredRows:
        weights = None if self.weights is None else self.weights[index]
        return CensoredRows(self.low[index], self.high[index], weights)
