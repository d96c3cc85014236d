"""The continuous families that ship with nllflow, each declared once: start rule, fast likelihood,
tails and the scipy distribution used for goodness-of-fit plots and as a test oracle.

Start rules read the cached statistics of the exact data (one pass each, shared with the
likelihood), so a fit of a family with sufficient statistics costs about one pass over the data.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.distributions as D
from torch import Tensor
from torch.distributions import constraints

from nllflow.families import Family, Parametrisation, above, below, median_abs_dev, register_family
from nllflow.families import scipy_stats as stats
from nllflow.likelihood.special import (
    LN2,
    log1mexp,
    log_beta_tails,
    log_gamma_tails,
    outside,
    standard_normal_tails,
)
from nllflow.likelihood.statistics import ExactData, FusedPass, Moments, weighted_sum

EULER_GAMMA = 0.5772156649015329
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LOG_HALF = math.log(0.5)
LOG_PI = math.log(math.pi)


def _floor(data: ExactData) -> Tensor:
    """A floor for a scale's start value (ties can make a spread 0), relative to the data: an
    absolute floor is a start many orders of magnitude off for data of size 1e-30."""
    return 1e-12 * torch.maximum(data.min.abs(), data.max.abs())


def _floored(data: ExactData, scale: Tensor) -> Tensor:
    """`scale` clamped to `_floor(data)`, without the data's range (a pass over the data) where the
    floor cannot bind: without weights max|x| <= |mean| + √m2 (one squared deviation is at most
    their sum), so a scale of twice 1e-12 times that, rounding included, is above the floor. For
    start rules that read the x moments anyway."""
    if data.weights is None:
        x = data.moments("x")
        if bool((scale >= 2e-12 * (x.mean.abs() + x.m2.sqrt()).amax()).all()):
            return scale
    return scale.clamp_min(_floor(data))


def _spread(data: ExactData) -> Tensor:
    return _floored(data, data.moments("x").std)


def _log_spread(logs: Moments) -> Tensor:
    return logs.std.clamp_min(1e-12 * logs.mean.abs().clamp_min(1.0))


class OpenInterval(constraints.Constraint):
    """(lower, upper) without its endpoints: the beta density is 0 or infinite there."""

    def __init__(self, lower: float, upper: float):
        self.lower, self.upper = lower, upper
        super().__init__()

    def check(self, value: Tensor) -> Tensor:
        return (value > self.lower) & (value < self.upper)

    def __repr__(self) -> str:
        return f"OpenInterval(lower_bound={self.lower}, upper_bound={self.upper})"


OPEN_UNIT_INTERVAL = OpenInterval(0.0, 1.0)


# --- normal and log-normal -----------------------------------------------------------------------


def _normal_total(m: Moments, loc: Tensor, scale: Tensor) -> Tensor:
    return -m.squares_about(loc) / (2 * scale**2) - m.total * (scale.log() + HALF_LOG_2PI)


def _normal_likelihood(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    return _normal_total(data.moments("x"), p["loc"], p["scale"])


def _normal_tails(dist: D.Normal, x: Tensor) -> tuple[Tensor, Tensor]:
    return standard_normal_tails((x - dist.loc) / dist.scale)


@register_family(
    "normal",
    statistics=("x",),
    build=D.Normal,
    params=("loc", "scale"),
    support=constraints.real,
    likelihood=_normal_likelihood,
    tails=_normal_tails,
    scipy=lambda p: stats.norm(loc=p["loc"], scale=p["scale"]),
)
def _normal_start(data: ExactData) -> dict[str, Tensor]:
    return {"loc": data.moments("x").mean, "scale": _spread(data)}


def _lognormal_likelihood(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    logs = data.moments("log")
    return _normal_total(logs, p["loc"], p["scale"]) - logs.sum


def _lognormal_tails(dist: D.LogNormal, x: Tensor) -> tuple[Tensor, Tensor]:
    below_support = x <= 0
    safe = torch.where(below_support, 1.0, x)
    return outside(x, below_support, None, *standard_normal_tails((safe.log() - dist.loc) / dist.scale))


@register_family(
    "lognormal",
    statistics=("log",),
    build=D.LogNormal,
    params=("loc", "scale"),
    support=constraints.positive,
    likelihood=_lognormal_likelihood,
    tails=_lognormal_tails,
    scipy=lambda p: stats.lognorm(s=p["scale"], scale=math.exp(p["loc"])),
)
def _lognormal_start(data: ExactData) -> dict[str, Tensor]:
    logs = data.moments("log")
    return {"loc": logs.mean, "scale": _log_spread(logs)}


def _halfnormal_likelihood(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    m, scale = data.moments("x"), p["scale"]
    return -m.squares_about(torch.zeros_like(m.shift)) / (2 * scale**2) - m.total * (scale.log() + HALF_LOG_2PI - LN2)


def _halfnormal_tails(dist: D.HalfNormal, x: Tensor) -> tuple[Tensor, Tensor]:
    below_support = x <= 0
    z = torch.where(below_support, 1.0, x) / dist.scale
    upper = LN2 + torch.special.log_ndtr(-z)
    # erf keeps its relative accuracy near 0, where 1 - S has none left
    small = z < 1
    lower = torch.where(small, torch.erf(torch.where(small, z, 0.5) / math.sqrt(2)).log(), log1mexp(upper))
    return outside(x, below_support, None, lower, upper)


@register_family(
    "halfnormal",
    statistics=("x",),
    build=D.HalfNormal,
    params=("scale",),
    support=constraints.nonnegative,
    likelihood=_halfnormal_likelihood,
    tails=_halfnormal_tails,
    scipy=lambda p: stats.halfnorm(scale=p["scale"]),
)
def _halfnormal_start(data: ExactData) -> dict[str, Tensor]:
    m = data.moments("x")
    return {"scale": _floored(data, (m.squares_about(torch.zeros_like(m.shift)) / m.total).sqrt())}


# --- the real line -------------------------------------------------------------------------------


def log_gamma_ratio(df: Tensor) -> Tensor:
    """log Γ((ν+1)/2) - log Γ(ν/2), with the asymptotic series where the two log-gammas are so large
    that their difference loses every digit (ν = 1e15 gives errors of order 1 per observation, which
    an optimiser happily mistakes for a better fit)."""
    large = df > 1e5
    safe = torch.where(large, torch.ones_like(df), df)
    exact = torch.lgamma((safe + 1) / 2) - torch.lgamma(safe / 2)
    big = torch.where(large, df, torch.full_like(df, 1e6))
    series = 0.5 * torch.log(big / 2) - 1 / (4 * big) + 1 / (24 * big**3)
    return torch.where(large, series, exact)


class StudentT(D.StudentT):
    """torch's Student-t with its normalising constant kept exact at any df."""

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        y = (value - self.loc) / self.scale
        z = self.scale.log() + 0.5 * self.df.log() + 0.5 * LOG_PI - log_gamma_ratio(self.df)
        return -0.5 * (self.df + 1.0) * torch.log1p(y**2 / self.df) - z


