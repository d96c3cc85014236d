"""Link functions: how a linear predictor η maps to a parameter, g(θ) = η.

A parameter's default link is the inverse of its constraint's `transform_to` (identity on the real
line, log for positive and non-negative parameters, logit for the unit interval). Another link is
allowed only where its inverse keeps every η inside the parameter's constraint, so no step of the
optimiser can leave the parameter space unguarded: identity for real parameters; log and sqrt (for
non-negative ones) on the half-line; logit, probit and cloglog on the unit interval. `inverse`
(1/η) reaches both signs and is offered for real parameters only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.constraints import Constraint

from nllflow.errors import InputError

SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class Link:
    """g and its inverse; `keeps` the constraints its inverse maps the real line into."""

    name: str
    inverse: Callable[[Tensor], Tensor]
    forward: Callable[[Tensor], Tensor]
    keeps: tuple[str, ...]


def _probit_forward(p: Tensor) -> Tensor:
    return SQRT2 * torch.special.erfinv(2 * p - 1)


LINKS: dict[str, Link] = {
    link.name: link
    for link in (
        Link("identity", lambda eta: eta, lambda theta: theta, ("real",)),
        Link("log", torch.exp, torch.log, ("positive", "nonnegative")),
        Link("sqrt", lambda eta: eta * eta, torch.sqrt, ("nonnegative",)),
        Link("logit", torch.sigmoid, torch.logit, ("unit_interval",)),
        Link("probit", torch.special.ndtr, _probit_forward, ("unit_interval",)),
        Link(
            "cloglog",
            lambda eta: -torch.expm1(-torch.exp(eta)),
            lambda p: torch.log(-torch.log1p(-p)),
            ("unit_interval",),
        ),
        Link("inverse", torch.reciprocal, torch.reciprocal, ("real",)),
    )
}


def constraint_kind(constraint: Constraint) -> str | None:
    """The name of a constraint a link can be matched against (None for others)."""
    if constraint is constraints.real:
        return "real"
    if constraint is constraints.positive or isinstance(constraint, constraints.greater_than) and getattr(
        constraint, "lower_bound", None) == 0.0:  # fmt: skip
        return "positive"
    if constraint is constraints.nonnegative or isinstance(constraint, constraints.greater_than_eq):
        return "nonnegative"
    if constraint is constraints.unit_interval or (
        isinstance(constraint, constraints.interval) and (constraint.lower_bound, constraint.upper_bound) == (0.0, 1.0)
    ) or type(constraint).__name__ == "OpenInterval":  # fmt: skip
        return "unit_interval"
    return None


DEFAULT_LINKS = {"real": "identity", "positive": "log", "nonnegative": "log", "unit_interval": "logit"}


def valid_links(constraint: Constraint) -> list[str]:
    kind = constraint_kind(constraint)
    return [name for name, link in LINKS.items() if kind in link.keeps]


def resolve_link(parameter: str, constraint: Constraint, name: str | None) -> Link:
    """The link of `parameter` (its default when `name` is None); a link that could take the
    parameter outside `constraint` is refused, naming the valid ones."""
    kind = constraint_kind(constraint)
    if kind is None:
        raise InputError(f"{parameter} (constraint {constraint}) cannot have a linear predictor")
    if name is None:
        return LINKS[DEFAULT_LINKS[kind]]
    if name not in LINKS:
        raise InputError(f"unknown link {name!r} for {parameter}; valid: {', '.join(valid_links(constraint))}")
    if kind not in LINKS[name].keeps:
        raise InputError(
            f"link {name!r} could take {parameter} outside {constraint}; valid for {parameter}: "
            f"{', '.join(valid_links(constraint))}"
        )
    return LINKS[name]
