"""Training a network parameter model through the one loop: one step is one epoch (see
`nllflow.models.network`).

The start is the intercept-only fit, as for a regression: the network's output biases and every
linear predictor's intercept at the constant MLE. Training keeps the weights of the epoch with the
best validation NLL (the last epoch's without validation rows); the result's NLL is the full-batch
training NLL at those weights, in evaluation mode (no dropout).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping

import torch

from nllflow.data.formulas import intercept_design
from nllflow.errors import InputError
from nllflow.fitting.engine import Outcome, RowSettings, Tolerances, minimise, warn_unless_converged
from nllflow.fitting.mle import FitResult, FitSettings, TraceTable
from nllflow.fitting.regression import constant_fit, parameter_model_result
from nllflow.likelihood.observations import Observations
from nllflow.models.linear import LinearModel
from nllflow.models.network import EpochStep, NetworkModel, NetworkProblem, Training

# Adam's and SGD's usual rates for networks (a distribution's defaults, 0.05 and 0.1, are too large)
NETWORK_LR = {"adam": 1e-3, "sgd": 1e-2, "lbfgs": 1.0}
# dropout draws from torch's global generator, which is seeded per training run
_GLOBAL_GENERATOR = threading.Lock()


def network_lr(settings: FitSettings) -> float:
    return settings.lr if settings.lr is not None else NETWORK_LR[settings.optimizer]


def fit_network(
    model: NetworkModel,
    observations: Observations,
    validation: Observations | None,
    *,
    settings: FitSettings,
    training: Training,
    init: Mapping[str, float] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train `model` on `observations` (with the features `model.features` gives), early-stopping
    on `validation` (None: train for the whole epoch budget)."""
    started, started_at = time.perf_counter(), time.time()
    init = dict(init or {})
    rows = observations.n_rows
    constant = LinearModel(
        model.family,
        model.parametrisation,
        {name: intercept_design(name, rows) for name in model.free},
        {name: link.name for name, link in {**model.links, **{n: p.link for n, p in model.predictors.items()}}.items()},
        model.fixed,
    )
    constants = constant_fit(constant, observations, init)
    stand_in = observations.stand_in().values
    start = model.start(constants, float(stand_in.double().std()) if stand_in.numel() > 1 else 1.0)
    problem = NetworkProblem(model, observations, validation, start, training)
    lr = network_lr(settings)
    rule = EpochStep(problem, settings.optimizer, lr, settings.max_steps)
    tolerances = Tolerances.for_settings(observations.dtype, settings.optimizer, settings.gtol, settings.ftol)
    limits = RowSettings.of([tolerances], [settings.max_steps], torch.float64)
    with _GLOBAL_GENERATOR:
        torch.manual_seed(training.seed)
        (run,) = minimise(problem, rule, limits, progress=progress, started=started)
    if not run.trace:
        shown = ", ".join(f"{name}={value:g}" for name, value in constants.items())
        raise InputError(
            f"the NLL of {model.family.name} is not finite at the start values ({shown}): "
            "check --init and --fix, or rescale the data"
        )
    if validation is not None and run.outcome not in (Outcome.DIVERGED, Outcome.FAILED):
        # the loop's last evaluation (at the step budget) never reached the rule: it may be the best
        last = float(run.trace[-1][problem.columns.index("val_mean_nll")])
        if rule.best_validation < last:
            problem.restore(rule.best_state)
    model.network.eval()
    with torch.no_grad():
        mean_nll = float(problem.mean_nll(observations))
        validation_mean_nll = float(problem.validation_nll()) if validation is not None else None
    result = network_result(model, problem, run, settings, lr, started_at, mean_nll, validation_mean_nll)
    warn_unless_converged(result.outcome, result.reason, f"{model.family.name} network")
    return result


def network_result(
    model: NetworkModel,
    problem: NetworkProblem,
    run,
    settings: FitSettings,
    lr: float,
    started_at: float,
    mean_nll: float,
    validation_mean_nll: float | None,
) -> FitResult:
    """The FitResult of a trained network: the per-epoch trace, the linear predictors' coefficients
    on the original scale, each parameter's value per training row."""
    observations = problem.observations
    coefficients = {name: value.detach().clone() for name, value in problem.coefficients.items()}
    with torch.no_grad():
        values = model.values(coefficients, observations.features)
        natural = model.natural(values)
    labels = [*model.targets, *[label for p in model.predictors.values() for label in p.labels]]
    return parameter_model_result(
        model,
        run,
        TraceTable.of(run, problem.columns, lr),
        coefficients,
        values,
        natural,
        labels,
        settings=settings,
        lr=lr,
        nll=mean_nll * float(observations.row_weight),
        mean_nll=mean_nll,
        started_at=started_at,
        validation_mean_nll=validation_mean_nll,
    )
