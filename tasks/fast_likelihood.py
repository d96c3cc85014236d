"""Fast total log-likelihoods of exact observations: what `Observations.log_likelihood` uses in
place of `dist.log_prob(values).sum()` when a family has a rule here.

Two kinds of rule, registered by family name with `@register_fast(name)`:

- Families whose likelihood depends on the data only through sufficient statistics (normal,
  lognormal, gamma, exponential, poisson, ...) read weighted moments of x, log x, ... that are
  computed in one chunked pass per Observations object and cached on it: every optimiser step
  after the first costs a handful of scalar operations, whatever the sample size.
- Families without them (Student-t, Weibull) get a fused pass: a custom autograd function walks
  the data in cache-sized chunks (single-threaded: see `_serial`) and returns the total with its
  closed-form gradient, so no N-sized temporary is made and the backward pass reads no data.
  Second derivatives (the observed information, the bootstrap's Newton steps) go through torch's
  own log_prob, so they stay exact. Without a gradient to compute, the pass sums the value only.

Every rule is the same function of the parameters as the generic sum, summed over the last
dimension, with the same broadcasting: parameters of shape (K, 1) (a batched sweep) or weights of
shape (B, n) (bootstrap resamples) give one total per row.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.autograd import Function

from tasks.families import Family

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LOG_2 = math.log(2.0)
LOG_PI = math.log(math.pi)
# elements per chunk (all batch rows together): a chunk and its few temporaries stay in the caches,
# and a pass over 1e7 points is a few hundred operations, not thousands of Python calls
CPU_CHUNK = 1 << 16
CUDA_CHUNK = 1 << 24

@contextmanager
def _serial():
    """torch's intra-op threads set to 1 while chunks are walked. Each operation on a chunk would
    otherwise open an OpenMP parallel region (log and exp do from 2048 elements), and with every
    core busy elsewhere each region waits for a descheduled thread: measured here, a 1e7-point
    Student-t fit took 11-20 s with 2 threads on a loaded 2-core machine and 0.7 s with 1.
    OpenMP keeps this setting per thread, so fits running in other threads keep theirs."""
    saved = torch.get_num_threads()
    if saved == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "x": lambda x: x,
    "log": torch.log,
    "log1m": lambda x: torch.log1p(-x),
    "lgamma1p": lambda x: torch.lgamma(x + 1),
}


@dataclass(frozen=True)
class Moments:
    """Weighted moments of f(x) over the last dimension, kept as (..., 1): `total` Σw, the mean
    Σw f / Σw as `shift` (the first value) + `centre`, and `m2` Σw (f - mean)². Centred, and
    relative to a data value, so no digits are lost to cancellation when the data sit far from
    zero (mean - μ is computed as (shift - μ) + centre, exact in its first part)."""

    total: Tensor
    shift: Tensor
    centre: Tensor
    m2: Tensor

    @property
    def mean(self) -> Tensor:
        return self.shift + self.centre

    @property
    def sum(self) -> Tensor:
        return self.total * self.mean

    def squares_about(self, point: Tensor) -> Tensor:
        """Σw (f - point)²."""
        return self.m2 + self.total * ((self.shift - point) + self.centre) ** 2


class ExactData:
    """The exact part of a set of observations, with its statistics cache (a dict owned by the
    Observations object, so statistics are computed once per data set, not once per step)."""

    def __init__(self, values: Tensor, weights: Tensor | None, cache: dict[str, Moments]):
        self.values, self.weights, self.cache = values, weights, cache

    @property
    def size(self) -> int:
        return self.values.shape[-1]

    def chunks(self, batch: tuple[int, ...] = ()) -> list[tuple[Tensor, Tensor | None]]:
        """Views of the data in chunks of about CHUNK elements each, counting the rows of a batch
        (`batch`: the parameters' batch shape) that every chunk is broadcast against."""
        shapes = [self.values.shape[:-1], batch] + ([] if self.weights is None else [self.weights.shape[:-1]])
        rows = math.prod(max(sizes) for sizes in itertools.zip_longest(*(s[::-1] for s in shapes), fillvalue=1))
        budget = CUDA_CHUNK if self.values.device.type == "cuda" else CPU_CHUNK
        step = max(1024, budget // rows)
        return [
            (self.values[..., s : s + step], None if self.weights is None else self.weights[..., s : s + step])
            for s in range(0, self.size, step)
        ]

    def moments(self, transform: str) -> Moments:
        """Weighted moments of TRANSFORMS[transform](x): each chunk's own, about a common shift,
        then merged with the parallel update of Chan et al. (stable for data far from zero)."""
        if transform not in self.cache:
            f = TRANSFORMS[transform]
            shift: Tensor | None = None
            chunks = self.chunks()
            # each chunk's (total, centre, m2) written into one preallocated tensor: small results
            # kept alive between the chunks' large temporaries fragment the heap (measured: +3x
            # the data's size at 1e7 points)
            parts: Tensor | None = None
            with _serial():
                for i, (x, w) in enumerate(chunks):
                    fx = f(x)
                    shift = fx[..., :1].clone() if shift is None else shift
                    fx = fx - shift
                    total = torch.full_like(fx[..., :1], fx.shape[-1]) if w is None else w.sum(-1, keepdim=True)
                    centre = weighted_sum(fx, w) / total.clamp_min(torch.finfo(fx.dtype).tiny)
                    d = fx - centre
                    # (torch.var_mean is an order of magnitude slower than these sums)
                    m2 = torch.dot(d, d).reshape(1) if w is None and d.dim() == 1 else weighted_sum(d * d, w)
                    if parts is None:
                        parts = total.new_empty((len(chunks), 3, *total.shape))
                    parts[i, 0], parts[i, 1], parts[i, 2] = total, centre, m2
            self.cache[transform] = _merge(parts[:, 0], shift, parts[:, 1], parts[:, 2])  # type: ignore[index, arg-type]
        return self.cache[transform]

    @property
    def total(self) -> Tensor:
        return self.moments("x").total


def _merge(totals: Tensor, shift: Tensor, centres: Tensor, m2s: Tensor) -> Moments:
    """The chunks' moments (stacked along the first dimension) about a common shift, as one."""
    total = totals.sum(0)
    centre = (totals * centres).sum(0) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return Moments(total, shift, centre, m2s.sum(0) + (totals * (centres - centre) ** 2).sum(0))


def weighted_sum(t: Tensor, w: Tensor | None) -> Tensor:
    """Σ w t over the last dimension, kept as (..., 1); without a temporary for one data set."""
    if w is None:
        return t.sum(-1, keepdim=True)
    if t.dim() == 1 and w.dim() == 1:
        return torch.dot(t, w).reshape(1)
    if w.dim() == 1:
        return (t @ w).unsqueeze(-1)
    if t.dim() == 1:
        return (w @ t).unsqueeze(-1)
    return (w * t).sum(-1, keepdim=True)


FastRule = Callable[[ExactData, Family, Mapping[str, Tensor]], Tensor]
FAST_RULES: dict[str, FastRule] = {}


def register_fast(name: str) -> Callable[[FastRule], FastRule]:
    """Register the decorated function as the total log-likelihood of the family `name`: it gets
    the exact data, the family and the natural parameters, and returns the total over the last
    dimension kept as (..., 1)."""

    def decorator(rule: FastRule) -> FastRule:
        FAST_RULES[name] = rule
        return rule

    return decorator


def fast_log_likelihood(
    family: Family, values: Tensor, weights: Tensor | None, params: Mapping[str, Tensor], cache: dict
) -> Tensor | None:
    """The total log-likelihood of the exact observations by the family's fast rule (None where
    it has none, or there are no exact observations)."""
    rule = FAST_RULES.get(family.name)
    if rule is None or values.shape[-1] == 0:
        return None
    return rule(ExactData(values, weights, cache), family, params).squeeze(-1)


# --- families with sufficient statistics ---------------------------------------------------------


def _normal_total(m: Moments, loc: Tensor, scale: Tensor) -> Tensor:
    return -m.squares_about(loc) / (2 * scale**2) - m.total * (scale.log() + HALF_LOG_2PI)


@register_fast("normal")
def _normal(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    return _normal_total(data.moments("x"), p["loc"], p["scale"])


@register_fast("lognormal")
def _lognormal(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    logs = data.moments("log")
    return _normal_total(logs, p["loc"], p["scale"]) - logs.sum


@register_fast("halfnormal")
def _halfnormal(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    m, scale = data.moments("x"), p["scale"]
    return -m.squares_about(torch.zeros_like(m.shift)) / (2 * scale**2) - m.total * (scale.log() + HALF_LOG_2PI - LOG_2)


@register_fast("gamma")
def _gamma(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    x, logs = data.moments("x"), data.moments("log")
    shape, rate = p["concentration"], p["rate"]
    return x.total * (torch.xlogy(shape, rate) - torch.lgamma(shape)) + (shape - 1) * logs.sum - rate * x.sum


@register_fast("exponential")
def _exponential(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    x, rate = data.moments("x"), p["rate"]
    return x.total * rate.log() - rate * x.sum


@register_fast("poisson")
def _poisson(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    x, rate = data.moments("x"), p["rate"]
    return torch.xlogy(x.sum, rate) - x.total * rate - data.moments("lgamma1p").sum


@register_fast("geometric")
def _geometric(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    x, probs = data.moments("x"), p["probs"]
    # torch's rule: a zero count contributes nothing even at probs = 1 (0 · log 0)
    zero = x.sum == 0
    failures = torch.where(zero, 0.0, x.sum * torch.log1p(-torch.where(zero, 0.0, probs)))
    return failures + x.total * probs.log()


@register_fast("beta")
def _beta(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    logs, log1m = data.moments("log"), data.moments("log1m")
    a, b = p["concentration1"], p["concentration0"]
    return (a - 1) * logs.sum + (b - 1) * log1m.sum + logs.total * (torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b))


@register_fast("pareto")
def _pareto(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    logs, scale, alpha = data.moments("log"), p["scale"], p["alpha"]
    return logs.total * (alpha.log() + alpha * scale.log()) - (alpha + 1) * logs.sum


# --- families without: one fused, chunked pass with closed-form gradients ------------------------

# (x chunk, w chunk, parameters, gradient wanted) -> the chunk's sums, each (..., 1)
ChunkSums = Callable[[Tensor, Tensor | None, Sequence[Tensor], bool], list[Tensor]]
# (data, the sums added up, parameters, gradient wanted) -> (total, its gradient in each parameter)
Finish = Callable[[ExactData, list[Tensor], Sequence[Tensor], bool], tuple[Tensor, list[Tensor]]]


@dataclass(frozen=True)
class _Fused:
    """A family's fused pass: the per-chunk sums and how the total and gradient follow from them."""

    sums: ChunkSums
    finish: Finish

    def run(self, data: ExactData, params: Sequence[Tensor], gradient: bool) -> tuple[Tensor, list[Tensor]]:
        added: list[Tensor] = []
        with _serial():
            for x, w in data.chunks(max((p.shape[:-1] for p in params), key=len)):
                part = self.sums(x, w, params, gradient)
                # added up in place (see ExactData.moments: no small results kept between chunks)
                added = [p.clone() for p in part] if not added else [a.add_(b) for a, b in zip(added, part)]
        return self.finish(data, added, params, gradient)


class _FusedTotal(Function):
    """The total log-likelihood with its gradient computed in the same pass.
    Inputs: (family, data, fused pass, *params in the family's order)."""

    @staticmethod
    def forward(ctx, family: Family, data: ExactData, fused: _Fused, *params: Tensor) -> Tensor:
        total, gradients = fused.run(data, params, gradient=True)
        ctx.family, ctx.data, ctx.gradients = family, data, gradients
        ctx.save_for_backward(*params)
        return total.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        params = ctx.saved_tensors
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[3:]) if needed]
        grads: list[Tensor | None] = [None] * len(params)
        if torch.is_grad_enabled():
            # a graph of the gradient is asked for (create_graph: Hessians): through torch's
            # log_prob, whose second derivatives are exact
            total = _generic_total(ctx.family, ctx.data, params)
            found = torch.autograd.grad(total, [params[i] for i in wanted], grad_output, create_graph=True, allow_unused=True)
            for i, g in zip(wanted, found):
                grads[i] = g if g is not None else torch.zeros_like(params[i])
        else:
            for i in wanted:
                grads[i] = _sum_to(grad_output.unsqueeze(-1) * ctx.gradients[i], params[i].shape)
        return (None, None, None, *grads)


def _generic_total(family: Family, data: ExactData, params: Sequence[Tensor]) -> Tensor:
    dist = family.build(**dict(zip(family.params, params)), validate_args=False)
    log_density = dist.log_prob(data.values)
    if data.weights is not None:
        log_density = data.weights * log_density
    return log_density.sum(-1)


def _sum_to(gradient: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient to a parameter's own shape."""
    while gradient.dim() > len(shape):
        gradient = gradient.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and gradient.shape[dim] != 1:
            gradient = gradient.sum(dim, keepdim=True)
    return gradient


def _fused(family: Family, data: ExactData, params: Mapping[str, Tensor], fused: _Fused) -> Tensor:
    ordered = [params[name] for name in family.params]
    if torch.is_grad_enabled() and any(p.requires_grad for p in ordered):
        return _FusedTotal.apply(family, data, fused, *ordered).unsqueeze(-1)
    # no gradient wanted (a line search's trial point, a held-out NLL): the value's sums alone
    return fused.run(data, ordered, gradient=False)[0]


def _studentt_sums(x: Tensor, w: Tensor | None, params: Sequence[Tensor], gradient: bool) -> list[Tensor]:
    # with d = x - loc, c = df·scale² and r = d²/c = z²/df: the log-likelihood needs Σ log1p(r), and
    # q = 1/(1 + r) gives all three partial derivatives (log1p keeps the digits of small r, so
    # nearby parameters compare as finely as with torch's log_prob)
    df, loc, scale = params
    d = x - loc
    r = (d * d).mul_((df * scale**2).reciprocal())
    if not gradient:
        return [weighted_sum(r.log1p_(), w)]
    q = (r + 1).reciprocal_()
    return [weighted_sum(r.log1p_(), w), weighted_sum(q, w), weighted_sum(d.mul_(q), w)]


def _studentt_finish(data: ExactData, sums: list[Tensor], params: Sequence[Tensor], gradient: bool):
    df, loc, scale = params
    total = data.total
    log_terms = sums[0]  # Σw log(1 + z²/df)
    half = (df + 1) / 2
    constant = torch.lgamma(half) - torch.lgamma(df / 2) - 0.5 * (df.log() + LOG_PI) - scale.log()
    value = total * constant - half * log_terms
    if not gradient:
        return value, []
    sum_q, sum_dq = sums[1:]
    tail = total - sum_q  # Σw (z²/df) / (1 + z²/df)
    grad_df = total * 0.5 * (torch.digamma(half) - torch.digamma(df / 2) - 1 / df) - 0.5 * log_terms + half / df * tail
    grad_loc = (df + 1) / (df * scale**2) * sum_dq
    grad_scale = (-total + (df + 1) * tail) / scale
    return value, [grad_df, grad_loc, grad_scale]


@register_fast("studentt")
def _studentt(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    return _fused(family, data, p, _Fused(_studentt_sums, _studentt_finish))


def _weibull_sums(x: Tensor, w: Tensor | None, params: Sequence[Tensor], gradient: bool) -> list[Tensor]:
    # e = log(x / scale), t = (x / scale)^k = exp(k e)
    scale, concentration = params
    e = torch.log(x) - scale.log()
    t = torch.exp(concentration * e)
    return [weighted_sum(t, w), weighted_sum(t * e, w)] if gradient else [weighted_sum(t, w)]


def _weibull_finish(data: ExactData, sums: list[Tensor], params: Sequence[Tensor], gradient: bool):
    scale, k = params
    logs = data.moments("log")
    total = logs.total
    log_ratio = logs.sum - total * scale.log()  # Σw log(x / scale)
    value = total * (k.log() - scale.log()) + (k - 1) * log_ratio - sums[0]
    if not gradient:
        return value, []
    grad_scale = k / scale * (sums[0] - total)
    grad_k = total / k + log_ratio - sums[1]
    return value, [grad_scale, grad_k]


@register_fast("weibull")
def _weibull(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    return _fused(family, data, p, _Fused(_weibull_sums, _weibull_finish))