# the largest df at which a Student-t pass sums log(1 + r) as grouped logarithms (xp.log_sum): their
# absolute error of a few ulps of 1 per group, times (df + 1)/2 in the log-likelihood, stays below
# a part in 1e12 of it; above, log1p keeps the digits of r, which there is of order 1/df
GROUPED_LOG_MAX_DF = 1e3


def _studentt_sums(x: Tensor, w: Tensor | None, params: Sequence[Tensor], gradient: bool, xp) -> list[Tensor]:
    # with d = x - loc, c = df·scale² and r = d²/c = z²/df: the log-likelihood needs Σ log1p(r), and
    # q = 1/(1 + r) gives all three partial derivatives. log1p, not log(c + d²) - log c, where df is
    # large: it keeps the digits of small r, so nearby parameters compare as finely as with torch's
    # log_prob, and a large df (1e15, where c + d² rounds to c) still sees the data. The temporaries
    # live in the workspace (each fresh one is a pass over the chunk plus its page faults).
    df, loc, scale = params
    d = xp.subtract(x, loc, out=xp.scratch(0, x, loc))
    r = xp.multiply(d, d, out=xp.scratch(1, d))
    r *= 1 / (df * scale**2)  # (a product, where a quotient of every element took twice as long)
    if bool((df <= GROUPED_LOG_MAX_DF).all()):
        r += 1
        log_terms = xp.log_sum(r, w, 2)
        if not gradient:
            return [log_terms]
        q = xp.divide(1.0, r, out=r)  # (NumPy's reciprocal is not vectorised, its division is)
        # Σ r·q as the count less Σ q: r is not small here, so nothing cancels that matters
        tail = (x.shape[-1] if w is None else w.sum(-1, keepdims=True)) - weighted_sum(q, w)
    elif not gradient:
        return [weighted_sum(xp.log1p(r, out=r), w)]
    else:
        log_terms = weighted_sum(xp.log1p(r, out=xp.scratch(2, r)), w)
        q = xp.add(r, 1.0, out=xp.scratch(2, r))
        q = xp.divide(1.0, q, out=q)
        # Σ r·q itself: r is of order 1/df, and the count less Σ q would keep few of its digits
        tail = weighted_sum(xp.multiply(r, q, out=r), w)
    d *= q
    return [log_terms, tail, weighted_sum(d, w)]


