"""Registry of parametric families: a name maps to how a torch Distribution is built, constrained,
started and checked.

A family is declared once, with the decorator `register_family` on its start-value rule:

    @register_family("normal", build=D.Normal, params=("loc", "scale"), data_support=constraints.real,
                     scipy=lambda p: stats.norm(p["loc"], p["scale"]))
    def _normal_start(x):
        return {"loc": x.mean(), "scale": x.std()}

Parameter names are torch's own. The constraint of a parameter is the distribution's
`arg_constraints[name]` unless the family gives a rule; rules receive the data bounds and the
parameters already resolved, so a support that moves with the parameters (uniform, pareto,
triangular) keeps every data point inside it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributions as D
from scipy import stats
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.constraints import Constraint

from tasks.errors import InputError

EULER_GAMMA = 0.5772156649015329


@dataclass(frozen=True)
class DataBounds:
    """The data's range: what data-dependent constraints need."""

    min: float
    max: float


ConstraintRule = Callable[[DataBounds, Mapping[str, Tensor]], Constraint]
StartRule = Callable[[Tensor], Mapping[str, float | Tensor]]
ShapeRule = Callable[[Tensor], Mapping[str, tuple[int, ...]]]
# (data, current natural params, free names, weights) -> candidate values to hold in a refit each
PolishRule = Callable[[Tensor, Mapping[str, Tensor], frozenset[str], Tensor | None], list[dict[str, Tensor]]]


@dataclass(frozen=True)
class Family:
    """How to fit one parametric family by maximum likelihood."""

    name: str
    build: Callable[..., Distribution]
    params: tuple[str, ...]
    start: StartRule
    data_support: Constraint
    discrete: bool = False
    constraint_rules: Mapping[str, ConstraintRule] = field(default_factory=dict)
    # order in which constraints are resolved when one depends on another (triangular's peak)
    resolve_order: tuple[str, ...] | None = None
    # parameters the user must fix (binomial's total_count)
    required_fixed: tuple[str, ...] = ()
    # parameters whose MLE sits at a data bound or a kink: no Wald interval for them
    non_regular: tuple[str, ...] = ()
    param_shapes: ShapeRule | None = None
    scipy: Callable[[Mapping[str, float]], Any] | None = None
    polish: PolishRule | None = None
    # more start values for a multimodal likelihood; the best fit of all starts wins
    extra_starts: Callable[[Tensor], list[Mapping[str, float | Tensor]]] | None = None

    def constraint(self, name: str, bounds: DataBounds, known: Mapping[str, Tensor]) -> Constraint:
        rule = self.constraint_rules.get(name)
        if rule is not None:
            return rule(bounds, known)
        return self.build.arg_constraints[name]  # type: ignore[attr-defined]

    def shapes(self, x: Tensor) -> dict[str, tuple[int, ...]]:
        shapes = {name: () for name in self.params}
        if self.param_shapes is not None:
            shapes.update(self.param_shapes(x))
        return shapes

    @property
    def order(self) -> tuple[str, ...]:
        return self.resolve_order or self.params


FAMILIES: dict[str, Family] = {}


def register_family(name: str, **declaration: Any) -> Callable[[StartRule], StartRule]:
    """Register the decorated start-value rule as the family `name` (see `Family` for the fields)."""

    def decorator(start: StartRule) -> StartRule:
        if name in FAMILIES:
            raise ValueError(f"family {name!r} is already registered")
        FAMILIES[name] = Family(name=name, start=start, **declaration)
        return start

    return decorator


def get_family(name: str) -> Family:
    """The registered family `name`; an unknown name is an InputError listing the valid ones."""
    load_plugins()
    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"unknown family {name!r}; valid: {', '.join(sorted(FAMILIES))}") from None


def family_names() -> list[str]:
    load_plugins()
    return sorted(FAMILIES)


_loaded_plugins: set[str] = set()


