"""Censored observations: the log-CDF and log-survival function of every continuous family, stable
in both tails and differentiable in every parameter, and the likelihood of rows known only to lie in
an interval.

`log_tails(dist, x)` returns (log F(x), log S(x)). Each family has a closed form where one exists
(`log1p(-cdf)` would lose every digit in the upper tail); the gamma, Student-t and beta families go
through the regularised incomplete gamma and beta functions computed here by series and continued
fractions in log space, with their derivatives with respect to the shape parameters carried along
the same iterations (torch differentiates its own `gammainc` in `x` only and has no incomplete beta).
Second derivatives, which the observed information needs, are analytic in `x` and central
differences of the exact first derivatives in the shapes.

A family written elsewhere registers its tails with `@register_tails(TheDistribution)`; a
distribution without a rule but with a `cdf` falls back to log(cdf) and log1p(-cdf), which are
exact away from the far tails only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributions as D
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable
from torch.distributions import Distribution

from tasks.errors import InputError
from tasks.triangular import Triangular

LOG_HALF = math.log(0.5)
LN2 = math.log(2.0)
LOG_PI = math.log(math.pi)
LOG_SMALLEST = -700.0
MAX_ITERATIONS = 20_000
CHECK_EVERY = 8
# relative step of the central differences that give the second derivatives in a shape parameter
SHAPE_STEP = 1e-4

TailRule = Callable[[Distribution, Tensor], tuple[Tensor, Tensor]]
_TAILS: dict[type, TailRule] = {}


def register_tails(cls: type) -> Callable[[TailRule], TailRule]:
    """Register the decorated function as the (log F, log S) rule of the distribution class `cls`."""

    def decorator(rule: TailRule) -> TailRule:
        _TAILS[cls] = rule
        return rule

    return decorator


def has_tails(dist_class: type) -> bool:
    return dist_class in _TAILS or dist_class.cdf is not Distribution.cdf


def log_tails(dist: Distribution, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log F(x), log S(x)) of `dist`, broadcast over its batch shape and `x`."""
    rule = _TAILS.get(type(dist))
    if rule is not None:
        return rule(dist, x)
    if type(dist).cdf is Distribution.cdf:
        raise InputError(f"{type(dist).__name__} has no cdf, so it cannot describe censored observations")
    cdf = dist.cdf(x)
    return cdf.log(), torch.log1p(-cdf)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x (Mächler 2012)."""
    near = x > -LN2
    close = torch.log(-torch.expm1(torch.where(near, x, -LN2)))
    # below -700 the result is -exp(x) < 1e-304 in magnitude; the clamp keeps exp out of the
    # subnormal range, where CPUs are tens of times slower
    far = torch.log1p(-torch.exp(torch.where(near, -LN2, x.clamp_min(LOG_SMALLEST))))
    return torch.where(near, close, far)


def log_diff(big: Tensor, small: Tensor) -> Tensor:
    """log(exp(big) - exp(small)) for big >= small; -inf where both are -inf."""
    empty = big == -math.inf
    gap = torch.where(empty, -1.0, small - big)
    return torch.where(empty, -math.inf, torch.where(empty, 0.0, big) + log1mexp(gap))


def log_interval(dist: Distribution, low: Tensor, high: Tensor) -> Tensor:
    """log P(low < X <= high), from the survival function where low is in the upper half (there the
    CDF has no digits left to subtract) and from the CDF elsewhere."""
    cdf_low, sf_low = log_tails(dist, low)
    cdf_high, sf_high = log_tails(dist, high)
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

    def pseudo_values(self) -> Tensor:
        """One point per row for start values and plots: the midpoint of an interval, the bound of a
        left- or right-censored row (fitdistrplus's convention)."""
        finite_low = torch.where(torch.isinf(self.low), self.high, self.low)
        finite_high = torch.where(torch.isinf(self.high), self.low, self.high)
        return (finite_low + finite_high) / 2

    def finite_bounds(self) -> tuple[Tensor, Tensor]:
        """The finite upper bounds (a support must reach below them) and finite lower bounds (it
        must reach above them)."""
        return self.high[torch.isfinite(self.high)], self.low[torch.isfinite(self.low)]

    def log_likelihood(self, dist: Distribution) -> Tensor:
        """Σ w log P(low < X <= high), summed over the last (row) dimension."""
        total = None
        for kind, index in self._groups.items():
            if len(index) == 0:
                continue
            if kind == "left":
                terms = log_tails(dist, self.high.index_select(-1, index))[0]
            elif kind == "right":
                terms = log_tails(dist, self.low.index_select(-1, index))[1]
            else:
                terms = log_interval(dist, self.low.index_select(-1, index), self.high.index_select(-1, index))
            if self.weights is not None:
                terms = self.weights.index_select(-1, index) * terms
            part = terms.sum(-1)
            total = part if total is None else total + part
        return total if total is not None else self.low.new_zeros(())

    def select(self, index: Tensor) -> CensoredRows:
        weights = None if self.weights is None else self.weights[index]
        return CensoredRows(self.low[index], self.high[index], weights)


# --- the incomplete gamma and beta functions in log space, with shape derivatives -----------------


def _converged(delta: Tensor, scale: Tensor | float = 1.0) -> bool:
    """Every |delta| at rounding level relative to `scale` (elements that are not finite cannot
    improve and do not hold the others up)."""
    settled = (delta.abs() <= torch.finfo(delta.dtype).eps * scale) | ~torch.isfinite(delta)
    return bool(settled.all())


def _gamma_series(a: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """log P(a, x) and ∂/∂a from P = x^a e^-x / Γ(a+1) Σ_n x^n / ((a+1)…(a+n)) (used for x < a+1,
    where the terms fall monotonically)."""
    term = torch.ones_like(x)
    dlog_term = torch.zeros_like(x)
    total, dtotal = torch.ones_like(x), torch.zeros_like(x)
    for n in range(1, MAX_ITERATIONS):
        shifted = a + n
        term = term * x / shifted
        dlog_term = dlog_term - 1 / shifted
        total = total + term
        dtotal = dtotal + term * dlog_term
        if n % CHECK_EVERY == 0 and _converged(term, total):
            break
    log_x = x.log()
    log_p = a * log_x - x - torch.lgamma(a + 1) + total.log()
    return log_p, log_x - torch.digamma(a + 1) + dtotal / total


def _lentz(
    first: Tensor, dfirst: Sequence[Tensor], terms: Callable[[int], tuple[Tensor, Tensor, Sequence[Tensor], Sequence[Tensor]]]
) -> tuple[Tensor, list[Tensor]]:
    """log f and its derivatives for f = b0 + a1/(b1 + a2/(b2 + …)) by the modified Lentz method,
    with forward-mode derivatives (one per direction in `dfirst`) carried through every step.
    `terms(j)` gives a_j, b_j and their derivatives."""
    tiny = torch.finfo(first.dtype).tiny ** 0.5
    f, c, d = first, first, torch.zeros_like(first)
    dc, dd = list(dfirst), [torch.zeros_like(first) for _ in dfirst]
    dlog_f = [g / first for g in dfirst]
    for j in range(1, MAX_ITERATIONS):
        a_j, b_j, da, db = terms(j)
        d_new = b_j + a_j * d
        d_new = torch.where(d_new.abs() < tiny, tiny, d_new)
        c_new = b_j + a_j / c
        c_new = torch.where(c_new.abs() < tiny, tiny, c_new)
        d_inv = 1 / d_new
        delta = c_new * d_inv
        settled = [(delta - 1, 4.0)]  # a product of two rounded numbers: a few ulps of noise
        for k in range(len(dfirst)):
            dd_new = db[k] + da[k] * d + a_j * dd[k]
            dc_new = db[k] + da[k] / c - a_j * dc[k] / (c * c)
            from_c, from_d = dc_new / c_new, dd_new * d_inv
            dlog_f[k] = dlog_f[k] + (from_c - from_d)
            dd[k], dc[k] = -dd_new * d_inv * d_inv, dc_new
            # an increment is done at the rounding level of the sum or of its two cancelling parts
            settled.append((from_c - from_d, 1 + dlog_f[k].abs() + 8 * (from_c.abs() + from_d.abs())))
        f, c, d = f * delta, c_new, d_inv
        # the derivatives must settle too: a zero term (b - m = 0) ends the value's fraction, not theirs
        if j % CHECK_EVERY == 0 and all(_converged(step, scale) for step, scale in settled):
            break
    return f.log(), dlog_f


def _gamma_fraction(a: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """log Q(a, x) and ∂/∂a from Legendre's continued fraction
    Q = x^a e^-x / Γ(a) / (x+1-a - 1(1-a)/(x+3-a - 2(2-a)/(x+5-a - …))) (used for x >= a+1)."""
    first = x + 1 - a
    minus_one = torch.full_like(x, -1.0)

    def terms(j: int):
        return -j * (j - a), first + 2 * j, [torch.full_like(x, float(j))], [minus_one]

    log_g, (dlog_g,) = _lentz(first, [minus_one], terms)
    log_x = x.log()
    return a * log_x - x - torch.lgamma(a) - log_g, log_x - torch.digamma(a) - dlog_g


def _beta_fraction(a: Tensor, b: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """log I_x(a, b) and its derivatives in a and b, from I = x^a y^b / (a B(a,b)) / g with the
    continued fraction g = 1 + d1/(1 + d2/(1 + …)) (used for x < (a+1)/(a+b+2)); y = 1 - x."""
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)

    def terms(j: int):
        if j % 2:  # d_{2m+1}
            m = (j - 1) // 2
            p, q = a + 2 * m, a + 2 * m + 1
            den = p * q
            value = -(a + m) * (a + b + m) * x / den
            da = -((a + b + m) + (a + m)) * x / den - value * (1 / p + 1 / q)
            db = -(a + m) * x / den
        else:  # d_{2m}
            m = j // 2
            p, q = a + 2 * m - 1, a + 2 * m
            den = p * q
            value = m * (b - m) * x / den
            da = -value * (1 / p + 1 / q)
            db = m * x / den
        return value, ones, [da, db], [zeros, zeros]

    log_g, (dlog_ga, dlog_gb) = _lentz(ones, [zeros, zeros], terms)
    digamma_ab = torch.digamma(a + b)
    log_prefactor = a * x.log() + b * y.log() - a.log() - (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b))
    da = x.log() - 1 / a - torch.digamma(a) + digamma_ab - dlog_ga
    db = y.log() - torch.digamma(b) + digamma_ab - dlog_gb
    return log_prefactor - log_g, da, db


def _complement(log_value: Tensor, dlog_value: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """log(1 - v) and its derivatives from log v and its derivatives."""
    log_other = log1mexp(log_value)
    ratio = -torch.exp(log_value - log_other)
    return log_other, [ratio * g for g in dlog_value]


@dataclass(frozen=True)
class _Kernel:
    """A regularised incomplete function L(x; shapes) = ∫ density up to x, with U = 1 - L.
    `evaluate(shapes, x, y)` gives log L, log U and their shape derivatives (lists); `log_density`
    the log of ∂L/∂x (differentiable); `dlog_density` its shape derivatives."""

    evaluate: Callable[..., tuple[Tensor, Tensor, list[Tensor], list[Tensor]]]
    log_density: Callable[..., Tensor]
    dlog_density: Callable[..., list[Tensor]]


def _gamma_evaluate(shapes: Sequence[Tensor], x: Tensor, y: Tensor | None):
    (a,) = shapes
    lower, upper = torch.full_like(x, -math.inf), torch.zeros_like(x)
    d_lower, d_upper = torch.zeros_like(x), torch.zeros_like(x)
    inside = x > 0
    series = inside & (x < a + 1)
    fraction = inside & ~series
    if bool(series.any()):
        log_p, dp = _gamma_series(a[series], x[series])
        log_q, (dq,) = _complement(log_p, [dp])
        lower[series], upper[series], d_lower[series], d_upper[series] = log_p, log_q, dp, dq
    if bool(fraction.any()):
        log_q, dq = _gamma_fraction(a[fraction], x[fraction])
        log_p, (dp,) = _complement(log_q, [dq])
        lower[fraction], upper[fraction], d_lower[fraction], d_upper[fraction] = log_p, log_q, dp, dq
    return lower, upper, [d_lower], [d_upper]


def _gamma_log_density(shapes: Sequence[Tensor], x: Tensor, y: Tensor | None) -> Tensor:
    (a,) = shapes
    return torch.xlogy(a - 1, x) - x - torch.lgamma(a)


def _gamma_dlog_density(shapes: Sequence[Tensor], x: Tensor, y: Tensor | None) -> list[Tensor]:
    (a,) = shapes
    return [x.log() - torch.digamma(a)]


def _beta_evaluate(shapes: Sequence[Tensor], x: Tensor, y: Tensor):
    a, b = shapes
    lower, upper = torch.full_like(x, -math.inf), torch.zeros_like(x)
    lower = torch.where(y <= 0, 0.0, lower)
    upper = torch.where(y <= 0, -math.inf, upper)
    derivatives = [torch.zeros_like(x) for _ in range(4)]
    inside = (x > 0) & (y > 0)
    direct = inside & (x < (a + 1) / (a + b + 2))
    swapped = inside & ~direct
    if bool(direct.any()):
        log_i, da, db = _beta_fraction(a[direct], b[direct], x[direct], y[direct])
        log_j, (dja, djb) = _complement(log_i, [da, db])
        lower[direct], upper[direct] = log_i, log_j
        for target, value in zip(derivatives, (da, db, dja, djb)):
            target[direct] = value
    if bool(swapped.any()):
        log_j, djb, dja = _beta_fraction(b[swapped], a[swapped], y[swapped], x[swapped])
        log_i, (da, db) = _complement(log_j, [dja, djb])
        lower[swapped], upper[swapped] = log_i, log_j
        for target, value in zip(derivatives, (da, db, dja, djb)):
            target[swapped] = value
    return lower, upper, derivatives[:2], derivatives[2:]


def _beta_log_density(shapes: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
    a, b = shapes
    return torch.xlogy(a - 1, x) + torch.xlogy(b - 1, y) - (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b))


def _beta_dlog_density(shapes: Sequence[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    a, b = shapes
    common = torch.digamma(a + b)
    return [x.log() - torch.digamma(a) + common, y.log() - torch.digamma(b) + common]


_GAMMA = _Kernel(_gamma_evaluate, _gamma_log_density, _gamma_dlog_density)
_BETA = _Kernel(_beta_evaluate, _beta_log_density, _beta_dlog_density)


def _inside(lower: Tensor, upper: Tensor) -> Tensor:
    return torch.isfinite(lower) & torch.isfinite(upper)


class _Tails(Function):
    """(log L, log U) of a kernel; differentiable twice in x and in the shapes. `y` = 1 − x, when
    given, only carries digits: the first derivatives go through x alone, and the density in the
    backward pass uses both, so second derivatives reach y's own inputs."""

    @staticmethod
    def forward(ctx, kernel: _Kernel, x: Tensor, y: Tensor | None, *shapes: Tensor):
        with torch.no_grad():
            lower, upper, d_lower, d_upper = kernel.evaluate(shapes, x, y)
        ctx.kernel, ctx.count = kernel, len(shapes)
        ctx.save_for_backward(x, y, lower, upper, *shapes, *d_lower, *d_upper)
        return lower, upper

    @staticmethod
    def backward(ctx, g_lower: Tensor, g_upper: Tensor):
        x, y, lower, upper, *rest = ctx.saved_tensors
        k = ctx.count
        shapes = rest[:k]
        derivatives = _ShapeDerivatives.apply(ctx.kernel, x, y, lower, upper, *shapes, *rest[k:])
        inside = _inside(lower, upper)
        safe_x = torch.where(inside, x, 0.5)
        safe_y = None if y is None else torch.where(inside, y, 0.5)
        log_density = ctx.kernel.log_density(shapes, safe_x, safe_y)
        dx_lower = torch.exp(log_density - torch.where(inside, lower, 0.0))
        dx_upper = -torch.exp(log_density - torch.where(inside, upper, 0.0))
        grad_x = torch.where(inside, g_lower * dx_lower + g_upper * dx_upper, 0.0)
        grads = [g_lower * derivatives[i] + g_upper * derivatives[k + i] for i in range(k)]
        return None, grad_x, None, *grads


class _ShapeDerivatives(Function):
    """The shape derivatives of (log L, log U) as a differentiable output: their x derivative is
    analytic, ∂/∂x ∂log L/∂s = ∂log L/∂x (∂log f/∂s − ∂log L/∂s), and their shape derivatives are
    central differences of the exact first derivatives."""

    @staticmethod
    def forward(ctx, kernel: _Kernel, x: Tensor, y: Tensor | None, lower: Tensor, upper: Tensor, *rest: Tensor):
        k = len(rest) // 3
        ctx.kernel, ctx.count = kernel, k
        ctx.save_for_backward(x, y, lower, upper, *rest)
        return tuple(t.clone() for t in rest[k:])

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        x, y, lower, upper, *rest = ctx.saved_tensors
        k = ctx.count
        shapes, first = list(rest[:k]), rest[k:]
        inside = _inside(lower, upper)
        shape_grads = []
        for i in range(k):
            step = SHAPE_STEP * shapes[i]
            plus = _kernel_derivatives(ctx.kernel, shapes, i, step, x, y)
            minus = _kernel_derivatives(ctx.kernel, shapes, i, -step, x, y)
            second = [torch.where(inside, (p - m) / (2 * step), 0.0) for p, m in zip(plus, minus)]
            shape_grads.append(sum(g * s for g, s in zip(grads, second)))
        safe_x = torch.where(inside, x, 0.5)
        safe_y = None if y is None else torch.where(inside, y, 0.5)
        log_density = ctx.kernel.log_density(shapes, safe_x, safe_y)
        dlog_density = ctx.kernel.dlog_density(shapes, safe_x, safe_y)
        dx_lower = torch.exp(log_density - torch.where(inside, lower, 0.0))
        dx_upper = -torch.exp(log_density - torch.where(inside, upper, 0.0))
        grad_x = torch.zeros_like(x)
        for i in range(k):
            grad_x = grad_x + grads[i] * dx_lower * (dlog_density[i] - first[i])
            grad_x = grad_x + grads[k + i] * dx_upper * (dlog_density[i] - first[k + i])
        grad_x = torch.where(inside, grad_x, 0.0)
        return None, grad_x, None, None, None, *shape_grads, *([None] * (2 * k))


def _kernel_derivatives(kernel: _Kernel, shapes: list[Tensor], i: int, step: Tensor, x: Tensor, y: Tensor | None):
    moved = [s + step if j == i else s for j, s in enumerate(shapes)]
    _, _, d_lower, d_upper = kernel.evaluate(moved, x, y)
    return [*d_lower, *d_upper]


def log_gamma_tails(a: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log P(a, x), log Q(a, x)): the regularised lower and upper incomplete gamma functions."""
    a, x = torch.broadcast_tensors(a, x)
    return _Tails.apply(_GAMMA, x, None, a)


def log_beta_tails(a: Tensor, b: Tensor, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(log I_x(a, b), log(1 − I_x(a, b))); pass y = 1 − x when it is known more accurately than
    1 − x (the Student-t's t²/(ν + t²))."""
    if y is None:
        y = 1 - x
    a, b, x, y = torch.broadcast_tensors(a, b, x, y)
    return _Tails.apply(_BETA, x, y, a, b)


# --- the families' tails -------------------------------------------------------------------------


def _outside(x: Tensor, below: Tensor, above: Tensor | None, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Put log F = -inf, log S = 0 below the support and log F = 0, log S = -inf above it."""
    lower = torch.where(below, -math.inf, lower)
    upper = torch.where(below, 0.0, upper)
    if above is not None:
        lower = torch.where(above, 0.0, lower)
        upper = torch.where(above, -math.inf, upper)
    return lower, upper


def _standard_normal(z: Tensor) -> tuple[Tensor, Tensor]:
    return torch.special.log_ndtr(z), torch.special.log_ndtr(-z)


@register_tails(D.Normal)
def _normal(dist: D.Normal, x: Tensor) -> tuple[Tensor, Tensor]:
    return _standard_normal((x - dist.loc) / dist.scale)


@register_tails(D.LogNormal)
def _lognormal(dist: D.LogNormal, x: Tensor) -> tuple[Tensor, Tensor]:
    below = x <= 0
    safe = torch.where(below, 1.0, x)
    return _outside(x, below, None, *_standard_normal((safe.log() - dist.loc) / dist.scale))


@register_tails(D.HalfNormal)
def _halfnormal(dist: D.HalfNormal, x: Tensor) -> tuple[Tensor, Tensor]:
    below = x <= 0
    z = torch.where(below, 1.0, x) / dist.scale
    upper = LN2 + torch.special.log_ndtr(-z)
    # erf keeps its relative accuracy near 0, where 1 - S has none left
    small = z < 1
    lower = torch.where(small, torch.erf(torch.where(small, z, 0.5) / math.sqrt(2)).log(), log1mexp(upper))
    return _outside(x, below, None, lower, upper)


@register_tails(D.StudentT)
def _studentt(dist: D.StudentT, x: Tensor) -> tuple[Tensor, Tensor]:
    t = (x - dist.loc) / dist.scale
    df = dist.df
    t2 = t * t
    # F(t) = I_{ν/(ν+t²)}(ν/2, 1/2) / 2 for t <= 0, and symmetry for t > 0
    log_i, _ = log_beta_tails(df / 2, torch.full_like(df, 0.5), df / (df + t2), t2 / (df + t2))
    tail = LOG_HALF + log_i
    rest = log1mexp(tail)
    negative = t <= 0
    return torch.where(negative, tail, rest), torch.where(negative, rest, tail)


@register_tails(D.Gamma)
def _gamma(dist: D.Gamma, x: Tensor) -> tuple[Tensor, Tensor]:
    return log_gamma_tails(dist.concentration, dist.rate * x)


@register_tails(D.Beta)
def _beta(dist: D.Beta, x: Tensor) -> tuple[Tensor, Tensor]:
    return log_beta_tails(dist.concentration1, dist.concentration0, x, 1 - x)


@register_tails(D.Exponential)
def _exponential(dist: D.Exponential, x: Tensor) -> tuple[Tensor, Tensor]:
    below = x <= 0
    upper = -dist.rate * torch.where(below, 1.0, x)
    return _outside(x, below, None, log1mexp(upper), upper)


@register_tails(D.Weibull)
def _weibull(dist: D.Weibull, x: Tensor) -> tuple[Tensor, Tensor]:
    below = x <= 0
    upper = -((torch.where(below, 1.0, x) / dist.scale) ** dist.concentration)
    return _outside(x, below, None, log1mexp(upper), upper)


@register_tails(D.Pareto)
def _pareto(dist: D.Pareto, x: Tensor) -> tuple[Tensor, Tensor]:
    below = x <= dist.scale
    safe = torch.where(below, 2 * dist.scale, x)
    # x - scale is exact near the scale, where log(scale) - log(x) would cancel
    upper = -dist.alpha * torch.log1p((safe - dist.scale) / dist.scale)
    return _outside(x, below, None, log1mexp(upper), upper)


@register_tails(D.Gumbel)
def _gumbel(dist: D.Gumbel, x: Tensor) -> tuple[Tensor, Tensor]:
    lower = -torch.exp(-(x - dist.loc) / dist.scale)
    return lower, log1mexp(lower)


@register_tails(D.Laplace)
def _laplace(dist: D.Laplace, x: Tensor) -> tuple[Tensor, Tensor]:
    z = (x - dist.loc) / dist.scale
    tail = LOG_HALF - z.abs()
    rest = torch.log1p(-0.5 * torch.exp(-z.abs()))
    negative = z < 0
    return torch.where(negative, tail, rest), torch.where(negative, rest, tail)


@register_tails(D.Cauchy)
def _cauchy(dist: D.Cauchy, x: Tensor) -> tuple[Tensor, Tensor]:
    # 1/2 + atan(z)/π = atan2(1, -z)/π keeps its digits in both tails
    z = (x - dist.loc) / dist.scale
    one = torch.ones_like(z)
    return torch.atan2(one, -z).log() - LOG_PI, torch.atan2(one, z).log() - LOG_PI


@register_tails(D.HalfCauchy)
def _halfcauchy(dist: D.HalfCauchy, x: Tensor) -> tuple[Tensor, Tensor]:
    below = x <= 0
    z = torch.where(below, 1.0, x) / dist.scale
    one = torch.ones_like(z)
    log_scale = LN2 - LOG_PI
    return _outside(x, below, None, torch.atan2(z, one).log() + log_scale, torch.atan2(one, z).log() + log_scale)


@register_tails(D.Uniform)
def _uniform(dist: D.Uniform, x: Tensor) -> tuple[Tensor, Tensor]:
    below, above = x <= dist.low, x >= dist.high
    middle = (dist.low + dist.high) / 2
    safe = torch.where(below | above, middle, x)
    log_width = (dist.high - dist.low).log()
    return _outside(x, below, above, (safe - dist.low).log() - log_width, (dist.high - safe).log() - log_width)


@register_tails(Triangular)
def _triangular(dist: Triangular, x: Tensor) -> tuple[Tensor, Tensor]:
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
    return _outside(x, below, above, lower, upper)
