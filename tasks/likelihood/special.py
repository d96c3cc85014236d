"""Special functions in log space for the tails of distributions: log(1 - e^x), log(e^a - e^b),
the regularised incomplete gamma and beta functions with their derivatives in the shape parameters
(torch differentiates its own `gammainc` in x only and has no incomplete beta), and the standard
normal's tails.

The incomplete functions are computed by series and continued fractions in log space, with the
shape derivatives carried along the same iterations; second derivatives, which the observed
information needs, are analytic in x and central differences of the exact first derivatives in the
shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

LN2 = math.log(2.0)
LOG_SMALLEST = -700.0
MAX_ITERATIONS = 20_000
CHECK_EVERY = 8
# relative step of the central differences that give the second derivatives in a shape parameter
SHAPE_STEP = 1e-4


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
    first: Tensor,
    dfirst: Sequence[Tensor],
    terms: Callable[[int], tuple[Tensor, Tensor, Sequence[Tensor], Sequence[Tensor]]],
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
        for target, value in zip(derivatives, (da, db, dja, djb), strict=False):
            target[direct] = value
    if bool(swapped.any()):
        log_j, djb, dja = _beta_fraction(b[swapped], a[swapped], y[swapped], x[swapped])
        log_i, (da, db) = _complement(log_j, [dja, djb])
        lower[swapped], upper[swapped] = log_i, log_j
        for target, value in zip(derivatives, (da, db, dja, djb), strict=False):
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
            second = [torch.where(inside, (p - m) / (2 * step), 0.0) for p, m in zip(plus, minus, strict=False)]
            shape_grads.append(sum(g * s for g, s in zip(grads, second, strict=False)))
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


def outside(x: Tensor, below: Tensor, above: Tensor | None, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Put log F = -inf, log S = 0 below the support and log F = 0, log S = -inf above it."""
    lower = torch.where(below, -math.inf, lower)
    upper = torch.where(below, 0.0, upper)
    if above is not None:
        lower = torch.where(above, 0.0, lower)
        upper = torch.where(above, -math.inf, upper)
    return lower, upper


def standard_normal_tails(z: Tensor) -> tuple[Tensor, Tensor]:
    return torch.special.log_ndtr(z), torch.special.log_ndtr(-z)
