"""Batched fits: K configurations that share their data and differ only in the first-order optimiser
(Adam or SGD), its learning rate, tolerances and step budget, fitted as one tensor program.

The K configurations are K rows of one `ConstantProblem` in the one loop (`engine.minimise`): each
row keeps its own learning rate, its own convergence test and divergence; a row that ends is frozen
and its trace stops there. Every evaluation shares each pass over the data between the rows still
moving (the parameters are (K, 1) against the data's (n,)). The Adam rows move together
(`RowAdam`: torch's Adam update on a (rows, parameters) tensor), the SGD rows by the seed's rule.
Each row's FitResult, trace included, is the one `fit_mle` gives for its configuration, to rounding.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import Tensor

from nllflow.errors import InputError
from nllflow.families import Family
from nllflow.fitting.engine import Outcome, RowRules, StepRule, StepValues
from nllflow.fitting.mle import FitResult, FitSettings, _result, _Run, optimise_rows
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import ConstantModel, ConstantProblem, NaturalSGD, ParamValue

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
    runs = optimise_rows(problem, settings, progress, started=started, rule=_rule(problem, settings))
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


class RowAdam:
    """torch.optim.Adam's update (its default betas and eps, as `fit_mle` uses it) applied to the
    moving rows' leaves as one (rows, parameters) tensor: torch's optimiser, one parameter group per
    row, costs a dozen small operations per leaf and row, most of a sweep's time outside the data
    pass. The same operations in the same order as torch's single-tensor Adam, per row its own
    learning rate and step count, so each row follows its single fit's path to rounding."""

    BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, problem: ConstantProblem, rates: Sequence[float]):
        self.rates = list(rates)
        self.steps = [0] * problem.rows
        width = sum(math.prod(problem.model.shapes[name]) for name in problem.model.optimised)
        dtype, device = problem.observations.dtype, problem.observations.device
        self.exp_avg = torch.zeros(problem.rows, width, dtype=dtype, device=device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)

    def step(
        self, problem: ConstantProblem, current: StepValues, rows: Tensor, step: int
    ) -> list[tuple[int, Outcome, str]]:
        picked = rows.tolist()
        at = {row: position for position, row in enumerate(current.rows.tolist())}
        grad = torch.cat(
            [
                torch.cat([current.gradients[at[row]][leaf] for row in picked]).reshape(len(picked), -1)
                for leaf in range(len(problem.model.optimised))
            ],
            1,
        )
        index = rows.to(self.exp_avg.device)
        exp_avg, exp_avg_sq = self.exp_avg[index], self.exp_avg_sq[index]
        exp_avg.lerp_(grad, 1 - self.BETA1)
        exp_avg_sq.mul_(self.BETA2).addcmul_(grad, grad, value=1 - self.BETA2)
        step_size, root = [], []
        for row in picked:
            # torch computes these per parameter as Python floats
            self.steps[row] += 1
            step_size.append(-self.rates[row] / (1 - self.BETA1 ** float(self.steps[row])))
            root.append((1 - self.BETA2 ** float(self.steps[row])) ** 0.5)
        column = {"dtype": grad.dtype, "device": grad.device}
        denom = (exp_avg_sq.sqrt() / torch.tensor(root, **column)[:, None]).add_(self.EPS)
        # addcdiv's own order: u + (value·m) / denom
        moved = problem.flat(rows) + torch.tensor(step_size, **column)[:, None] * exp_avg / denom
        self.exp_avg[index], self.exp_avg_sq[index] = exp_avg, exp_avg_sq
        problem.set_flat(rows, moved)
        return []


def _rule(problem: ConstantProblem, settings: Sequence[FitSettings]) -> StepRule:
    """Adam rows by `RowAdam`, SGD rows by the seed's rule, each on its own rows."""
    rates = [s.learning_rate for s in settings]
    sgd = torch.tensor([s.optimizer == "sgd" for s in settings])
    if not bool(sgd.any()):
        return RowAdam(problem, rates)
    if bool(sgd.all()):
        return NaturalSGD(rates)
    return RowRules([(~sgd, RowAdam(problem, rates)), (sgd, NaturalSGD(rates))])
