"""The Triangular distribution: the model of a custom family.

A custom family is one file like this: a `torch.distributions.Distribution` subclass written with
tensor operations only (so it works on batches and under autograd), plus one `register_family`
declaration that tells the fitter its parameters, their constraints, a start-value rule and,
optionally, its tails (for censored data), a polish rule and extra starts.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.utils import broadcast_all

from nllflow.families import register_family
from nllflow.families import scipy_stats as stats
from nllflow.likelihood.special import log1mexp, outside
from nllflow.likelihood.statistics import ExactData

LOG_2 = math.log(2.0)


class Triangular(Distribution):
    """Triangular distribution on [lower, upper] with mode `peak`.

    The density rises linearly from `lower` to `peak` and falls linearly to `upper`:
    f(x) = 2 (x - lower) / ((upper - lower)(peak - lower)) for lower <= x < peak and
    f(x) = 2 (upper - x) / ((upper - lower)(upper - peak)) for peak <= x <= upper.
    """

    arg_constraints = {"lower": constraints.real, "peak": constraints.real, "upper": constraints.real}
    has_rsample = True

    def __init__(self, lower, peak, upper, validate_args: bool | None = None):
        self.lower, self.peak, self.upper = broadcast_all(lower, peak, upper)
        super().__init__(batch_shape=self.lower.shape, validate_args=validate_args)
        if self._validate_args:
            ordered = (self.lower <= self.peak) & (self.peak <= self.upper) & (self.lower < self.upper)
            if not bool(ordered.all()):
                raise ValueError(
                    "Triangular needs lower <= peak <= upper and lower < upper; "
                    f"got lower={self.lower.tolist()}, peak={self.peak.tolist()}, upper={self.upper.tolist()}"
                )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Triangular, _instance)
        batch_shape = torch.Size(batch_shape)
        new.lower = self.lower.expand(batch_shape)
        new.peak = self.peak.expand(batch_shape)
        new.upper = self.upper.expand(batch_shape)
        super(Triangular, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(self.lower, self.upper)

    @property
    def mean(self) -> Tensor:
        return (self.lower + self.peak + self.upper) / 3

    @property
    def mode(self) -> Tensor:
        return self.peak

    @property
    def variance(self) -> Tensor:
        a, c, b = self.lower, self.peak, self.upper
        return (a**2 + b**2 + c**2 - a * b - a * c - b * c) / 18

    def _rising(self, value: Tensor) -> Tensor:
        # at value == peak == upper the falling edge has zero width: take the rising one
        return (value < self.peak) | ((value <= self.peak) & (self.peak >= self.upper))

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.lower.dtype, device=self.lower.device)
        rising = self._rising(value)
        distance = torch.where(rising, value - self.lower, self.upper - value)
        width = torch.where(rising, self.peak - self.lower, self.upper - self.peak)
        inside = (value >= self.lower) & (value <= self.upper)
        # keep log() away from the branch that is not taken, so its gradient cannot be NaN
        safe_distance = torch.where(inside, distance, torch.ones_like(distance))
        safe_width = torch.where(inside, width, torch.ones_like(width))
        log_density = LOG_2 + safe_distance.log() - safe_width.log() - (self.upper - self.lower).log()
        return torch.where(inside, log_density, torch.full_like(log_density, -math.inf))

    def cdf(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.lower.dtype, device=self.lower.device)
        span = self.upper - self.lower
        clipped = torch.minimum(torch.maximum(value, self.lower), self.upper)
        rising = self._rising(clipped)
        left_width = torch.where(rising, self.peak - self.lower, torch.ones_like(span))
        right_width = torch.where(rising, torch.ones_like(span), self.upper - self.peak)
        left = (clipped - self.lower) ** 2 / (span * left_width)
        right = 1 - (self.upper - clipped) ** 2 / (span * right_width)
        return torch.where(rising, left, right)

    def icdf(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value, dtype=self.lower.dtype, device=self.lower.device)
        span = self.upper - self.lower
        at_peak = (self.peak - self.lower) / span
        rising = value < at_peak
        left = self.lower + (value * span * (self.peak - self.lower)).clamp_min(0).sqrt()
        right = self.upper - ((1 - value) * span * (self.upper - self.peak)).clamp_min(0).sqrt()
        return torch.where(rising, left, right)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        uniform = torch.rand(shape, dtype=self.lower.dtype, device=self.lower.device)
        return self.icdf(uniform)

    def entropy(self) -> Tensor:
        return 0.5 + ((self.upper - self.lower) / 2).log()


def _triangular_tails(dist: Triangular, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log F, log S), exact in both tails."""
    a, c, b = dist.lower, dist.peak, dist.upper
    below, above = x <= a, x >= b
    safe = torch.where(below | above, (a + b) / 2, x)
    rising = safe < c
    log_span = (b - a).log()
    # F = (x-a)² / ((b-a)(c-a)) on the rising edge, S = (b-x)² / ((b-a)(b-c)) on the falling one;
    # the width of the edge not taken is replaced by 1 so its log stays finite
    rising_width = torch.where(rising, c - a, 1.0)
    falling_width = torch.where(rising, 1.0, b - c)
    left = 2 * torch.where(rising, safe - a, 1.0).log() - log_span - rising_width.log()
    right = 2 * torch.where(rising, 1.0, b - safe).log() - log_span - falling_width.log()
    lower = torch.where(rising, left, log1mexp(right))
    upper = torch.where(rising, log1mexp(left), right)
    return outside(x, below, above, lower, upper)


