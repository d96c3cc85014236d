"""Parametric families: one declaration per family says everything the fitter needs to know.

A family is declared once, with the decorator `register_family` on its start-value rule:

    @register_family("normal", build=D.Normal, params=("loc", "scale"), support=constraints.real,
                     likelihood=normal_total, tails=normal_tails,
                     scipy=lambda p: stats.norm(p["loc"], p["scale"]))
    def _normal_start(data):
        m = data.moments("x")
        return {"loc": m.mean, "scale": m.std}

Parameter names are torch's own. The constraint of a parameter is the distribution's
`arg_constraints[name]` unless the declaration gives `constraints` or a rule; rules receive the
data bounds and the parameters already resolved, so a support that moves with the parameters
(uniform, pareto, triangular) keeps every data point inside it. Optional parts of a declaration:
a fast total log-likelihood of exact data (`likelihood`: sufficient statistics or a fused pass),
the log-CDF and log-survival function (`tails`: censored data, goodness of fit), a `polish` rule
and `extra_starts` for non-smooth or multimodal likelihoods, and mean parametrisations for
regression (`parametrisations`). The built-in families are declared in `continuous`, `discrete`
and `triangular` (the worked example of a custom family: one file).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import Tensor
from torch.distributions import Distribution
from torch.distributions.constraints import Constraint

from nllflow.errors import InputError

if TYPE_CHECKING:
    from nllflow.likelihood.statistics import ExactData


@dataclass(frozen=True)
class DataBounds:
    """The data's range: what data-dependent constraints need."""

    min: float
    max: float


ConstraintRule = Callable[[DataBounds, Mapping[str, Tensor]], Constraint]
# the exact data (values, weights and their cached statistics) -> start values by parameter name
StartRule = Callable[["ExactData"], Mapping[str, float | Tensor]]
ShapeRule = Callable[[Tensor], Mapping[str, tuple[int, ...]]]
# (data, current natural params, free names, weights) -> candidate values to hold in a refit each
PolishRule = Callable[[Tensor, Mapping[str, Tensor], frozenset[str], Tensor | None], list[dict[str, Tensor]]]
# (exact data, family, natural params) -> total log-likelihood over the last dimension, kept as (..., 1)
LikelihoodRule = Callable[["ExactData", "Family", Mapping[str, Tensor]], Tensor]
# (distribution, x) -> (log F(x), log S(x))
TailRule = Callable[[Distribution, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Parametrisation:
    """Another set of names for a family's parameters, as GLM and GAMLSS users write them (a gamma
    by its mean and dispersion). `to_natural` maps these parameters to the family's own and
    `from_natural` back; their constraints give the default links."""

    params: tuple[str, ...]
    constraints: Mapping[str, Constraint]
    to_natural: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    from_natural: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    variance: str = ""
    description: str = ""


@dataclass(frozen=True)
class Family:
    """How to fit one parametric family by maximum likelihood (see the module's docstring)."""

    name: str
    build: Callable[..., Distribution]
    params: tuple[str, ...]
    start: StartRule
    support: Constraint
    discrete: bool = False
    # the parameters' constraints where the distribution's arg_constraints do not say (or not right)
    constraints: Mapping[str, Constraint] = field(default_factory=dict)
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
    likelihood: LikelihoodRule | None = None
    # the transforms (x, log, log1m, lgamma1p) whose moments the start rule and the likelihood
    # read: computed with the data's range in one pass over the data
    statistics: tuple[str, ...] = ()
    tails: TailRule | None = None
    parametrisations: Mapping[str, Parametrisation] = field(default_factory=dict)

    def constraint(self, name: str, bounds: DataBounds, known: Mapping[str, Tensor]) -> Constraint:
        rule = self.constraint_rules.get(name)
        if rule is not None:
            return rule(bounds, known)
        return self.base_constraint(name)

    def base_constraint(self, name: str) -> Constraint:
        """The constraint of `name` as declared, without the data's bounds."""
        if name in self.constraints:
            return self.constraints[name]
        return self.build.arg_constraints[name]  # type: ignore[attr-defined]

    def shapes(self, x: Tensor) -> dict[str, tuple[int, ...]]:
        shapes = {name: () for name in self.params}
        if self.param_shapes is not None:
            shapes.update(self.param_shapes(x))
        return shapes

    @property
    def order(self) -> tuple[str, ...]:
        return self.resolve_order or self.params

    @property
    def has_tails(self) -> bool:
        return self.tails is not None or self.build.cdf is not Distribution.cdf  # type: ignore[attr-defined]

    def log_tails(self, dist: Distribution, x: Tensor) -> tuple[Tensor, Tensor]:
        """(log F(x), log S(x)) of `dist`, broadcast over its batch shape and `x`: the family's own
        rule, else log(cdf) and log1p(-cdf), which are exact away from the far tails only."""
        if self.tails is not None:
            return self.tails(dist, x)
        if not self.has_tails:
            raise InputError(f"{self.name} has no cdf, so it cannot describe censored observations")
        cdf = dist.cdf(x)
        return cdf.log(), torch.log1p(-cdf)


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
    separated by commas); each registers its families on import. An opt-in of the process's own
    environment: no flow parameter or spec can name a plugin."""
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


class _LazyModule(types.ModuleType):
    """A module imported on first attribute access: scipy.stats costs most of a second to import,
    and a fit needs it only for goodness-of-fit plots, a chi-square p-value and the tests' oracles."""

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attribute)


# the families' `scipy=` rules and the evaluation read scipy.stats through this
scipy_stats = _LazyModule("scipy.stats")


# --- helpers for start rules ---------------------------------------------------------------------


def tiny(x: Tensor) -> Tensor:
    """A floor for a scale's start value (ties can make a spread 0), relative to the data: an
    absolute floor is a start many orders of magnitude off for data of size 1e-30, from which the
    optimiser may never get back."""
    return 1e-12 * x.abs().max()


def median_abs_dev(x: Tensor, spread: Tensor) -> Tensor:
    """1.4826 × the median absolute deviation (of an evenly strided subsample past 1e5 points),
    or `spread` where more than half the points are tied (censored rows at one limit)."""
    sample = x[:: max(1, x.numel() // 100_000)]
    mad = (sample - x.median()).abs().median() * 1.4826
    return torch.where(mad > 0, mad, spread)


def below(bound: float, span: float) -> float:
    return bound - 0.01 * span


def above(bound: float, span: float) -> float:
    return bound + 0.01 * span


# The families that ship with nllflow register themselves on import.
from nllflow.families import continuous, discrete, triangular  # noqa: E402,F401
