"""Distributional regression by maximum likelihood: a `LinearModel` fitted through the one loop.

The start is the intercept-only fit (every free parameter one constant, its MLE), reached from the
family's own start rule; the model's coefficients then start at those intercepts with every slope 0,
so the optimiser begins at the unconditional fit, never at an arbitrary point. The trace records per
step the NLL, every coefficient on the original scale, its gradient and the gradient norm.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

import torch

from nllflow.data.formulas import intercept_design
from nllflow.errors import InputError
from nllflow.fitting.engine import NewtonStep, RowRun, RowSettings, TorchStep, minimise, warn_unless_converged
from nllflow.fitting.mle import FitResult, FitSettings, TraceTable
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import start_values
from nllflow.models.linear import LinearModel, LinearProblem


def constant_start(model: LinearModel, observations: Observations, init: Mapping[str, float]) -> dict[str, float]:
    """Each free parameter's start value (the parametrisation's names): the user's, else the
    family's start rule mapped to the parametrisation, else the middle of the link's range."""
    family = model.family
    natural = start_values(family, observations)
    values = natural if model.parametrisation is None else model.parametrisation.from_natural(natural)
    start = {}
    for name in model.free:
        if name in init:
            start[name] = float(init[name])
            continue
        value = float(torch.as_tensor(values[name]).reshape(-1)[0]) if name in values else math.nan
        link = model.predictors[name].link
        if not math.isfinite(value) or not math.isfinite(float(link.forward(torch.tensor(value)))):
            value = float(link.inverse(torch.tensor(0.0)))
        start[name] = value
    return start


def intercept_only(model: LinearModel, observations: Observations) -> tuple[LinearModel, Observations]:
    """The same family, parametrisation, links and fixed values with one constant per parameter."""
    rows = observations.n_rows
    designs = {name: intercept_design(name, rows) for name in model.free}
    links = {name: p.link.name for name, p in model.predictors.items()}
    constant = LinearModel(model.family, model.parametrisation, designs, links, model.fixed)
    features = {name: torch.ones((rows, 1), dtype=observations.dtype, device=observations.device) for name in designs}
    return constant, Observations(observations.values, observations.weights, observations.censored, features)


def constant_fit(model: LinearModel, observations: Observations, init: Mapping[str, float]) -> dict[str, float]:
    """The intercept-only MLE of every free parameter of `model` (the user's start values kept as
    given): where a regression or a network starts."""
    constants = constant_start(model, observations, init)
    if set(model.free) - set(init):
        constant, constant_observations = intercept_only(model, observations)
        problem = LinearProblem(constant, constant_observations, [constant.intercept_start(constants)])
        (run,) = optimise_linear(problem, [FitSettings("lbfgs", max_steps=200)])
        if run.trace:
            found = problem.coefficients_of(0)
            for name in model.free:
                if name not in init:
                    constants[name] = float(constant.predictors[name].link.inverse(found[name][0, 0]))
    return constants


def optimise_linear(
    problem: LinearProblem,
    settings: Sequence[FitSettings],
    progress: Callable[[int, float], None] | None = None,
    started: float | None = None,
) -> list[RowRun]:
    dtype = problem.observations.dtype
    limits = RowSettings.of([s.tolerances(dtype) for s in settings], [s.max_steps for s in settings], torch.float64)
    kinds = {s.optimizer for s in settings}
    if len(kinds) != 1:
        raise InputError("the rows of one regression problem share their optimiser")
    kind = settings[0].optimizer
    rule = NewtonStep(problem) if kind == "newton" else TorchStep(problem, kind, [s.learning_rate for s in settings])
    return minimise(problem, rule, limits, progress=progress, started=started)


def fit_regression(
    model: LinearModel,
    observations: Observations,
    *,
    init: Mapping[str, float] | None = None,
    settings: FitSettings = FitSettings(),  # noqa: B008 - frozen
    progress: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Fit `model` to `observations` (whose `features` are the model's standardised designs)."""
    if model.size > observations.n_rows:
        raise InputError(
            f"{model.size} coefficients for {observations.n_rows} observations: "
            "a model needs fewer coefficients than observations"
        )
    init = dict(init or {})
    started, started_at = time.perf_counter(), time.time()
    constants = constant_fit(model, observations, init)
    problem = LinearProblem(model, observations, [model.intercept_start(constants)])
    (run,) = optimise_linear(problem, [settings], progress, started)
    if not run.trace:
        shown = ", ".join(f"{name}={value:g}" for name, value in constants.items())
        raise InputError(
            f"the NLL of {model.family.name} is not finite at the start values ({shown}): "
            "check --init and --fix, or rescale the data"
        )
    result = regression_result(model, problem, 0, run, settings, started_at)
    warn_unless_converged(result.outcome, result.reason, f"{model.family.name} regression")
    return result