def _studentt_finish(data: ExactData, sums: list[Tensor], params: Sequence[Tensor], gradient: bool):
    df, loc, scale = params
    total = data.total
    log_terms = sums[0]  # Σw log(1 + z²/df)
    half = (df + 1) / 2
    constant = log_gamma_ratio(df) - 0.5 * (df.log() + LOG_PI) - scale.log()
    value = total * constant - half * log_terms
    if not gradient:
        return value, []
    tail, sum_dq = sums[1:]  # Σw (z²/df) / (1 + z²/df) and Σw d / (1 + z²/df)
    grad_df = total * 0.5 * (torch.digamma(half) - torch.digamma(df / 2) - 1 / df) - 0.5 * log_terms + half / df * tail
    grad_loc = (df + 1) / (df * scale**2) * sum_dq
    grad_scale = (-total + (df + 1) * tail) / scale
    return value, [grad_df, grad_loc, grad_scale]


def _studentt_tails(dist: D.StudentT, x: Tensor) -> tuple[Tensor, Tensor]:
    t = (x - dist.loc) / dist.scale
    df = dist.df
    t2 = t * t
    # F(t) = I_{ν/(ν+t²)}(ν/2, 1/2) / 2 for t <= 0, and symmetry for t > 0
    log_i, _ = log_beta_tails(df / 2, torch.full_like(df, 0.5), df / (df + t2), t2 / (df + t2))
    tail = LOG_HALF + log_i
    rest = log1mexp(tail)
    negative = t <= 0
    return torch.where(negative, tail, rest), torch.where(negative, rest, tail)


@register_family(
    "studentt",
    statistics=("x",),
    build=StudentT,
    params=("df", "loc", "scale"),
    support=constraints.real,
    likelihood=FusedPass(_studentt_sums, _studentt_finish),
    tails=_studentt_tails,
    scipy=lambda p: stats.t(df=p["df"], loc=p["loc"], scale=p["scale"]),
)
def _studentt_start(data: ExactData) -> dict[str, Tensor | float]:
    x = data.values
    return {"df": 5.0, "loc": x.median(), "scale": median_abs_dev(x, _spread(data))}


def _laplace_tails(dist: D.Laplace, x: Tensor) -> tuple[Tensor, Tensor]:
    z = (x - dist.loc) / dist.scale
    tail = LOG_HALF - z.abs()
    rest = torch.log1p(-0.5 * torch.exp(-z.abs()))
    negative = z < 0
    return torch.where(negative, tail, rest), torch.where(negative, rest, tail)


@register_family(
    "laplace",
    build=D.Laplace,
    params=("loc", "scale"),
    support=constraints.real,
    # the MLE of loc is a sample median, a kink of the likelihood (its second derivative is 0)
    non_regular=("loc",),
    tails=_laplace_tails,
    scipy=lambda p: stats.laplace(loc=p["loc"], scale=p["scale"]),
)
def _laplace_start(data: ExactData) -> dict[str, Tensor]:
    # the midpoint of the two middle values (torch's median is the lower one): there the NLL is flat
    # in loc, so this start is the MLE; from a kink at a data point L-BFGS's line search can break down
    x = data.values
    loc = (x.median() + x.kthvalue(len(x) // 2 + 1).values) / 2
    return {"loc": loc, "scale": (x - loc).abs().mean().clamp_min(_floor(data))}


def _cauchy_tails(dist: D.Cauchy, x: Tensor) -> tuple[Tensor, Tensor]:
    # 1/2 + atan(z)/π = atan2(1, -z)/π keeps its digits in both tails
    z = (x - dist.loc) / dist.scale
    one = torch.ones_like(z)
    return torch.atan2(one, -z).log() - LOG_PI, torch.atan2(one, z).log() - LOG_PI


@register_family(
    "cauchy",
    build=D.Cauchy,
    params=("loc", "scale"),
    support=constraints.real,
    tails=_cauchy_tails,
    scipy=lambda p: stats.cauchy(loc=p["loc"], scale=p["scale"]),
)
def _cauchy_start(data: ExactData) -> dict[str, Tensor]:
    x = data.values
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device))
    half_range = (q3 - q1) / 2
    return {"loc": x.median(), "scale": torch.where(half_range > 0, half_range, _spread(data))}


