"""Batched fits: K configurations that share their data and differ only in the first-order optimiser
(Adam or SGD) and its learning rate, fitted as one tensor program.

Every optimised parameter gets a leading dimension of K rows, shaped (K, 1, *shape) so that it
broadcasts against the observations (the last dimension); `Observations.log_likelihood` then returns
one total per row, and since the rows are independent fits, the gradient of their sum holds each
row's own gradient. Each row keeps its own learning rate, Adam moments, convergence test and
divergence: a row that converges, diverges or runs out of steps is frozen, and its trace stops
there. The update rules are those of `fit_mle` (torch's Adam, the seed's SGD rule on the natural
parameters), so each row's FitResult, trace included, is the one `fit_mle` gives for its
configuration, to rounding.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from tasks.errors import InputError
from tasks.experiment import FitProblem
from tasks.families import Family
# the single fit's evaluation, run record, result table and messages: one definition of each
from tasks.fitting import (
    FitResult,
    FitSettings,
    Observations,
    ParameterSpace,
    ParamValue,
    Tolerances,
    _evaluate,
    _Evaluation,
    _refused,
    _result,
    _Run,
    _show,
)

BATCHED_OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
# torch.optim.Adam's defaults, which fit_mle uses
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


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
    space = ParameterSpace(family, observations, fixed, init)
    count = len(settings)
    dtype, device = space.dtype, space.device

    def column(values: Sequence[float]) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    tolerances = [Tolerances.for_settings(dtype, s.optimizer, s.gtol, s.ftol) for s in settings]
    gtol, ftol = column([t.gtol for t in tolerances]), column([t.ftol for t in tolerances])
    lr = column([s.learning_rate for s in settings])
    max_steps = torch.tensor([s.max_steps for s in settings], device=device)
    is_adam = torch.tensor([s.optimizer == "adam" for s in settings], device=device)

    start = space.unconstrained(space.start)
    u = {n: start[n].expand(count, 1, *start[n].shape).clone().requires_grad_(True) for n in space.optimised}
    # where a row that ends goes back to: its last point with a finite NLL
    last_good = {n: v.detach().clone() for n, v in u.items()}
    first_moment = {n: torch.zeros_like(v) for n, v in last_good.items()}
    second_moment = {n: torch.zeros_like(v) for n, v in last_good.items()}

    active = torch.ones(count, dtype=torch.bool, device=device)
    converged = torch.zeros_like(active)
    reasons = ["max steps reached"] * count
    previous = torch.full((count,), float("nan"), dtype=dtype, device=device)
    good_mean = torch.full_like(previous, float("nan"))
    good_natural: dict[str, Tensor] = {}
    table: list[Tensor] = []  # per step: (K, columns)
    recorded: list[Tensor] = []  # per step: which rows recorded it
    total_weight = observations.total_weight

    def finish(rows: Tensor, reason: Callable[[int], str], *, success: bool = False) -> None:
        for k in torch.nonzero(rows & active).flatten().tolist():
            reasons[k] = reason(k)
            converged[k] = success
        active.logical_and_(~rows)

    def restore(rows: Tensor) -> None:
        with torch.no_grad():
            for n, value in u.items():
                value.copy_(torch.where(_per_row(rows, value), last_good[n], value))

    for step in range(int(max_steps.max()) + 1):
        current = _evaluate_rows(space, observations, u, active, step, finish, restore)
        if current is None:
            break
        mean_nll = current.mean_nll
        finite = torch.isfinite(mean_nll)
        for n in space.optimised:
            finite &= torch.isfinite(current.natural[n]).reshape(count, -1).all(1)
        finish(~finite, lambda k: f"diverged: NLL became {float(mean_nll[k]) * total_weight} at step {step}")
        restore(~finite)
        if not bool(active.any()):
            break
        table.append(_rows(space, current, total_weight, count))
        recorded.append(active.clone())
        good_mean = torch.where(active, mean_nll, good_mean)
        for n, value in current.natural.items():
            if n in space.optimised:
                good_natural[n] = torch.where(_per_row(active, value), value, good_natural.get(n, value))
            else:
                good_natural[n] = value
        for n, value in u.items():
            last_good[n] = torch.where(_per_row(active, value), value.detach(), last_good[n])
        if progress is not None:
            progress(step, float(mean_nll[active].min()))
        if not space.optimised:
            finish(active, lambda k: "all parameters fixed or held", success=True)
            break
        largest = torch.stack([g.reshape(count, -1).abs().amax(1) for g in current.grad_unconstrained.values()]).amax(0)
        finish(largest <= gtol, lambda k: f"gradient below gtol={tolerances[k].gtol:g}", success=True)
        settled = (previous - mean_nll).abs() <= ftol * mean_nll.abs().clamp_min(1.0)
        finish(settled & (ftol > 0), lambda k: f"relative change below ftol={tolerances[k].ftol:g}", success=True)
        finish(max_steps == step, lambda k: "max steps reached")
        if not bool(active.any()):
            break
        previous = mean_nll
        moved = _sgd_rows(space, current, lr, active & ~is_adam, step, finish)
        adam_rows, sgd_rows = active & is_adam, active & ~is_adam
        with torch.no_grad():
            bias1, bias2 = 1 - BETA1 ** (step + 1), 1 - BETA2 ** (step + 1)
            for n in space.optimised:
                grad = current.grad_unconstrained[n]
                first_moment[n].lerp_(grad, 1 - BETA1)
                second_moment[n].mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
                denominator = (second_moment[n].sqrt() / bias2**0.5).add_(EPS)
                # torch's addcdiv order: (value · numerator) / denominator
                adam = u[n] + (-(_per_row(lr, grad) / bias1) * first_moment[n]) / denominator
                updated = torch.where(_per_row(sgd_rows, grad), moved[n], u[n]) if moved else u[n]
                u[n].copy_(torch.where(_per_row(adam_rows, grad), adam, updated))
    if not good_natural:
        raise InputError(f"the NLL of {family.name} is not finite at the start values; check the initial and fixed values")
    return [
        _result(
            space, observations, settings[k],
            _Run(
                {n: v[k, 0] if n in space.optimised else v for n, v in good_natural.items()},
                [step_rows[k] for step_rows, was in zip(table, recorded) if bool(was[k])],
                float(good_mean[k]), bool(converged[k]), reasons[k],
            ),
        )
        for k in range(count)
    ]


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    """A (K,) tensor shaped to broadcast against a (K, 1, *shape) parameter."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