POLISH_CANDIDATES = 5


def _polish_peak(
    x: Tensor, params: Mapping[str, Tensor], free: frozenset[str], weights: Tensor | None
) -> list[dict[str, Tensor]]:
    """Candidate peaks on the data points that are best for the current lower and upper.

    Between two neighbouring data points the log-likelihood is convex in the peak, so for given
    bounds its maximum sits on a data point; prefix sums give it at every data point in one pass.
    Coordinate-wise improvement can stall on this multimodal surface, so the few best points are
    all offered and the fitter refits the bounds for each.
    """
    if "peak" not in free:
        return []
    lower, upper = params["lower"], params["upper"]
    order = torch.argsort(x)
    xs = x[order]
    w = torch.ones_like(xs) if weights is None else weights[order]
    below = torch.cat([xs.new_zeros(1), torch.cumsum(w * (xs - lower).log(), 0)])
    above = torch.cat([torch.flip(torch.cumsum(torch.flip(w * (upper - xs).log(), [0]), 0), [0]), xs.new_zeros(1)])
    weight_below = torch.cat([xs.new_zeros(1), torch.cumsum(w, 0)])
    n_below = torch.searchsorted(xs, xs, right=False)
    total = weight_below[-1]
    loglik = (
        below[n_below]
        - weight_below[n_below] * (xs - lower).log()
        + above[n_below]
        - (total - weight_below[n_below]) * (upper - xs).log()
    )
    best = torch.topk(loglik, min(POLISH_CANDIDATES, len(xs))).indices
    return [{"peak": xs[i]} for i in best]


@register_family(
    "triangular",
    build=Triangular,
    params=("lower", "peak", "upper"),
    support=constraints.real,
    constraint_rules={
        "lower": lambda b, known: constraints.less_than(min(b.min, float(known.get("peak", math.inf)))),
        "upper": lambda b, known: constraints.greater_than(max(b.max, float(known.get("peak", -math.inf)))),
        "peak": lambda b, known: constraints.interval(known["lower"], known["upper"]),
    },
    resolve_order=("lower", "upper", "peak"),
    non_regular=("peak",),
    polish=_polish_peak,
    extra_starts=lambda x: [_bounds_and_peak(x, peak_at) for peak_at in (0.0, 0.25, 0.75, 1.0)],
    tails=_triangular_tails,
    scipy=lambda p: stats.triang(
        c=(p["peak"] - p["lower"]) / (p["upper"] - p["lower"]), loc=p["lower"], scale=p["upper"] - p["lower"]
    ),
)
def _triangular_start(data: ExactData) -> dict[str, float]:
    return _bounds_and_peak(data.values)


def _bounds_and_peak(x: Tensor, peak_at: float | None = None) -> dict[str, float]:
    """Bounds just outside the data; the peak from the mean (a + b + c = 3·mean), or at the
    quantile `peak_at` of the data for the extra starts."""
    low, high = float(x.min()), float(x.max())
    margin = 0.05 * (high - low)
    lower, upper = low - margin, high + margin
    if peak_at is None:
        peak = 3 * float(x.mean()) - lower - upper
    else:
        peak = float(torch.quantile(x, peak_at))
    peak = min(max(peak, lower + margin / 2), upper - margin / 2)
    return {"lower": lower, "peak": peak, "upper": upper}
