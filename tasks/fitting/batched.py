"""Batched fits: K configurations that share their data and differ only in the first-order optimiser
(Adam or SGD), its learning rate, tolerances and step budget, fitted as one tensor program.

The K configurations are K rows of one `ConstantProblem` in the one loop (`engine.minimise`): each
row keeps its own learning rate (a parameter group of torch's Adam, or the seed's SGD rule), its own
convergence test and divergence; a row that ends is frozen and its trace stops there. Every
evaluation shares each pass over the data between the rows still moving. Each row's FitResult,
trace included, is the one `fit_mle` gives for its configuration, to rounding.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from nllflow.errors import InputError
from nllflow.families import Family
from nllflow.fitting.mle import FitResult, FitSettings, _result, _Run, optimise_rows
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import ConstantModel, ConstantProblem, ParamValue

if TYPE_CHECKING:
    from nllflow.pipeline.steps import FitProblem

BATCHED_OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")


def check_batchable(family: Family, optimizers: Sequence[str], init: Mapping[str, ParamValue] | None = None) -> None:
    """Refuse, in one line, what one batched program cannot fit the way fit_mle would."""
    other = sorted(set(optimizers) - set(BATCHED_OPTIMIZERS))
    if other:
        raise InputError(
            f"a batched sweep fits {' and '.join(BATCHED_OPTIMIZERS)} configurations only, got {other[0]!r}; "
            "use fan_out: threads"
        )
    if family.polish is not None:
        raise InputError(
            f"a batched sweep cannot fit {family.name}: its fit holds parameters on data bounds in extra rounds; "
            "use fan_out: threads"
        )
    if family.extra_starts is not None and not init:
        raise InputError(
            f"a batched sweep cannot fit {family.name} without initial values: its fit tries several starts; "
            "give init values or use fan_out: threads"
        )


def fit_batched(
    family: Family,
    observations: Observations,
    settings: Sequence[FitSettings],
    *,
    fixed: Mapping[str, ParamValue] | None = None,
    init: Mapping[str, ParamValue] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[FitResult]:
    """Fit `family` to `observations` once per entry of `settings`, all in one tensor program;
    the results come back in the order of `settings`. `progress(step, lowest mean NLL)`."""
    check_batchable(family, [s.optimizer for s in settings], init)
    model = ConstantModel(family, observations, fixed, init)
    problem = ConstantProblem(model, observations, rows=len(settings))
    started, started_at = time.perf_counter(), time.time()
    runs = optimise_rows(problem, settings, progress, started=started)
    if not any(run.trace for run in runs):
        raise InputError(
            f"the NLL of {family.name} is not finite at the start values; check the initial and fixed values"
        )
    return [
        _result(model, s, _Run(model, problem.natural_of(row), run), started_at)
        for row, (s, run) in enumerate(zip(settings, runs, strict=True))
    ]


def fit_problems(
    problems: Sequence[FitProblem], progress: Callable[[int, float], None] | None = None
) -> list[FitResult]:
    """`fit_batched` for the problems of a batched sweep: one family, data set, fixed and initial
    values, and any settings (the first problem's observations stand for all)."""
    first = problems[0]
    for problem in problems[1:]:
        if (problem.family.name, problem.fixed, problem.init) != (first.family.name, first.fixed, first.init):
            raise InputError(
                "a batched sweep fits configurations that differ only in lr and optimizer; use fan_out: threads"
            )
    return fit_batched(
        first.family,
        first.observations,
        [p.settings for p in problems],
        fixed=first.fixed,
        init=first.init,
        progress=progress,
    )
