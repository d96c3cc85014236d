"""Observations on the fitting device: exact values with optional frequency weights, censored rows,
and the covariates of a regression or network, with the statistics computed from them once.

The last dimension is the observation. Values or weights with a leading batch dimension (the
bootstrap's resamples) give one log-likelihood per batch entry. Rows are ordered exact values
first, then censored rows; the covariates (`features`, one matrix per design) follow that order,
so parameters that vary by row have the shape (..., exact rows + censored rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import Tensor

from nllflow.likelihood.censoring import CensoredRows
from nllflow.likelihood.statistics import ExactData

if TYPE_CHECKING:
    from nllflow.families import DataBounds, Family


@dataclass(frozen=True)
class Observations:
    """One data set to fit (see the module's docstring). Everything derived from it (moments, the
    stand-in values of censored rows, bounds, start values) is computed on first use and cached
    on the object: build it once per data set, not once per step."""

    values: Tensor
    weights: Tensor | None = None
    censored: CensoredRows | None = None
    features: Mapping[str, Tensor] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_exact(self) -> int:
        return self.values.shape[-1]

    @property
    def n_rows(self) -> int:
        return self.n_exact + (0 if self.censored is None else len(self.censored))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def batch_shape(self) -> torch.Size:
        shapes = [self.values.shape[:-1]]
        if self.weights is not None:
            shapes.append(self.weights.shape[:-1])
        if self.censored is not None and self.censored.weights is not None:
            shapes.append(self.censored.weights.shape[:-1])
        # (NumPy's rule is the same; torch.broadcast_shapes imports torch.fx and sympy, most of a second)
        return torch.Size(np.broadcast_shapes(*shapes))

    @property
    def exact(self) -> ExactData:
        """The exact values with the statistics cache the families' fast likelihoods read."""
        if "exact" not in self._cache:
            self._cache["exact"] = ExactData(self.values, self.weights, self._cache.setdefault("moments", {}))
        return self._cache["exact"]

    @property
    def row_weight(self) -> Tensor:
        """The total frequency weight per batch entry (a 0-d tensor for one data set)."""
        if "row_weight" not in self._cache:
            exact = (
                torch.full(self.values.shape[:-1], float(self.n_exact), dtype=self.dtype, device=self.device)
                if self.weights is None
                else self.weights.sum(-1)
            )
            censored = 0.0 if self.censored is None else self.censored.total_weight
            self._cache["row_weight"] = (exact + censored).expand(self.batch_shape)
        return self._cache["row_weight"]

    @property
    def total_weight(self) -> float:
        """The total frequency weight of one data set (n without weights)."""
        return float(self.row_weight.sum()) if self.row_weight.dim() == 0 else math.nan

    def log_likelihood(self, family: Family, params: Mapping[str, Tensor], *, per_row: bool = False) -> Tensor:
        """Total (weighted) log-likelihood of `family` at the natural `params`, summed over the last
        dimension (a 0-d tensor for one data set). With `per_row`, each parameter has one value per
        row in its last dimension (exact rows, then censored rows); otherwise it broadcasts over the
        rows and the exact part goes through the family's fast rule where it has one (sufficient
        statistics or a fused pass)."""
        exact_params, censored_params = params, params
        if per_row:  # (a 0-d value is the same for every row)
            exact_params = {
                name: value[..., : self.n_exact] if value.dim() else value for name, value in params.items()
            }
            censored_params = {
                name: value[..., self.n_exact :] if value.dim() else value for name, value in params.items()
            }
        total = None
        if self.n_exact:
            if family.likelihood is not None and not per_row:
                total = family.likelihood(self.exact, family, exact_params).squeeze(-1)
            else:
                log_density = family.build(**exact_params, validate_args=False).log_prob(self.values)
                if self.weights is not None:
                    log_density = self.weights * log_density
                total = log_density.sum(-1)
        if self.censored is not None:
            dist = family.build(**censored_params, validate_args=False)
            part = self.censored.log_likelihood(family, dist)
            total = part if total is None else total + part
        return total

    def stand_in(self) -> Observations:
        """Exact observations standing in for these (a censored row by its midpoint or finite
        bound): what start-value, shape and polish rules see."""
        if "stand_in" not in self._cache:
            if self.censored is None:
                self._cache["stand_in"] = self
            else:
                values = torch.cat([self.values, self.censored.stand_in_values()])
                weights = None
                if self.weights is not None or self.censored.weights is not None:
                    exact = self.weights if self.weights is not None else torch.ones_like(self.values)
                    other = (
                        self.censored.weights
                        if self.censored.weights is not None
                        else torch.ones_like(self.censored.low)
                    )
                    weights = torch.cat([exact, other])
                self._cache["stand_in"] = Observations(values, weights)
        return self._cache["stand_in"]

    def prepare(self, family: Family) -> None:
        """The statistics `family` declares, and the data's range where its support depends on the
        data (`constraint_rules`), in one pass over the exact rows. Other families do not pay for the
        range (a min and a max per chunk); a start rule that reads it has it computed then."""
        if self.n_exact:
            self.exact.prepare(family.statistics, with_range=bool(family.constraint_rules))

    def bounds(self) -> DataBounds:
        """The range a support with data-dependent ends must cover: the exact values, the finite
        upper bounds of censored rows (a support must start below them) and their finite lower
        bounds (it must end above them)."""
        from nllflow.families import DataBounds

        if "bounds" not in self._cache:
            exact = self.exact
            if self.censored is None:
                bounds = DataBounds(min=float(exact.min), max=float(exact.max))
            else:
                highs, lows = self.censored.finite_bounds()
                below, above = torch.cat([self.values, highs]), torch.cat([self.values, lows])
                fallback = self.stand_in().values
                bounds = DataBounds(
                    min=float((below if below.numel() else fallback).min()),
                    max=float((above if above.numel() else fallback).max()),
                )
            self._cache["bounds"] = bounds
        return self._cache["bounds"]

    def cached(self, key: str, compute):
        """`compute()` once per data set under `key` (start values, shapes: what models derive)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def select(self, index: Tensor) -> Observations:
        """The rows at `index` (positions in exact-then-censored order), features included: a
        mini-batch, a split. Batched (resampled) observations are not split."""
        index = index.to(self.device)
        if self.censored is None:  # a mini-batch's common case: no boolean masks, no host sync
            return Observations(
                self.values[..., index],
                None if self.weights is None else self.weights[..., index],
                None,
                {name: matrix[index] for name, matrix in self.features.items()},
            )
        exact_index = index[index < self.n_exact]
        censored = None
        if self.censored is not None:
            censored_index = index[index >= self.n_exact] - self.n_exact
            if censored_index.numel():
                censored = self.censored.select(censored_index)
        order = torch.cat([exact_index, index[index >= self.n_exact]])
        return Observations(
            self.values[..., exact_index],
            None if self.weights is None else self.weights[..., exact_index],
            censored,
            {name: matrix[order] for name, matrix in self.features.items()},
        )
