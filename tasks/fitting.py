"""Maximum-likelihood fitting with autograd: what "a fit" is.

The recipe of torch.distributions' constraint registry: each free parameter is a tensor `u` in
unconstrained space, mapped to its natural value with `transform_to(constraint)(u)`; start values go
the other way with `.inv`. The objective is the mean negative log-likelihood (so a learning rate
means the same at every sample size); the trace records, per step, the total NLL, every natural
parameter and the partial derivative of the mean NLL with respect to it (∂NLL/∂μ, ∂NLL/∂σ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.distributions import constraints, transform_to
from torch.distributions.constraints import Constraint
from torch.distributions.transforms import AffineTransform, ComposeTransform, Transform

from tasks.censoring import CensoredRows
from tasks.errors import InputError
from tasks.families import DataBounds, Family
from tasks.fast_likelihood import fast_log_likelihood

Optimizer = Literal["lbfgs", "adam", "sgd"]
OPTIMIZERS: tuple[str, ...] = ("lbfgs", "adam", "sgd")
DEFAULT_LR: Mapping[str, float] = {"lbfgs": 1.0, "adam": 0.05, "sgd": 0.1}
MAX_POLISH_ROUNDS = 10
ParamValue = float | list[float]


@dataclass(frozen=True)
class Tolerances:
    """When a fit has converged. `gtol`: largest |∂ mean NLL / ∂u| over the unconstrained
    parameters; `ftol`: relative change of the mean NLL over one step (0 turns it off)."""

    gtol: float
    ftol: float

    @staticmethod
    def for_settings(dtype: torch.dtype, optimizer: str, gtol: float | None, ftol: float | None) -> Tolerances:
        """float64: gtol 1e-8, ftol 1e-12; float32: 1e-4, 1e-7. The relative-change test is off by
        default for Adam and SGD: a small learning rate makes small changes long before the optimum."""
        default = Tolerances(1e-8, 1e-12) if dtype == torch.float64 else Tolerances(1e-4, 1e-7)
        if optimizer != "lbfgs":
            default = Tolerances(default.gtol, 0.0)
        return Tolerances(gtol if gtol is not None else default.gtol, ftol if ftol is not None else default.ftol)


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an InputError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but CUDA is not available here; valid: auto, cpu")
        return torch.device(device)
    raise InputError(f"unknown device {device!r}; valid: auto, cpu, cuda")


def resolve_dtype(dtype: str) -> torch.dtype:
    choices = {"float64": torch.float64, "float32": torch.float32}
    if dtype not in choices:
        raise InputError(f"unknown dtype {dtype!r}; valid: {', '.join(choices)}")
    return choices[dtype]


@dataclass(frozen=True)
class Observations:
    """Exact observations with optional frequency weights, and optional censored rows (known only
    to lie in an interval), on the fitting device and dtype. The last dimension is the observation:
    values or weights with a leading batch dimension (the bootstrap's resamples) give one
    log-likelihood per batch entry."""

    values: Tensor
    weights: Tensor | None = None
    censored: CensoredRows | None = None
    # statistics of the exact values for fast likelihoods (tasks.fast_likelihood): once per data set
    _statistics: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def total_weight(self) -> float:
        if "total_weight" not in self._statistics:
            exact = float(self.values.numel() if self.weights is None else self.weights.sum())
            self._statistics["total_weight"] = exact + (0.0 if self.censored is None else float(self.censored.total_weight))
        return self._statistics["total_weight"]

    def log_likelihood(self, family: Family, params: Mapping[str, Tensor]) -> Tensor:
        """Total (weighted) log-likelihood of `family` at the natural `params`, summed over the last
        dimension (a 0-d tensor for one data set). The exact part goes through the family's fast
        rule where it has one (sufficient statistics or a fused pass)."""
        total = fast_log_likelihood(family, self.values, self.weights, params, self._statistics)
        dist = None
        if total is None:
            dist = family.build(**params, validate_args=False)
            log_density = dist.log_prob(self.values)
            if self.weights is not None:
                log_density = self.weights * log_density
            total = log_density.sum(-1)
        if self.censored is not None:
            if dist is None:
                dist = family.build(**params, validate_args=False)
            total = total + self.censored.log_likelihood(dist)
        return total

    def pseudo(self) -> Observations:
        """Exact observations standing in for these (a censored row by its midpoint or finite
        bound): what start-value, shape and polish rules see."""
        if self.censored is None:
            return self
        values = torch.cat([self.values, self.censored.pseudo_values()])
        weights = None
        if self.weights is not None or self.censored.weights is not None:
            exact = self.weights if self.weights is not None else torch.ones_like(self.values)
            other = self.censored.weights if self.censored.weights is not None else torch.ones_like(self.censored.low)
            weights = torch.cat([exact, other])
        return Observations(values, weights)

    def bounds(self) -> DataBounds:
        """The range a support with data-dependent ends must cover: the exact values, the finite
        upper bounds of censored rows (a support must start below them) and their finite lower
        bounds (it must end above them)."""
        if self.censored is None:
            return DataBounds(min=float(self.values.min()), max=float(self.values.max()))
        highs, lows = self.censored.finite_bounds()
        below, above = torch.cat([self.values, highs]), torch.cat([self.values, lows])
        fallback = self.pseudo().values
        return DataBounds(
            min=float((below if below.numel() else fallback).min()), max=float((above if above.numel() else fallback).max())
        )


def flat_labels(name: str, shape: tuple[int, ...]) -> list[str]:
    """Names of a parameter's scalar components: `scale`, or `logits_1`, `logits_2`... for vectors
    (numbered from 1: category 0 is the reference)."""
    if shape == ():
        return [name]
    return [f"{name}_{i + 1}" for i in range(math.prod(shape))]


def unflatten(family: Family, labelled: Mapping[str, float]) -> dict[str, Tensor]:
    """Float64 parameter tensors from scalar components by label: the inverse of `flat_labels`."""
    params = {}
    for name in family.params:
        if name in labelled:
            params[name] = torch.tensor(float(labelled[name]), dtype=torch.float64)
            continue
        numbered = {int(label.rsplit("_", 1)[1]): value for label, value in labelled.items()
                    if label.startswith(f"{name}_") and label.rsplit("_", 1)[1].isdigit()}
        params[name] = torch.tensor([numbered[i] for i in sorted(numbered)], dtype=torch.float64)
    return params


class ParameterSpace:
    """The family's parameters for one data set: which are fixed, their constraints (which may
    depend on the data and on each other), start values, and the map u -> natural values."""

    def __init__(
        self,
        family: Family,
        observations: Observations,
        fixed: Mapping[str, ParamValue] | None = None,
        init: Mapping[str, ParamValue] | None = None,
        held: Mapping[str, Tensor] | None = None,
    ):
        self.family = family
        self.bounds = observations.bounds()
        values = observations.pseudo().values
        self.dtype, self.device = values.dtype, values.device
        self.shapes = family.shapes(values)
        self.spread = _robust_spread(values)
        fixed, init = dict(fixed or {}), dict(init or {})
        for kind, given in (("fixed", fixed), ("initial", init)):
            unknown = sorted(set(given) - set(family.params))
            if unknown:
                raise InputError(
                    f"unknown parameter {unknown[0]!r} in the {kind} values for {family.name}; "
                    f"valid: {', '.join(family.params)}"
                )
        for name in family.required_fixed:
            if name not in fixed:
                raise InputError(f"{family.name} needs a fixed {name}: give --fix {name}=VALUE")
        self.fixed = {name: self._tensor(name, value, "fixed") for name, value in fixed.items()}
        self.held = dict(held or {})
        self.free = tuple(name for name in family.params if name not in self.fixed)
        self.optimised = tuple(name for name in self.free if name not in self.held)
        self.start = self._resolve_start(values, {name: self._tensor(name, v, "initial") for name, v in init.items()})

    def _tensor(self, name: str, value: ParamValue | Tensor, kind: str) -> Tensor:
        try:
            tensor = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{kind} value of {name} must be a number, got {value!r}") from None
        shape = self.shapes[name]
        if tensor.shape != shape:
            if tensor.numel() != math.prod(shape):
                raise InputError(
                    f"{kind} value of {name} for {self.family.name} must have {math.prod(shape)} component(s), "
                    f"got {tensor.numel()}"
                )
            tensor = tensor.reshape(shape)
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{kind} value of {name} must be finite, got {value!r}")
        return tensor

    def constraint(self, name: str, known: Mapping[str, Tensor]) -> Constraint:
        return self.family.constraint(name, self.bounds, known)

    def tensors(self, values: Mapping[str, ParamValue | Tensor]) -> dict[str, Tensor]:
        """Parameter values on this space's dtype and device, in their parameters' shapes."""
        return {
            name: torch.as_tensor(value, dtype=self.dtype, device=self.device).reshape(self.shapes[name])
            for name, value in values.items()
        }

    def _resolve_start(self, values: Tensor, init: Mapping[str, Tensor]) -> dict[str, Tensor]:
        heuristic = self.family.start(values)
        known: dict[str, Tensor] = {**self.fixed, **self.held}
        start: dict[str, Tensor] = {}
        for name in self.family.order:
            constraint = self.constraint(name, known)
            if name in self.held:
                continue
            if name in self.fixed or name in init:
                value = self.fixed[name] if name in self.fixed else init[name]
                if not bool(constraint.check(value).all()):
                    kind = "fixed" if name in self.fixed else "initial"
                    raise InputError(
                        f"{kind} value {name}={_show(value)} is outside the parameter space of {self.family.name}: "
                        f"it must satisfy {constraint} (data range [{self.bounds.min:g}, {self.bounds.max:g}])"
                    )
            else:
                value = torch.as_tensor(heuristic[name], dtype=self.dtype, device=self.device).reshape(self.shapes[name])
                if not (bool(torch.isfinite(value).all()) and bool(constraint.check(value).all())):
                    value = self.transform(constraint)(torch.zeros(self.shapes[name], dtype=self.dtype, device=self.device))
            known[name] = value
            if name not in self.fixed:
                start[name] = value
        return start

    def transform(self, constraint: Constraint) -> Transform:
        """`transform_to(constraint)`, with a real-valued parameter (a location) counted in units of
        the data's spread: its gradient then does not shrink with the data's scale, so `gtol` and
        Adam's step size mean the same for data in metres or in micrometres."""
        if constraint is constraints.real:
            return ComposeTransform([AffineTransform(0.0, self.spread), transform_to(constraint)])
        return transform_to(constraint)

    def natural(self, unconstrained: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Natural values of every parameter (fixed, held and optimised) from the unconstrained ones."""
        known: dict[str, Tensor] = {**self.fixed, **self.held}
        for name in self.family.order:
            if name in unconstrained:
                known[name] = self.transform(self.constraint(name, known))(unconstrained[name])
        return {name: known[name] for name in self.family.params}

    def unconstrained(self, natural: Mapping[str, Tensor]) -> dict[str, Tensor]:
        known: dict[str, Tensor] = {**self.fixed, **self.held}
        result = {}
        for name in self.family.order:
            if name in self.optimised:
                result[name] = self.transform(self.constraint(name, known)).inv(natural[name])
                known[name] = natural[name]
        return result

    def first_infeasible(self, natural: Mapping[str, Tensor]) -> str | None:
        """The first optimised parameter whose value breaks its constraint (or is not finite)."""
        known: dict[str, Tensor] = {**self.fixed, **self.held}
        for name in self.family.order:
            if name in self.optimised:
                value = natural[name]
                if not (bool(torch.isfinite(value).all()) and bool(self.constraint(name, known).check(value).all())):
                    return name
                known[name] = value
        return None

    def labels(self, names: Sequence[str]) -> list[str]:
        return [label for name in names for label in flat_labels(name, self.shapes[name])]


@dataclass(frozen=True)
class FitSettings:
    """How to optimise: the optimiser, its learning rate (None: the optimiser's default), the step
    budget and the convergence tolerances (None: the dtype's defaults)."""

    optimizer: Optimizer = "lbfgs"
    lr: float | None = None
    max_steps: int = 500
    gtol: float | None = None
    ftol: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"learning rate must be a positive number, got {self.lr!r}")
        if self.max_steps < 1:
            raise InputError(f"max steps must be at least 1, got {self.max_steps}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


@dataclass
class FitResult:
    """The outcome of one fit. `params` holds every scalar component by label (fixed ones too);
    `trace` has one row per step: step, lr, nll (total), mean_nll, grad_norm, each free parameter
    and `grad_<label>`, the partial derivative of the mean NLL with respect to it."""

    family: str
    params: dict[str, float]
    fixed: dict[str, float]
    free: tuple[str, ...]
    free_params: tuple[str, ...]
    natural: dict[str, Tensor]
    converged: bool
    reason: str
    steps: int
    nll: float
    mean_nll: float
    grad_norm: float
    trace: pd.DataFrame
    optimizer: str
    lr: float

    @property
    def diverged(self) -> bool:
        return self.reason.startswith("diverged")


@dataclass
class _Evaluation:
    mean_nll: Tensor
    natural: dict[str, Tensor]
    grad_natural: dict[str, Tensor]
    grad_unconstrained: dict[str, Tensor]

    def row(self, space: ParameterSpace, total_weight: float) -> Tensor:
        free = space.free
        values = [self.natural[n].detach().reshape(-1) for n in free]
        grads = [self.grad_natural[n].reshape(-1) for n in free]
        grad_norm = torch.cat(grads).norm() if grads else self.mean_nll.new_zeros(())
        head = torch.stack([self.mean_nll.detach() * total_weight, self.mean_nll.detach(), grad_norm])
        return torch.cat([head, *values, *grads])

    def max_unconstrained_grad(self) -> float:
        if not self.grad_unconstrained:
            return 0.0
        return float(torch.cat([g.reshape(-1) for g in self.grad_unconstrained.values()]).abs().max())


def _evaluate(space: ParameterSpace, observations: Observations, unconstrained: Mapping[str, Tensor]) -> _Evaluation:
    """Mean NLL at `unconstrained`, its partial derivatives with respect to the natural parameters,
    and (by the chain rule through the transforms) with respect to the unconstrained ones. With a
    leading batch dimension on the parameters (tasks.batched) the rows are independent fits: the
    gradient of their sum holds each row's own."""
    with torch.enable_grad():
        natural = space.natural(unconstrained)
        leaves = {n: natural[n].detach().requires_grad_(True) for n in space.free}
        params = {n: leaves.get(n, natural[n]) for n in space.family.params}
        mean_nll = -observations.log_likelihood(space.family, params) / observations.total_weight
        grads = torch.autograd.grad(mean_nll.sum(), [leaves[n] for n in space.free]) if space.free else ()
        grad_natural = dict(zip(space.free, grads))
        grad_unconstrained = {}
        if space.optimised and bool(torch.isfinite(mean_nll).any()):
            outputs = [natural[n] for n in space.optimised]
            chained = torch.autograd.grad(
                outputs, [unconstrained[n] for n in space.optimised], [grad_natural[n] for n in space.optimised]
            )
            grad_unconstrained = dict(zip(space.optimised, chained))
    # clone: under an identity transform (a real parameter) the natural value is the optimiser's own
    # tensor, which the next step changes in place
    natural = {n: v.detach().clone() for n, v in natural.items()}
    return _Evaluation(mean_nll.detach(), natural, grad_natural, grad_unconstrained)


@dataclass
class _Run:
    natural: dict[str, Tensor]
    rows: list[Tensor]
    mean_nll: float
    converged: bool
    reason: str


def _optimise(
    space: ParameterSpace,
    observations: Observations,
    settings: FitSettings,
    tolerances: Tolerances,
    progress: Callable[[int, float], None] | None,
    first_step: int,
) -> _Run:
    lr = settings.learning_rate
    start = {n: v.clone() for n, v in space.start.items()}
    u = {n: t.detach().clone().requires_grad_(True) for n, t in space.unconstrained({**start}).items()}
    params = [u[n] for n in space.optimised]
    optimizer: torch.optim.Optimizer | None = None
    if settings.optimizer == "adam" and params:
        optimizer = torch.optim.Adam(params, lr=lr)
    elif settings.optimizer == "lbfgs" and params:
        optimizer = torch.optim.LBFGS(
            params, lr=lr, max_iter=1, max_eval=25, tolerance_grad=0.0, tolerance_change=0.0,
            history_size=20, line_search_fn="strong_wolfe",
        )
    rows: list[Tensor] = []
    good: _Evaluation | None = None
    previous: float | None = None
    converged, reason = False, "max steps reached"
    # the L-BFGS line search has evaluated the point it accepts: reuse that evaluation
    seen: list[tuple[list[Tensor], _Evaluation]] = []
    for step in range(settings.max_steps + 1):
        try:
            current = _seen_at(seen, [u[n] for n in space.optimised]) or _evaluate(space, observations, u)
        except ValueError as error:
            reason = _refused(space, error, first_step + step)
            break
        mean_nll = float(current.mean_nll)
        finite = math.isfinite(mean_nll) and all(bool(torch.isfinite(v).all()) for v in current.natural.values())
        # a pmf is at most 1: a negative NLL of a discrete family is log_prob's rounding (a negative
        # binomial's total_count run off to 1e15), not a better fit
        if not finite or (space.family.discrete and mean_nll < 0):
            reason = f"diverged: NLL became {mean_nll * observations.total_weight} at step {first_step + step}"
            if finite:
                reason += " (below 0, impossible for a discrete family: its log_prob lost precision)"
            break
        good = current
        rows.append(current.row(space, observations.total_weight))
        if progress is not None:
            progress(first_step + step, mean_nll)
        if not space.optimised:
            converged, reason = True, "all parameters fixed or held"
            break
        if current.max_unconstrained_grad() <= tolerances.gtol:
            converged, reason = True, f"gradient below gtol={tolerances.gtol:g}"
            break
        if previous is not None and abs(previous - mean_nll) <= tolerances.ftol * max(abs(mean_nll), 1.0) and tolerances.ftol > 0:
            converged, reason = True, f"relative change below ftol={tolerances.ftol:g}"
            break
        if step == settings.max_steps:
            break
        previous = mean_nll
        if settings.optimizer == "sgd":
            moved, outside = _sgd_step(space, current, lr)
            if outside in space.family.constraint_rules:
                # a bound set by the data, not a blow-up: the NLL is finite, and a polish rule can
                # still hold the parameter on the bound
                reason = f"stopped: the SGD step at step {first_step + step} would take {outside} past a data bound"
                break
            if outside is not None:
                value = _show(moved[outside])
                reason = f"diverged: the SGD step at step {first_step + step} took {outside} to {value}, outside its constraint"
                break
            with torch.no_grad():
                for n, value in space.unconstrained(moved).items():
                    u[n].copy_(value)
        else:
            try:
                seen = _step(optimizer, space, observations, u, current)
            except ValueError as error:
                reason = _refused(space, error, first_step + step)
                break
    if good is None:
        start = ", ".join(f"{name}={_show(value)}" for name, value in space.start.items())
        raise InputError(
            f"the NLL of {space.family.name} is not finite at the start values ({start}; data range "
            f"[{space.bounds.min:g}, {space.bounds.max:g}]): check --init and --fix, or rescale data this large or small"
        )
    return _Run(good.natural, rows, float(good.mean_nll), converged, reason)


def _refused(space: ParameterSpace, error: ValueError, step: int) -> str:
    """Some torch families check an inner distribution whatever validate_args says (StudentT's
    Chi2(df)), so non-finite trial parameters raise instead of giving a NaN NLL: a divergence too."""
    return f"diverged: {space.family.name} refused the parameters tried at step {step}: {str(error).splitlines()[0]}"


def _sgd_step(space: ParameterSpace, current: _Evaluation, lr: float) -> tuple[dict[str, Tensor], str | None]:
    """The seed's rule θ ← θ − lr·∂NLL/∂θ on the natural parameters, and the name of a parameter
    the step took outside its constraint (σ ≤ 0, a bound inside the data), if any: with this rule,
    that is how a too-large learning rate diverges."""
    moved = {**current.natural}
    for n in space.optimised:
        moved[n] = current.natural[n] - lr * current.grad_natural[n]
    return moved, space.first_infeasible(moved)


def _step(
    optimizer: torch.optim.Optimizer,
    space: ParameterSpace,
    observations: Observations,
    u: Mapping[str, Tensor],
    current: _Evaluation,
) -> list[tuple[list[Tensor], _Evaluation]]:
    """One Adam or L-BFGS step on the unconstrained parameters, reusing the evaluation just done
    at the current point (L-BFGS asks for it again first). Returns the points the step evaluated
    (as copies of the optimised parameters) with their evaluations."""
    cached = [current]
    seen: list[tuple[list[Tensor], _Evaluation]] = []

    def closure() -> Tensor:
        evaluation = cached.pop() if cached else _evaluate(space, observations, u)
        if space.optimised and not evaluation.grad_unconstrained:  # a non-finite NLL: torch's own gradient
            optimizer.zero_grad()
            with torch.enable_grad():
                natural = space.natural(u)
                mean_nll = -observations.log_likelihood(space.family, natural) / observations.total_weight
                mean_nll.backward()
            return mean_nll.detach()
        for n in space.optimised:
            u[n].grad = evaluation.grad_unconstrained[n].clone()
        seen.append(([u[n].detach().clone() for n in space.optimised], evaluation))
        return evaluation.mean_nll

    optimizer.step(closure)
    return seen


def _seen_at(seen: list[tuple[list[Tensor], _Evaluation]], point: list[Tensor]) -> _Evaluation | None:
    return next((evaluation for at, evaluation in seen if all(torch.equal(a, p) for a, p in zip(at, point))), None)


def fit_mle(
    family: Family,
    observations: Observations,
    *,
    fixed: Mapping[str, ParamValue] | None = None,
    init: Mapping[str, ParamValue] | None = None,
    settings: FitSettings = FitSettings(),
    progress: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Fit `family` to `observations` by maximum likelihood.

    Families with a `polish` rule (a support endpoint or a kink at the data) then alternate: the rule
    proposes values to hold (a bound on the data, the peak on the best data point) and the other
    parameters are re-optimised, for as long as the NLL improves. Families with a multimodal
    likelihood (the triangular's) list `extra_starts`; without user start values, the best of all
    starts wins, and the trace is that start's path.
    """
    tolerances = Tolerances.for_settings(observations.values.dtype, settings.optimizer, settings.gtol, settings.ftol)
    space = ParameterSpace(family, observations, fixed, init)
    starts = [dict(init or {})]
    if family.extra_starts is not None and not init:
        extra = [{n: v for n, v in start.items() if n in space.free} for start in family.extra_starts(observations.pseudo().values)]
        # a heuristic start can break a constraint that a fixed value sets (a triangular peak fixed
        # below the data): it is skipped, not reported as the user's initial value
        starts += [start for start in extra if space.first_infeasible({**space.start, **space.tensors(start)}) is None]
    best: _Run | None = None
    for i, start in enumerate(starts):
        # the first start is the user's, whose space is built already (its start rule costs passes over the data)
        start_space = space if i == 0 else ParameterSpace(family, observations, fixed, start)
        run = _polished(start_space, observations, settings, tolerances, progress)
        if best is None or (not run.reason.startswith("diverged") and run.mean_nll < best.mean_nll):
            best = run
    return _result(space, observations, settings, best)


def _polished(
    space: ParameterSpace,
    observations: Observations,
    settings: FitSettings,
    tolerances: Tolerances,
    progress: Callable[[int, float], None] | None,
) -> _Run:
    run = _optimise(space, observations, settings, tolerances, progress, 0)
    family = space.family
    if family.polish is None or run.reason.startswith("diverged"):
        return run
    for _ in range(MAX_POLISH_ROUNDS):
        stand_in = observations.pseudo()
        candidates = family.polish(stand_in.values, run.natural, frozenset(space.free), stand_in.weights)
        improved = None
        for held in candidates:
            start = {n: run.natural[n] for n in space.free if n not in held}
            polished_space = ParameterSpace(family, observations, space.fixed, start, held=held)
            at_start = {**polished_space.fixed, **held, **polished_space.start}
            if not math.isfinite(float(observations.log_likelihood(family, at_start))):
                continue  # censored rows reach past this bound of the exact values: no candidate
            polished = _optimise(polished_space, observations, settings, tolerances, progress, len(run.rows))
            if polished.mean_nll < (improved or run).mean_nll:
                improved = polished
        if improved is None:
            break
        improved.rows = run.rows + improved.rows
        run = improved
    return run


def _result(space: ParameterSpace, observations: Observations, settings: FitSettings, run: _Run) -> FitResult:
    free_labels = space.labels(space.free)
    columns = ["nll", "mean_nll", "grad_norm", *free_labels, *[f"grad_{label}" for label in free_labels]]
    table = torch.stack(run.rows).cpu().numpy() if run.rows else np.empty((0, len(columns)))
    trace = pd.DataFrame(table, columns=columns)
    trace.insert(0, "lr", settings.learning_rate)
    trace.insert(0, "step", np.arange(len(trace)))
    params = {}
    for name in space.family.params:
        params.update(zip(space.labels([name]), run.natural[name].reshape(-1).cpu().tolist()))
    fixed = {label: params[label] for label in space.labels(list(space.fixed))}
    last = trace.iloc[-1]
    return FitResult(
        family=space.family.name,
        params=params,
        fixed=fixed,
        free=tuple(free_labels),
        free_params=space.free,
        natural=run.natural,
        converged=run.converged,
        reason=run.reason,
        steps=len(trace) - 1,
        nll=float(last["nll"]),
        mean_nll=float(last["mean_nll"]),
        grad_norm=float(last["grad_norm"]),
        trace=trace,
        optimizer=settings.optimizer,
        lr=settings.learning_rate,
    )


def _show(value: Tensor) -> str:
    return f"{value.item():g}" if value.numel() == 1 else str([round(v, 6) for v in value.flatten().tolist()])


SPREAD_SAMPLE = 100_000


def _robust_spread(values: Tensor) -> float:
    """1.4826 × the median absolute deviation of (a strided subsample of) the data, falling back to
    the range and then to 1 for data that is mostly ties."""
    sample = values[:: max(1, values.numel() // SPREAD_SAMPLE)].double()
    for spread in ((sample - sample.median()).abs().median() * 1.4826, sample.max() - sample.min()):
        if math.isfinite(float(spread)) and float(spread) > 0:
            return float(spread)
    return 1.0
