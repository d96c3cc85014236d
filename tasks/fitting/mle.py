"""Maximum-likelihood fitting with autograd: what "a fit" is.

`fit_mle` fits a family to observations through the one loop of `engine`: the objective is the
mean negative log-likelihood (so a learning rate means the same at every sample size); the trace
records, per step, the total NLL, every free parameter and the partial derivative of the mean NLL
with respect to it (∂NLL/∂μ, ∂NLL/∂σ). Families with a support endpoint or a kink at the data are
polished (a bound held on the data, the other parameters refitted) and multimodal ones start from
several points.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from nllflow.errors import InputError
from nllflow.families import Family
from nllflow.fitting.engine import (
    Outcome,
    RowRun,
    RowSettings,
    StepRule,
    Tolerances,
    TorchStep,
    minimise,
    warn_unless_converged,
)
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import ConstantModel, ConstantProblem, NaturalSGD, ParamValue, show

Optimizer = Literal["lbfgs", "adam", "sgd", "newton"]
OPTIMIZERS: tuple[str, ...] = ("lbfgs", "adam", "sgd", "newton")
# newton's 1.0 is its full step: it has no learning rate of its own
DEFAULT_LR: Mapping[str, float] = {"lbfgs": 1.0, "adam": 0.05, "sgd": 0.1, "newton": 1.0}
MAX_POLISH_ROUNDS = 10


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
        if self.optimizer == "newton" and self.lr is not None:
            raise InputError(
                "newton takes full Newton steps, damped where they would not lower the NLL: give no "
                "learning rate (learning rates are for lbfgs, adam and sgd)"
            )
        if self.max_steps < 1:
            raise InputError(f"max steps must be at least 1, got {self.max_steps}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def tolerances(self, dtype: torch.dtype) -> Tolerances:
        return Tolerances.for_settings(dtype, self.optimizer, self.gtol, self.ftol)


@dataclass(frozen=True)
class TraceTable:
    """A run's trace as the loop recorded it: one row of `columns` per step, at learning rate `lr`.
    `FitResult.trace` makes its DataFrame when first read: building a frame costs about as much
    as a whole closed-form fit at 1e6 points."""

    columns: tuple[str, ...]
    values: np.ndarray
    lr: float

    @classmethod
    def of(cls, run: RowRun, columns: Sequence[str], lr: float) -> TraceTable:
        values = torch.stack(run.trace).double().cpu().numpy() if run.trace else np.empty((0, len(columns)))
        return cls(tuple(columns), values, float(lr))

    def last(self, column: str) -> float:
        return float(self.values[-1, self.columns.index(column)])

    def frame(self) -> pd.DataFrame:
        """step, lr, then the columns (one construction from columns: DataFrame.insert costs a
        millisecond each)."""
        steps = len(self.values)
        return pd.DataFrame(
            {
                "step": np.arange(steps),
                "lr": np.full(steps, self.lr),
                **dict(zip(self.columns, self.values.T, strict=True)),
            }
        )


@dataclass
class FitResult:
    """The outcome of one fit. `params` holds every scalar component by label (fixed ones too);
    `trace` has one row per step: step, lr, nll (total), mean_nll, grad_norm, each free parameter
    and `grad_<label>`, the partial derivative of the mean NLL with respect to it; `step_times` the
    seconds since the start at which each step was evaluated."""

    family: str
    params: dict[str, float]
    fixed: dict[str, float]
    free: tuple[str, ...]
    free_params: tuple[str, ...]
    natural: dict[str, Tensor]
    outcome: Outcome
    reason: str
    steps: int
    nll: float
    mean_nll: float
    grad_norm: float
    trace_table: TraceTable = field(repr=False)
    optimizer: str
    lr: float
    step_times: list[float] = field(default_factory=list, repr=False)
    # when the fit started (seconds since the epoch): the time base of the step times
    started_at: float = field(default_factory=time.time)
    # a regression or a network: {parameter: {term: coefficient}} on the original scale, the fitted
    # parameter model (LinearModel, NetworkModel), its standardised linear coefficients by parameter
    # and each free parameter's value per row
    coefficients: dict[str, dict[str, float]] = field(default_factory=dict)
    model: Any = field(default=None, repr=False)
    standardised: dict[str, Tensor] = field(default_factory=dict, repr=False)
    values: dict[str, Tensor] = field(default_factory=dict, repr=False)
    # a network's mean NLL on its validation rows at the weights kept (None without validation)
    validation_mean_nll: float | None = None

    @functools.cached_property
    def trace(self) -> pd.DataFrame:
        return self.trace_table.frame()

    @property
    def converged(self) -> bool:
        return self.outcome.converged

    @property
    def diverged(self) -> bool:
        return self.outcome in (Outcome.DIVERGED, Outcome.FAILED)


def step_rule(problem: ConstantProblem, settings: Sequence[FitSettings]):
    """The rule that moves rows of one optimiser: torch's Adam or L-BFGS, the seed's SGD on the
    natural parameters or damped Newton (a batched sweep's mix of Adam and SGD rows has its own
    rule, in nllflow.fitting.batched)."""
    from nllflow.fitting.engine import NewtonStep

    kinds = {s.optimizer for s in settings}
    rates = [s.learning_rate for s in settings]
    if len(kinds) != 1:
        raise InputError(f"the rows of one problem share one optimiser, got {sorted(kinds)}")
    if kinds == {"newton"}:
        return NewtonStep(problem)
    if kinds == {"sgd"}:
        return NaturalSGD(rates)
    return TorchStep(problem, settings[0].optimizer, rates)


def optimise_rows(
    problem: ConstantProblem,
    settings: Sequence[FitSettings],
    progress: Callable[[int, float], None] | None = None,
    first_step: int = 0,
    started: float | None = None,
    rule: StepRule | None = None,
) -> list[RowRun]:
    """Every row of `problem` with its own settings, through the one loop; `rule` moves the rows
    (default: `step_rule` of the settings)."""
    dtype = problem.observations.dtype
    limits = RowSettings.of([s.tolerances(dtype) for s in settings], [s.max_steps for s in settings], torch.float64)
    rule = rule or step_rule(problem, settings)
    return minimise(problem, rule, limits, first_step=first_step, progress=progress, started=started)


@dataclass
class _Run:
    """One path of a fit (a start, a polish round): its model, end and trace."""

    model: ConstantModel
    natural: dict[str, Tensor]
    run: RowRun

    @property
    def mean_nll(self) -> float:
        return self.run.mean_nll

    @property
    def diverged(self) -> bool:
        return self.run.outcome in (Outcome.DIVERGED, Outcome.FAILED)


def _optimise(
    model: ConstantModel,
    observations: Observations,
    settings: FitSettings,
    progress: Callable[[int, float], None] | None,
    first_step: int,
    started: float,
) -> _Run:
    problem = ConstantProblem(model, observations)
    (run,) = optimise_rows(problem, [settings], progress, first_step, started)
    if not run.trace:
        start = ", ".join(f"{name}={show(value)}" for name, value in model.start.items())
        raise InputError(
            f"the NLL of {model.family.name} is not finite at the start values ({start}; data range "
            f"[{model.bounds.min:g}, {model.bounds.max:g}]): check --init and --fix, "
            "or rescale data this large or small"
        )
    return _Run(model, problem.natural_of(0), run)


def fit_mle(
    family: Family,
    observations: Observations,
    *,
    fixed: Mapping[str, ParamValue] | None = None,
    init: Mapping[str, ParamValue] | None = None,
    settings: FitSettings = FitSettings(),  # noqa: B008 - frozen
    progress: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Fit `family` to `observations` by maximum likelihood.

    Families with a `polish` rule (a support endpoint or a kink at the data) then alternate: the rule
    proposes values to hold (a bound on the data, the peak on the best data point) and the other
    parameters are re-optimised, for as long as the NLL improves. Families with a multimodal
    likelihood (the triangular's) list `extra_starts`; without user start values, the best of all
    starts wins, and the trace is that start's path. A fit that did not converge warns with a
    `ConvergenceWarning`.
    """
    model = ConstantModel(family, observations, fixed, init)
    starts: list[Mapping[str, ParamValue | Tensor]] = [dict(init or {})]
    if family.extra_starts is not None and not init:
        extra = [
            {n: v for n, v in start.items() if n in model.free}
            for start in family.extra_starts(observations.stand_in().values)
        ]
        # a heuristic start can break a constraint that a fixed value sets (a triangular peak fixed
        # below the data): it is skipped, not reported as the user's initial value
        starts += [start for start in extra if model.first_infeasible({**model.start, **model.tensors(start)}) is None]
    best: _Run | None = None
    started, started_at = time.perf_counter(), time.time()
    for i, start in enumerate(starts):
        start_model = model if i == 0 else ConstantModel(family, observations, fixed, start)
        run = _polished(start_model, observations, settings, progress, started)
        if best is None or (not run.diverged and run.mean_nll < best.mean_nll):
            best = run
    result = _result(model, settings, best, started_at)  # type: ignore[arg-type]
    warn_unless_converged(result.outcome, result.reason, f"{family.name} fit")
    return result