def load_plugins() -> None:
    """Import the user's family files named in NLLFLOW_PLUGINS (paths to .py files or module names,
    separated by commas); each registers its families on import."""
    for entry in filter(None, (e.strip() for e in os.environ.get("NLLFLOW_PLUGINS", "").split(","))):
        if entry in _loaded_plugins:
            continue
        _loaded_plugins.add(entry)
        if entry.endswith(".py"):
            path = Path(entry)
            if not path.is_file():
                raise InputError(f"NLLFLOW_PLUGINS names {entry!r}, which is not a file")
            spec = importlib.util.spec_from_file_location(f"nllflow_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            importlib.import_module(entry)


# --- start-value helpers -------------------------------------------------------------------------


def _tiny(x: Tensor) -> Tensor:
    """A floor for a scale's start value (ties can make a spread 0), relative to the data: an
    absolute floor is a start many orders of magnitude off for data of size 1e-30, from which the
    optimiser may never get back."""
    return 1e-12 * x.abs().max()


def _spread(x: Tensor) -> Tensor:
    return x.std(correction=0).clamp_min(_tiny(x))


def _median_abs_dev(x: Tensor) -> Tensor:
    # more than half the points tied (censored rows at one limit) leave no median deviation; past
    # 1e5 points an evenly strided subsample gives this start value, without copies of the sample
    sample = x[:: max(1, x.numel() // 100_000)]
    mad = (sample - x.median()).abs().median() * 1.4826
    return torch.where(mad > 0, mad, _spread(x))


def _below(bound: float, span: float) -> float:
    return bound - 0.01 * span


def _above(bound: float, span: float) -> float:
    return bound + 0.01 * span


# --- continuous families on the real line --------------------------------------------------------


@register_family(
    "normal",
    build=D.Normal,
    params=("loc", "scale"),
    data_support=constraints.real,
    scipy=lambda p: stats.norm(loc=p["loc"], scale=p["scale"]),
)
def _normal_start(x: Tensor) -> dict[str, Tensor]:
    return {"loc": x.mean(), "scale": _spread(x)}


@register_family(
    "studentt",
    build=D.StudentT,
    params=("df", "loc", "scale"),
    data_support=constraints.real,
    scipy=lambda p: stats.t(df=p["df"], loc=p["loc"], scale=p["scale"]),
)
def _studentt_start(x: Tensor) -> dict[str, Tensor | float]:
    return {"df": 5.0, "loc": x.median(), "scale": _median_abs_dev(x)}


@register_family(
    "laplace",
    build=D.Laplace,
    params=("loc", "scale"),
    data_support=constraints.real,
    # the MLE of loc is a sample median, a kink of the likelihood (its second derivative is 0)
    non_regular=("loc",),
    scipy=lambda p: stats.laplace(loc=p["loc"], scale=p["scale"]),
)
def _laplace_start(x: Tensor) -> dict[str, Tensor]:
    # the midpoint of the two middle values (torch's median is the lower one): there the NLL is flat
    # in loc, so this start is the MLE; from a kink at a data point L-BFGS's line search can break down
    loc = (x.median() + x.kthvalue(len(x) // 2 + 1).values) / 2
    return {"loc": loc, "scale": (x - loc).abs().mean().clamp_min(_tiny(x))}


@register_family(
    "cauchy",
    build=D.Cauchy,
    params=("loc", "scale"),
    data_support=constraints.real,
    scipy=lambda p: stats.cauchy(loc=p["loc"], scale=p["scale"]),
)
def _cauchy_start(x: Tensor) -> dict[str, Tensor]:
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device))
    half_range = (q3 - q1) / 2
    return {"loc": x.median(), "scale": torch.where(half_range > 0, half_range, _spread(x))}


@register_family(
    "gumbel",
    build=D.Gumbel,
    params=("loc", "scale"),
    data_support=constraints.real,
    scipy=lambda p: stats.gumbel_r(loc=p["loc"], scale=p["scale"]),
)
def _gumbel_start(x: Tensor) -> dict[str, Tensor]:
    scale = _spread(x) * math.sqrt(6) / math.pi
    return {"loc": x.mean() - EULER_GAMMA * scale, "scale": scale}


# --- continuous families on the positive half-line -----------------------------------------------


@register_family(
    "lognormal",
    build=D.LogNormal,
    params=("loc", "scale"),
    data_support=constraints.positive,
    scipy=lambda p: stats.lognorm(s=p["scale"], scale=math.exp(p["loc"])),
)
def _lognormal_start(x: Tensor) -> dict[str, Tensor]:
    return _normal_start(x.log())


@register_family(
    "gamma",
    build=D.Gamma,
    params=("concentration", "rate"),
    data_support=constraints.positive,
    scipy=lambda p: stats.gamma(a=p["concentration"], scale=1 / p["rate"]),
)
def _gamma_start(x: Tensor) -> dict[str, Tensor]:
    mean, var = x.mean(), _spread(x) ** 2
    return {"concentration": mean**2 / var, "rate": mean / var}


@register_family(
    "exponential",
    build=D.Exponential,
    params=("rate",),
    data_support=constraints.nonnegative,
    scipy=lambda p: stats.expon(scale=1 / p["rate"]),
)
def _exponential_start(x: Tensor) -> dict[str, Tensor]:
    return {"rate": 1 / x.mean()}


@register_family(
    "weibull",
    build=D.Weibull,
    params=("scale", "concentration"),
    data_support=constraints.positive,
    scipy=lambda p: stats.weibull_min(c=p["concentration"], scale=p["scale"]),
)
def _weibull_start(x: Tensor) -> dict[str, Tensor]:
    # log x is Gumbel-min distributed with scale 1/k and mode log(scale)
    logx = x.log()
    concentration = math.pi / (math.sqrt(6) * _spread(logx))
    return {"scale": (logx.mean() + EULER_GAMMA / concentration).exp(), "concentration": concentration}


@register_family(
    "halfnormal",
    build=D.HalfNormal,
    params=("scale",),
    data_support=constraints.nonnegative,
    scipy=lambda p: stats.halfnorm(scale=p["scale"]),
)
def _halfnormal_start(x: Tensor) -> dict[str, Tensor]:
    return {"scale": (x**2).mean().sqrt().clamp_min(_tiny(x))}


@register_family(
    "halfcauchy",
    build=D.HalfCauchy,
    params=("scale",),
    data_support=constraints.nonnegative,
    scipy=lambda p: stats.halfcauchy(scale=p["scale"]),
)
def _halfcauchy_start(x: Tensor) -> dict[str, Tensor]:
    return {"scale": x.median().clamp_min(_tiny(x))}


def _hold_at_data_bounds(**bounds: str) -> PolishRule:
    """A polish rule that moves each named free parameter onto the data's min or max: the MLE of a
    support endpoint sits on the data, where an unconstrained optimiser only approaches it."""

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


@register_family(
    "pareto",
    build=D.Pareto,
    params=("scale", "alpha"),
    data_support=constraints.positive,
    constraint_rules={"scale": lambda b, known: constraints.interval(0.0, b.min)},
    non_regular=("scale",),
    polish=_hold_at_data_bounds(scale="min"),
    scipy=lambda p: stats.pareto(b=p["alpha"], scale=p["scale"]),
)
def _pareto_start(x: Tensor) -> dict[str, Tensor]:
    scale = x.min() * 0.99
    return {"scale": scale, "alpha": len(x) / (x / scale).log().sum()}


class _OpenInterval(constraints.Constraint):
    """(lower, upper) without its endpoints: the beta density is 0 or infinite there."""

    def __init__(self, lower: float, upper: float):
        self.lower, self.upper = lower, upper
        super().__init__()

    def check(self, value: Tensor) -> Tensor:
        return (value > self.lower) & (value < self.upper)

    def __repr__(self) -> str:
        return f"OpenInterval(lower_bound={self.lower}, upper_bound={self.upper})"


_OPEN_UNIT_INTERVAL = _OpenInterval(0.0, 1.0)


@register_family(
    "beta",
    build=D.Beta,
    params=("concentration1", "concentration0"),
    data_support=_OPEN_UNIT_INTERVAL,
    scipy=lambda p: stats.beta(a=p["concentration1"], b=p["concentration0"]),
)
def _beta_start(x: Tensor) -> dict[str, Tensor]:
    mean, var = x.mean(), _spread(x) ** 2
    common = (mean * (1 - mean) / var - 1).clamp_min(1e-3)
    return {"concentration1": mean * common, "concentration0": (1 - mean) * common}


@register_family(
    "uniform",
    build=D.Uniform,
    params=("low", "high"),
    data_support=constraints.real,
    constraint_rules={
        "low": lambda b, known: constraints.less_than(b.min),
        "high": lambda b, known: constraints.greater_than(b.max),
    },
    non_regular=("low", "high"),
    polish=_hold_at_data_bounds(low="min", high="max+"),
    scipy=lambda p: stats.uniform(loc=p["low"], scale=p["high"] - p["low"]),
)
def _uniform_start(x: Tensor) -> dict[str, float]:
    low, high = float(x.min()), float(x.max())
    return {"low": _below(low, high - low), "high": _above(high, high - low)}


# --- discrete families ---------------------------------------------------------------------------


@register_family(
    "poisson",
    build=D.Poisson,
    params=("rate",),
    discrete=True,
    data_support=constraints.nonnegative_integer,
    scipy=lambda p: stats.poisson(mu=p["rate"]),
)
def _poisson_start(x: Tensor) -> dict[str, Tensor]:
    return {"rate": x.mean().clamp_min(1e-12)}


def _binomial(total_count: Tensor, probs: Tensor, validate_args: bool | None = None) -> Distribution:
    return D.Binomial(total_count=total_count, probs=probs, validate_args=validate_args)


_binomial.arg_constraints = {  # type: ignore[attr-defined]
    "total_count": constraints.nonnegative_integer,
    "probs": constraints.unit_interval,
}


@register_family(
    "binomial",
    build=_binomial,
    params=("total_count", "probs"),
    discrete=True,
    required_fixed=("total_count",),
    data_support=constraints.nonnegative_integer,
    # a count above total_count has probability 0: refuse such a total_count, not a NaN fit
    constraint_rules={"total_count": lambda b, known: constraints.integer_interval(b.max, math.inf)},
    scipy=lambda p: stats.binom(n=round(p["total_count"]), p=p["probs"]),
)
def _binomial_start(x: Tensor) -> dict[str, Tensor]:
    # total_count is always fixed by the user; max(x) is only its lower bound
    total_count = x.max()
    return {"total_count": total_count, "probs": (x.mean() / total_count).clamp(1e-3, 1 - 1e-3)}


@register_family(
    "negativebinomial",
    build=D.NegativeBinomial,
    params=("total_count", "probs"),
    discrete=True,
    data_support=constraints.nonnegative_integer,
    scipy=lambda p: stats.nbinom(n=p["total_count"], p=1 - p["probs"]),
)
def _negativebinomial_start(x: Tensor) -> dict[str, Tensor]:
    mean, var = x.mean().clamp_min(1e-6), (_spread(x) ** 2)
    total_count = (mean**2 / (var - mean).clamp_min(1e-3 * mean)).clamp(1e-3, 1e6)
    return {"total_count": total_count, "probs": mean / (mean + total_count)}


@register_family(
    "geometric",
    build=D.Geometric,
    params=("probs",),
    discrete=True,
    data_support=constraints.nonnegative_integer,
    scipy=lambda p: stats.geom(p=p["probs"], loc=-1),
)
def _geometric_start(x: Tensor) -> dict[str, Tensor]:
    return {"probs": 1 / (1 + x.mean())}


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
    data_support=constraints.nonnegative_integer,
    constraint_rules={"logits": lambda b, known: constraints.real_vector},
    param_shapes=lambda x: {"logits": (int(x.max().item()),)},
)
def _categorical_start(x: Tensor) -> dict[str, Tensor]:
    counts = torch.bincount(x.long()).to(x.dtype).clamp_min(0.5)
    return {"logits": (counts[1:] / counts[0]).log()}


# The custom families that ship with nllflow register themselves on import.
import tasks.triangular  # noqa: E402,F401