Finish = Callable[..., None]


def _evaluate_rows(
    space: ParameterSpace, observations: Observations, u: dict[str, Tensor], active: Tensor, step: int,
    finish: Finish, restore: Callable[[Tensor], None],
) -> _Evaluation | None:
    """`_evaluate` on every row. Some torch families refuse non-finite parameters with a ValueError
    (StudentT's inner Chi2) for the whole batch: each active row that is refused on its own ends as
    diverged, as in fit_mle, goes back to its last good point, and the batch is evaluated again."""
    while True:
        try:
            return _evaluate(space, observations, u)
        except ValueError:
            refused = torch.zeros_like(active)
            for k in torch.nonzero(active).flatten().tolist():
                try:
                    _evaluate(space, observations, {n: v[k : k + 1] for n, v in u.items()})
                except ValueError:
                    refused[k] = True
            if not bool(refused.any()):
                raise
            finish(refused, lambda k: _refused(space, error, step))
            restore(refused)
            if not bool(active.any()):
                return None


def _rows(space: ParameterSpace, current: _Evaluation, total_weight: float, count: int) -> Tensor:
    """The trace row of every fit (as `_Evaluation.row`): nll, mean_nll, grad_norm, values, grads."""
    values = [current.natural[n].reshape(count, -1) for n in space.free]
    grads = [current.grad_natural[n].reshape(count, -1) for n in space.free]
    grad_norm = torch.cat(grads, 1).norm(dim=1) if grads else current.mean_nll.new_zeros(count)
    mean_nll = current.mean_nll
    return torch.cat([torch.stack([mean_nll * total_weight, mean_nll, grad_norm], 1), *values, *grads], 1)


def _sgd_rows(
    space: ParameterSpace, current: _Evaluation, lr: Tensor, rows: Tensor, step: int, finish: Finish
) -> dict[str, Tensor]:
    """The seed's rule θ ← θ − lr·∂NLL/∂θ on the natural parameters of the SGD `rows`, as
    unconstrained values; a row whose step leaves a constraint stops (at a data bound) or diverges,
    as in fit_mle."""
    if not bool(rows.any()):
        return {}
    moved = {**current.natural}
    for n in space.optimised:
        moved[n] = current.natural[n] - _per_row(lr, current.grad_natural[n]) * current.grad_natural[n]
    known: dict[str, Tensor] = {**space.fixed, **space.held}
    outside: list[str | None] = [None] * len(rows)
    for n in space.family.order:
        if n in space.optimised:
            value = moved[n]
            ok = (torch.isfinite(value) & space.constraint(n, known).check(value)).reshape(len(rows), -1).all(1)
            for k in torch.nonzero(rows & ~ok).flatten().tolist():
                outside[k] = outside[k] or n
            known[n] = value
    bounded = space.family.constraint_rules
    at_bound = torch.tensor([o is not None and o in bounded for o in outside], device=rows.device)
    finish(rows & at_bound, lambda k: f"stopped: the SGD step at step {step} would take {outside[k]} past a data bound")
    finish(rows & ~at_bound & torch.tensor([o is not None for o in outside], device=rows.device),
           lambda k: f"diverged: the SGD step at step {step} took {outside[k]} to {_show(moved[outside[k]][k])}, "
           "outside its constraint")
    with torch.no_grad():
        return space.unconstrained(moved)


def fit_problems(problems: Sequence[FitProblem], progress: Callable[[int, float], None] | None = None) -> list[FitResult]:
    """`fit_batched` for the problems of a batched sweep: one family, data set, fixed and initial
    values, and any settings (the first problem's observations stand for all)."""
    first = problems[0]
    for problem in problems[1:]:
        if (problem.family.name, problem.fixed, problem.init) != (first.family.name, first.fixed, first.init):
            raise InputError("a batched sweep fits configurations that differ only in lr and optimizer; use fan_out: threads")
    return fit_batched(first.family, first.observations, [p.settings for p in problems], fixed=first.fixed,
                       init=first.init, progress=progress)
