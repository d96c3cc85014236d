"""The quantile function of any family, from its tails: for a continuous family, Newton steps on
log F inside a bracket that shrinks like bisection's (which takes over where a step leaves it), so
families without an `icdf` (gamma, Student-t, beta, the Triangular's own) have one too; for a
discrete family, the smallest count whose CDF reaches the probability."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from nllflow.families import Family

ITERATIONS = 200


def quantiles(
    family: Family,
    dist: Distribution,
    probabilities,
    low: float | Tensor,
    high: float | Tensor,
    guess: np.ndarray | Tensor | None = None,
) -> Tensor:
    """The quantiles of `dist` (batch shape B) at `probabilities` (shape P), as (P, *B). The search
    starts from the bracket [low, high] and doubles it out where it must, so `dist` is evaluated
    outside its support: build it with validate_args=False. Newton's steps start from `guess`
    (inside the bracket; e.g. the data at their empirical probabilities, for a Q-Q plot), else
    from the bracket's middle."""
    with torch.no_grad():
        dtype = torch.float64
        target = torch.log(torch.as_tensor(np.asarray(probabilities, dtype=np.float64), dtype=dtype))
        target = target.reshape(-1, *([1] * len(dist.batch_shape))).expand(-1, *dist.batch_shape)
        if family.discrete:
            return _discrete(dist, target)
        low = torch.as_tensor(low, dtype=dtype).expand_as(target).clone()
        high = torch.as_tensor(high, dtype=dtype).expand_as(target).clone()
        for _ in range(ITERATIONS):
            below = family.log_tails(dist, low)[0] > target
            above = family.log_tails(dist, high)[0] < target
            if not bool(below.any() or above.any()):
                break
            width = high - low
            low = torch.where(below, low - width, low)
            high = torch.where(above, high + width, high)
        x = (low + high) / 2
        if guess is not None:
            start = torch.as_tensor(np.asarray(guess, dtype=np.float64), dtype=dtype).reshape(
                target.shape[:1] + (1,) * (target.dim() - 1)
            )
            x = torch.where((start > low) & (start < high), start.expand_as(target), x)
        for _ in range(ITERATIONS):
            log_cdf = family.log_tails(dist, x)[0]
            left = log_cdf < target
            low, high = torch.where(left, x, low), torch.where(left, high, x)
            # d log F / dx = f / F
            newton = x - (log_cdf - target) * torch.exp(log_cdf - dist.log_prob(x))
            inside = torch.isfinite(newton) & (newton > low) & (newton < high)
            moved = torch.where(inside, newton, (low + high) / 2)
            if bool(((moved - x).abs() <= 4 * torch.finfo(x.dtype).eps * x.abs().clamp_min(1.0)).all()):
                return moved
            x = moved
        return x


def _discrete(dist: Distribution, target: Tensor) -> Tensor:
    """The smallest k >= 0 with log F(k) >= target, the support walked in doubling blocks."""
    found = torch.full_like(target, -1.0)
    cumulative = torch.zeros(target.shape[1:], dtype=target.dtype)
    start, size = 0, 64
    while bool((found < 0).any()) and start < 1 << 40:
        support = torch.arange(start, start + size, dtype=target.dtype).reshape(-1, *([1] * (target.dim() - 1)))
        block = torch.cumsum(dist.log_prob(support).exp(), 0) + cumulative
        reached = block.clamp_max(1.0).log().unsqueeze(0) >= target.unsqueeze(1) - 1e-12  # (P, size, *B)
        first = torch.where(reached.any(1), reached.float().argmax(1).to(target.dtype) + start, -1.0)
        found = torch.where(found < 0, first, found)
        cumulative = block[-1]
        start, size = start + size, size * 2
    return found