def linear_estimates(model, standardised: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, float]]:
    """What a model's linear predictors estimate (a LinearModel's or a NetworkModel's): the
    coefficients of each parameter with a formula on the original scale, {parameter: {term: value}},
    and the value of each constant parameter (fixed ones too)."""
    coefficients, params = {}, {}
    for name, predictor in model.predictors.items():
        original = model.original(name, standardised[name].double().cpu())[0].tolist()
        if name in model.formula_parameters:
            coefficients[name] = dict(zip(predictor.design.columns, original, strict=True))
        else:
            params[name] = float(predictor.link.inverse(torch.tensor(original[0], dtype=torch.float64)))
    params.update({name: float(value) for name, value in model.fixed.items()})
    return coefficients, params


def regression_result(
    model: LinearModel, problem: LinearProblem, row: int, run: RowRun, settings: FitSettings, started_at: float
) -> FitResult:
    """The FitResult of one row: coefficients on the original scale, the formula-free parameters'
    values in `params`, the trace."""
    standardised = problem.coefficients_of(row)
    with torch.no_grad():
        values, natural = problem.parameters(standardised)
    trace = TraceTable.of(run, problem.columns, settings.learning_rate)
    return parameter_model_result(
        model,
        run,
        trace,
        standardised,
        values,
        natural,
        model.labels(),
        settings=settings,
        lr=settings.learning_rate,
        nll=trace.last("nll"),
        mean_nll=trace.last("mean_nll"),
        started_at=started_at,
    )


def parameter_model_result(
    model,
    run: RowRun,
    trace: TraceTable,
    standardised: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
    natural: Mapping[str, torch.Tensor],
    labels: Sequence[str],
    *,
    settings: FitSettings,
    lr: float,
    nll: float,
    mean_nll: float,
    started_at: float,
    validation_mean_nll: float | None = None,
) -> FitResult:
    """The FitResult of a parameter model (a LinearModel's or a NetworkModel's) at its standardised
    linear coefficients, with each parameter's `values` per row and the family's `natural` ones."""
    coefficients, params = linear_estimates(model, standardised)
    return FitResult(
        family=model.family.name,
        params=params,
        fixed={name: float(value) for name, value in model.fixed.items()},
        free=tuple(labels),
        free_params=model.free,
        natural={name: value.detach().reshape(-1) for name, value in natural.items()},
        outcome=run.outcome,
        reason=run.message,
        steps=len(trace.values) - 1,
        nll=nll,
        mean_nll=mean_nll,
        grad_norm=trace.last("grad_norm"),
        trace_table=trace,
        optimizer=settings.optimizer,
        lr=lr,
        step_times=list(run.times),
        started_at=started_at,
        coefficients=coefficients,
        model=model,
        standardised={name: value[0].double().cpu() for name, value in standardised.items()},
        values={name: value.detach().reshape(-1) for name, value in values.items() if value.dim()},
        validation_mean_nll=validation_mean_nll,
    )