def _polished(
    model: ConstantModel,
    observations: Observations,
    settings: FitSettings,
    progress: Callable[[int, float], None] | None,
    started: float,
) -> _Run:
    run = _optimise(model, observations, settings, progress, 0, started)
    family = model.family
    if family.polish is None or run.diverged:
        return run
    stand_in = observations.stand_in()
    for _ in range(MAX_POLISH_ROUNDS):
        candidates = family.polish(stand_in.values, run.natural, frozenset(model.free), stand_in.weights)
        improved = None
        for held in candidates:
            start = {n: run.natural[n] for n in model.free if n not in held}
            polished_model = ConstantModel(family, observations, model.fixed, start, held=held)
            at_start = {**polished_model.fixed, **held, **polished_model.start}
            if not math.isfinite(float(observations.log_likelihood(family, at_start))):
                continue  # censored rows reach past this bound of the exact values: no candidate
            polished = _optimise(polished_model, observations, settings, progress, len(run.run.trace), started)
            if polished.mean_nll < (improved or run).mean_nll:
                improved = polished
        if improved is None:
            break
        improved.run.trace = run.run.trace + improved.run.trace
        improved.run.times = run.run.times + improved.run.times
        run = improved
    return run


def _result(model: ConstantModel, settings: FitSettings, run: _Run, started_at: float) -> FitResult:
    """The FitResult of a path (labels from `model`: the user's fixed values, every free parameter)."""
    free_labels = model.labels(model.free)
    columns = ["nll", "mean_nll", "grad_norm", *free_labels, *[f"grad_{label}" for label in free_labels]]
    trace = TraceTable.of(run.run, columns, settings.learning_rate)
    params = {}
    for name in model.family.params:
        params.update(zip(model.labels([name]), run.natural[name].reshape(-1).double().cpu().tolist(), strict=True))
    fixed = {label: params[label] for label in model.labels(list(model.fixed))}
    nll, mean_nll, grad_norm = trace.values[-1, :3].tolist()
    return FitResult(
        family=model.family.name,
        params=params,
        fixed=fixed,
        free=tuple(free_labels),
        free_params=model.free,
        natural=run.natural,
        outcome=run.run.outcome,
        reason=run.run.message,
        steps=len(trace.values) - 1,
        nll=nll,
        mean_nll=mean_nll,
        grad_norm=grad_norm,
        trace_table=trace,
        optimizer=settings.optimizer,
        lr=settings.learning_rate,
        step_times=list(run.run.times),
        started_at=started_at,
    )