def _gumbel_tails(dist: D.Gumbel, x: Tensor) -> tuple[Tensor, Tensor]:
    lower = -torch.exp(-(x - dist.loc) / dist.scale)
    return lower, log1mexp(lower)


@register_family(
    "gumbel",
    statistics=("x",),
    build=D.Gumbel,
    params=("loc", "scale"),
    support=constraints.real,
    tails=_gumbel_tails,
    scipy=lambda p: stats.gumbel_r(loc=p["loc"], scale=p["scale"]),
)
def _gumbel_start(data: ExactData) -> dict[str, Tensor]:
    scale = _spread(data) * math.sqrt(6) / math.pi
    return {"loc": data.moments("x").mean - EULER_GAMMA * scale, "scale": scale}


# --- the positive half-line ----------------------------------------------------------------------


# Newton steps of the gamma shape's MLE after Minka's approximation (3-4 reach rounding)
GAMMA_NEWTON_STEPS = 6


def _gamma_likelihood(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    x, logs = data.moments("x"), data.moments("log")
    shape, rate = p["concentration"], p["rate"]
    return x.total * (torch.xlogy(shape, rate) - torch.lgamma(shape)) + (shape - 1) * logs.sum - rate * x.sum


def _gamma_tails(dist: D.Gamma, x: Tensor) -> tuple[Tensor, Tensor]:
    return log_gamma_tails(dist.concentration, dist.rate * x)


def _gamma_from_mean(p: Mapping[str, Tensor]) -> dict[str, Tensor]:
    shape = 1 / p["dispersion"]
    return {"concentration": shape, "rate": shape / p["mean"]}


@register_family(
    "gamma",
    statistics=("x", "log"),
    build=D.Gamma,
    params=("concentration", "rate"),
    support=constraints.positive,
    likelihood=_gamma_likelihood,
    tails=_gamma_tails,
    parametrisations={
        "mean": Parametrisation(
            params=("mean", "dispersion"),
            constraints={"mean": constraints.positive, "dispersion": constraints.positive},
            to_natural=_gamma_from_mean,
            from_natural=lambda p: {"mean": p["concentration"] / p["rate"], "dispersion": 1 / p["concentration"]},
            variance="dispersion · mean²",
            description="concentration = 1/dispersion, rate = 1/(dispersion · mean)",
        ),
    },
    scipy=lambda p: stats.gamma(a=p["concentration"], scale=1 / p["rate"]),
)
def _gamma_start(data: ExactData) -> dict[str, Tensor]:
    """The MLE from the sufficient statistics: the shape solves log a - ψ(a) = s with
    s = log(mean) - mean(log x), the rate is shape / mean. Minka's approximation (within 1.5 %)
    refined by his generalised Newton steps, which converge quadratically (to rounding in 3-4);
    moment estimates where the data give no s (ties of a censored stand-in)."""
    x, logs = data.moments("x"), data.moments("log")
    s = x.mean.log() - logs.mean
    shape = (3 - s + ((s - 3) ** 2 + 24 * s).clamp_min(0).sqrt()) / (12 * s)
    for _ in range(GAMMA_NEWTON_STEPS):
        # Newton on log a - ψ(a) - s in 1/a (Minka 2002, "Estimating a Gamma distribution")
        residual = shape.log() - torch.digamma(shape) - s
        shape = 1 / (1 / shape + residual / (shape**2 * (1 / shape - torch.polygamma(1, shape))))
    moments = x.mean**2 / _spread(data) ** 2
    shape = torch.where((s > 0) & torch.isfinite(shape) & (shape > 0), shape, moments)
    return {"concentration": shape, "rate": shape / x.mean}


def _exponential_likelihood(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    x, rate = data.moments("x"), p["rate"]
    return x.total * rate.log() - rate * x.sum


def _exponential_tails(dist: D.Exponential, x: Tensor) -> tuple[Tensor, Tensor]:
    below_support = x <= 0
    upper = -dist.rate * torch.where(below_support, 1.0, x)
    return outside(x, below_support, None, log1mexp(upper), upper)


@register_family(
    "exponential",
    statistics=("x",),
    build=D.Exponential,
    params=("rate",),
    support=constraints.nonnegative,
    likelihood=_exponential_likelihood,
    tails=_exponential_tails,
    scipy=lambda p: stats.expon(scale=1 / p["rate"]),
)
def _exponential_start(data: ExactData) -> dict[str, Tensor]:
    return {"rate": 1 / data.moments("x").mean}


def _weibull_sums(x: Tensor, w: Tensor | None, params: Sequence[Tensor], gradient: bool, xp) -> list[Tensor]:
    # e = log(x / scale), t = (x / scale)^k = exp(k e)
    scale, concentration = params
    e = xp.subtract(xp.log(x, out=xp.scratch(0, x)), xp.log(scale), out=xp.scratch(1, x, scale))
    t = xp.multiply(e, concentration, out=xp.scratch(2, e, concentration))
    t = xp.exp(t, out=t)
    total = weighted_sum(t, w)
    if not gradient:
        return [total]
    e *= t
    return [total, weighted_sum(e, w)]


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


def _weibull_tails(dist: D.Weibull, x: Tensor) -> tuple[Tensor, Tensor]:
    below_support = x <= 0
    upper = -((torch.where(below_support, 1.0, x) / dist.scale) ** dist.concentration)
    return outside(x, below_support, None, log1mexp(upper), upper)


@register_family(
    "weibull",
    statistics=("log",),
    build=D.Weibull,
    params=("scale", "concentration"),
    support=constraints.positive,
    likelihood=FusedPass(_weibull_sums, _weibull_finish),
    tails=_weibull_tails,
    scipy=lambda p: stats.weibull_min(c=p["concentration"], scale=p["scale"]),
)
def _weibull_start(data: ExactData) -> dict[str, Tensor]:
    # log x is Gumbel-min distributed with scale 1/k and mode log(scale)
    logs = data.moments("log")
    concentration = math.pi / (math.sqrt(6) * _log_spread(logs))
    return {"scale": (logs.mean + EULER_GAMMA / concentration).exp(), "concentration": concentration}


def _halfcauchy_tails(dist: D.HalfCauchy, x: Tensor) -> tuple[Tensor, Tensor]:
    below_support = x <= 0
    z = torch.where(below_support, 1.0, x) / dist.scale
    one = torch.ones_like(z)
    log_scale = LN2 - LOG_PI
    return outside(x, below_support, None, torch.atan2(z, one).log() + log_scale, torch.atan2(one, z).log() + log_scale)


@register_family(
    "halfcauchy",
    build=D.HalfCauchy,
    params=("scale",),
    support=constraints.nonnegative,
    tails=_halfcauchy_tails,
    scipy=lambda p: stats.halfcauchy(scale=p["scale"]),
)
def _halfcauchy_start(data: ExactData) -> dict[str, Tensor]:
    return {"scale": data.values.median().clamp_min(_floor(data))}


def hold_at_data_bounds(**bounds: str):
    """A polish rule that moves each named free parameter onto the data's min or max (`max+`: just
    above it, for a half-open support): the MLE of a support endpoint sits on the data, where an
    unconstrained optimiser only approaches it."""

    def polish(x: Tensor, params: Mapping[str, Tensor], free: frozenset[str], weights: Tensor | None):
        held = {}
        for name, side in bounds.items():
            if name in free:
                edge = x.min() if side == "min" else x.max()
                # torch's Uniform support is half-open [low, high); toward +inf, as edge + 1 rounds
                # to edge itself above 2**53
                held[name] = torch.nextafter(edge, edge.new_tensor(math.inf)) if side == "max+" else edge
        return [held] if held else []

    return polish


def _pareto_likelihood(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    logs, scale, alpha = data.moments("log"), p["scale"], p["alpha"]
    return logs.total * (alpha.log() + alpha * scale.log()) - (alpha + 1) * logs.sum


def _pareto_tails(dist: D.Pareto, x: Tensor) -> tuple[Tensor, Tensor]:
    below_support = x <= dist.scale
    safe = torch.where(below_support, 2 * dist.scale, x)
    # x - scale is exact near the scale, where log(scale) - log(x) would cancel
    upper = -dist.alpha * torch.log1p((safe - dist.scale) / dist.scale)
    return outside(x, below_support, None, log1mexp(upper), upper)


@register_family(
    "pareto",
    statistics=("log",),
    build=D.Pareto,
    params=("scale", "alpha"),
    support=constraints.positive,
    constraint_rules={"scale": lambda b, known: constraints.interval(0.0, b.min)},
    non_regular=("scale",),
    polish=hold_at_data_bounds(scale="min"),
    likelihood=_pareto_likelihood,
    tails=_pareto_tails,
    scipy=lambda p: stats.pareto(b=p["alpha"], scale=p["scale"]),
)
def _pareto_start(data: ExactData) -> dict[str, Tensor]:
    scale = data.min * 0.99
    logs = data.moments("log")
    return {"scale": scale, "alpha": logs.total / (logs.sum - logs.total * scale.log())}


# --- bounded supports ----------------------------------------------------------------------------


def _beta_likelihood(data: ExactData, family: Family, p: Mapping[str, Tensor]) -> Tensor:
    logs, log1m = data.moments("log"), data.moments("log1m")
    a, b = p["concentration1"], p["concentration0"]
    return (
        (a - 1) * logs.sum
        + (b - 1) * log1m.sum
        + logs.total * (torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b))
    )


def _beta_tails(dist: D.Beta, x: Tensor) -> tuple[Tensor, Tensor]:
    return log_beta_tails(dist.concentration1, dist.concentration0, x, 1 - x)


def _beta_from_mean(p: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {"concentration1": p["mean"] * p["precision"], "concentration0": (1 - p["mean"]) * p["precision"]}


@register_family(
    "beta",
    statistics=("x", "log", "log1m"),
    build=D.Beta,
    params=("concentration1", "concentration0"),
    support=OPEN_UNIT_INTERVAL,
    likelihood=_beta_likelihood,
    tails=_beta_tails,
    parametrisations={
        "mean": Parametrisation(
            params=("mean", "precision"),
            constraints={"mean": constraints.unit_interval, "precision": constraints.positive},
            to_natural=_beta_from_mean,
            from_natural=lambda p: {
                "mean": p["concentration1"] / (p["concentration1"] + p["concentration0"]),
                "precision": p["concentration1"] + p["concentration0"],
            },
            variance="mean · (1 - mean) / (1 + precision)",
            description="concentration1 = mean · precision, concentration0 = (1 - mean) · precision (betareg)",
        ),
    },
    scipy=lambda p: stats.beta(a=p["concentration1"], b=p["concentration0"]),
)
def _beta_start(data: ExactData) -> dict[str, Tensor]:
    m = data.moments("x")
    mean, var = m.mean, _spread(data) ** 2
    common = (mean * (1 - mean) / var - 1).clamp_min(1e-3)
    return {"concentration1": mean * common, "concentration0": (1 - mean) * common}


def _uniform_tails(dist: D.Uniform, x: Tensor) -> tuple[Tensor, Tensor]:
    below_support, above_support = x <= dist.low, x >= dist.high
    middle = (dist.low + dist.high) / 2
    safe = torch.where(below_support | above_support, middle, x)
    log_width = (dist.high - dist.low).log()
    return outside(
        x, below_support, above_support, (safe - dist.low).log() - log_width, (dist.high - safe).log() - log_width
    )


@register_family(
    "uniform",
    build=D.Uniform,
    params=("low", "high"),
    support=constraints.real,
    constraint_rules={
        "low": lambda b, known: constraints.less_than(b.min),
        "high": lambda b, known: constraints.greater_than(b.max),
    },
    non_regular=("low", "high"),
    polish=hold_at_data_bounds(low="min", high="max+"),
    tails=_uniform_tails,
    scipy=lambda p: stats.uniform(loc=p["low"], scale=p["high"] - p["low"]),
)
def _uniform_start(data: ExactData) -> dict[str, float]:
    low, high = float(data.min), float(data.max)
    return {"low": below(low, high - low), "high": above(high, high - low)}
