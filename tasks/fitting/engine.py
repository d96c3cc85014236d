"""The one optimisation loop: steps, convergence, divergence and the trace, for every optimiser
(L-BFGS, Adam and SGD from `torch.optim`, the seed's SGD rule on the natural parameters, damped
Newton) over any number of independent rows (one fit, K sweep configurations, B bootstrap
resamples).

A `Problem` owns the leaf tensors of every row and evaluates them: the mean NLL per row, its
gradient with respect to each row's leaves and the row's trace columns. Rows are independent fits,
so the gradient of the sum of their mean NLLs holds each row's own gradient. The loop evaluates the
active rows, ends each row that diverged, converged or ran out of steps (with an `Outcome`, never a
decision on a message's wording), and asks a `StepRule` to move the others. A row that diverges
goes back to its last finite point, so its estimate and trace end at the last finite step.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from nllflow.errors import ConvergenceWarning


class Outcome(Enum):
    """How a row's optimisation ended."""

    GRADIENT = "gradient"  # converged: the largest |∂ mean NLL / ∂ leaf| is below gtol
    CHANGE = "change"  # converged: the mean NLL stopped changing (ftol), or no damped Newton step lowers it
    FIXED = "fixed"  # converged: nothing to optimise
    EARLY_STOPPED = "early_stopped"  # converged: the validation NLL stopped improving
    MAX_STEPS = "max_steps"
    BOUND = "bound"  # stopped: the next step would cross a bound that the data set
    DIVERGED = "diverged"
    FAILED = "failed"

    @property
    def converged(self) -> bool:
        return self in (Outcome.GRADIENT, Outcome.CHANGE, Outcome.FIXED, Outcome.EARLY_STOPPED)


@dataclass(frozen=True)
class Tolerances:
    """When a fit has converged. `gtol`: largest |∂ mean NLL / ∂u| over the optimised leaves;
    `ftol`: relative change of the mean NLL over one step (0 turns it off)."""

    gtol: float
    ftol: float

    @staticmethod
    def for_settings(dtype: torch.dtype, optimizer: str, gtol: float | None, ftol: float | None) -> Tolerances:
        """float64: gtol 1e-8, ftol 1e-12; float32: 1e-4, 1e-7. The relative-change test is off by
        default for first-order optimisers: a small learning rate makes small changes long before
        the optimum."""
        default = Tolerances(1e-8, 1e-12) if dtype == torch.float64 else Tolerances(1e-4, 1e-7)
        if optimizer not in ("lbfgs", "newton"):
            default = Tolerances(default.gtol, 0.0)
        return Tolerances(gtol if gtol is not None else default.gtol, ftol if ftol is not None else default.ftol)


@dataclass
class StepValues:
    """The values at the current point of some rows of a problem (`rows`: their indices, in order)."""

    rows: Tensor
    mean_nll: Tensor  # (len(rows),), detached
    max_gradient: Tensor  # (len(rows),): the largest |∂ mean NLL / ∂ leaf| of each row
    gradients: list[list[Tensor]]  # per row in `rows`: the gradient of each of its leaves
    columns: Tensor | None  # (len(rows), C): the trace values (None when no trace is kept)
    finite: Tensor  # (len(rows),): every parameter value finite
    extras: dict = field(default_factory=dict)  # what a model's own step rule needs (natural values)

    def position(self, row: int) -> int:
        return int((self.rows == row).nonzero()[0, 0])


class Problem(Protocol):
    """What the loop optimises (see the module's docstring)."""

    rows: int
    discrete: bool
    columns: list[str]  # the names of the trace columns an evaluation gives
    description: str  # what was fitted, for messages ("gamma")

    def row_leaves(self, row: int) -> list[Tensor]: ...

    def save_rows(self, rows: list[int]) -> Any: ...

    def restore_row(self, row: int, saved: Any, position: int) -> None: ...

    def evaluate(self, rows: Tensor, *, trace: bool = True) -> StepValues: ...

    def row_weight(self, rows: Tensor) -> Tensor: ...

    def nothing_to_optimise(self) -> bool: ...


class StepRule(Protocol):
    """Moves the given active rows one step from their current evaluation; returns the rows it
    ends instead (row, outcome, message): a step that would cross a bound, a Newton step that
    cannot lower the NLL."""

    def step(
        self, problem: Problem, current: StepValues, rows: Tensor, step: int
    ) -> list[tuple[int, Outcome, str]]: ...


@dataclass
class RowRun:
    """The end of one row: its outcome and message, the trace rows of its finite steps (with their
    times in seconds since the start), and its last finite mean NLL."""

    outcome: Outcome
    message: str
    trace: list[Tensor]
    times: list[float]
    mean_nll: float

    @property
    def steps(self) -> int:
        return max(len(self.trace) - 1, 0)


@dataclass(frozen=True)
class RowSettings:
    """Per-row tolerances and step budgets."""

    gtol: Tensor
    ftol: Tensor
    max_steps: Tensor

    @staticmethod
    def of(tolerances: Sequence[Tolerances], max_steps: Sequence[int], dtype: torch.dtype) -> RowSettings:
        return RowSettings(
            torch.tensor([t.gtol for t in tolerances], dtype=dtype),
            torch.tensor([t.ftol for t in tolerances], dtype=dtype),
            torch.tensor(list(max_steps)),
        )


def refused_message(description: str, error: ValueError, step: int) -> str:
    """Some torch families check an inner distribution whatever validate_args says (StudentT's
    Chi2(df)), so non-finite trial parameters raise instead of giving a NaN NLL: a divergence too."""
    return f"diverged: {description} refused the parameters tried at step {step}: {str(error).splitlines()[0]}"


def minimise(
    problem: Problem,
    rule: StepRule,
    settings: RowSettings,
    *,
    first_step: int = 0,
    progress: Callable[[int, float], None] | None = None,
    trace: bool = True,
    started: float | None = None,
) -> list[RowRun]:
    """Run the loop until every row has ended; one `RowRun` per row. Step times count from
    `started` (a `time.perf_counter()` value; now by default)."""
    count = problem.rows
    # the loop's bookkeeping is per row and in Python: reading a 0-d tensor element costs
    # microseconds, and a fit that converges at its start does little else
    active = [True] * count
    outcomes: list[tuple[Outcome, str] | None] = [None] * count
    traces: list[list[Tensor]] = [[] for _ in range(count)]
    times: list[list[float]] = [[] for _ in range(count)]
    good_mean = [math.nan] * count
    previous = [math.nan] * count
    gtol, ftol, max_steps = settings.gtol.tolist(), settings.ftol.tolist(), settings.max_steps.tolist()
    snapshot = _Snapshot(problem)
    started = time.perf_counter() if started is None else started

    def end(row: int, outcome: Outcome, message: str) -> None:
        if active[row]:
            outcomes[row] = (outcome, message)
            active[row] = False
            if outcome in (Outcome.DIVERGED, Outcome.FAILED):
                snapshot.restore(row)

    for step in range(max(max_steps) + 1):
        shown = first_step + step
        current = _evaluate_active(problem, active, shown, end, trace)
        if current is None:
            break
        mean = current.mean_nll.double().cpu().tolist()
        finite = current.finite.cpu().tolist()
        now = time.perf_counter() - started
        kept = []
        for i, row in enumerate(current.rows.tolist()):
            usable = math.isfinite(mean[i]) and finite[i]
            negative = usable and problem.discrete and mean[i] < 0
            if not usable or negative:
                # a pmf is at most 1: a negative NLL of a discrete family is log_prob's rounding
                # (a negative binomial's total_count run off to 1e15), not a better fit
                weight = float(problem.row_weight(current.rows[i : i + 1])[0])
                message = f"diverged: NLL became {mean[i] * weight} at step {shown}"
                if negative:
                    message += " (below 0, impossible for a discrete family: its log_prob lost precision)"
                end(row, Outcome.DIVERGED, message)
                continue
            kept.append((i, row))
            if trace:
                traces[row].append(current.columns[i].detach())
                times[row].append(now)
            good_mean[row] = mean[i]
        snapshot.take([row for _, row in kept])
        if not kept:
            if not any(active):
                break
            continue
        if progress is not None:
            progress(shown, min(mean[i] for i, _ in kept))
        if problem.nothing_to_optimise():
            for _, row in kept:
                end(row, Outcome.FIXED, "all parameters fixed or held")
            break
        gradient = current.max_gradient.double().cpu().tolist()
        for i, row in kept:
            change = abs(previous[row] - mean[i])
            if gradient[i] <= gtol[row]:
                end(row, Outcome.GRADIENT, f"gradient below gtol={gtol[row]:g}")
            elif ftol[row] > 0 and change <= ftol[row] * max(abs(mean[i]), 1.0):
                end(row, Outcome.CHANGE, f"relative change below ftol={ftol[row]:g}")
            elif step >= max_steps[row]:
                end(row, Outcome.MAX_STEPS, "max steps reached")
            previous[row] = mean[i]
        moving = [row for _, row in kept if active[row]]
        if not moving:
            if not any(active):
                break
            continue
        try:
            ended = rule.step(problem, current, torch.tensor(moving), shown)
        except ValueError as error:
            if problem.rows != 1:
                raise
            ended = [(0, Outcome.DIVERGED, refused_message(problem.description, error, shown))]
        for row, outcome, message in ended:
            end(row, outcome, message)
    for row in range(count):
        if outcomes[row] is None:  # ran past the largest step budget: cannot happen, but never silent
            outcomes[row] = (Outcome.MAX_STEPS, "max steps reached")
    return [RowRun(*outcomes[r], traces[r], times[r], good_mean[r]) for r in range(count)]  # type: ignore[misc]


def _evaluate_active(
    problem: Problem, active: list[bool], step: int, end: Callable[[int, Outcome, str], None], trace: bool
) -> StepValues | None:
    """The active rows' evaluation. Some torch families refuse non-finite parameters with a
    ValueError for the whole batch (StudentT's inner Chi2): each active row that is refused on its
    own ends as diverged and goes back to its last good point, and the rest are evaluated again."""
    while any(active):
        rows = torch.tensor([row for row, on in enumerate(active) if on])
        try:
            return problem.evaluate(rows, trace=trace)
        except ValueError as error:
            refused = []
            for row in rows.tolist():
                try:
                    problem.evaluate(torch.tensor([row]), trace=False)
                except ValueError as own:
                    refused.append((row, own))
            if not refused:
                raise error from None
            for row, own in refused:
                end(row, Outcome.DIVERGED, refused_message(problem.description, own, step))
    return None


class _Snapshot:
    """Each row's leaves at its last finite evaluation, to go back to."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.saved: dict[int, tuple[Any, int]] = {}  # row -> (what save_rows gave, the row's position)

    def take(self, rows: list[int]) -> None:
        if rows:
            saved = self.problem.save_rows(rows)
            for position, row in enumerate(rows):
                self.saved[row] = (saved, position)

    def restore(self, row: int) -> None:
        if row in self.saved:
            with torch.no_grad():
                self.problem.restore_row(row, *self.saved[row])


# --- step rules ----------------------------------------------------------------------------------


class RowProblem:
    """What every problem shares: the evaluations an L-BFGS line search left behind (`memo`),
    which the loop's next evaluation at the accepted point reuses. A parameter model's problem
    (`model.optimised` names its leaves, `leaves[row]` holds each row's, `observations` the data)
    also gets its rows' leaves and weights from here."""

    memo: _Memo | None = None
    leaves: list[list[Tensor]]

    def remembered(self, rows: Tensor) -> StepValues | None:
        memo, self.memo = self.memo, None
        if memo is None or rows.tolist() != [0]:
            return None
        return memo.find(self.row_leaves(0))

    def row_leaves(self, row: int) -> list[Tensor]:
        return self.leaves[row]

    def save_rows(self, rows: list[int]) -> Any:
        """Copies of the leaves of `rows`, for `restore_row`."""
        return [[leaf.detach().clone() for leaf in self.row_leaves(row)] for row in rows]

    def restore_row(self, row: int, saved: Any, position: int) -> None:
        """The leaves of `row` set back to its copies in `saved` (from save_rows), at `position`."""
        for leaf, value in zip(self.row_leaves(row), saved[position], strict=True):
            leaf.copy_(value)

    def nothing_to_optimise(self) -> bool:
        return not self.model.optimised  # type: ignore[attr-defined]

    def row_weight(self, rows: Tensor) -> Tensor:
        weight = self.observations.row_weight  # type: ignore[attr-defined]
        return weight[rows.to(weight.device)] if weight.dim() else weight.expand(len(rows))

    def assemble(self, rows: Tensor) -> dict[str, Tensor]:
        """The leaves of `rows` by name, each row's stacked along the first dimension."""
        names = self.model.optimised  # type: ignore[attr-defined]
        picked = rows.tolist()
        if len(picked) == 1:
            return dict(zip(names, self.leaves[picked[0]], strict=True))
        return {name: torch.cat([self.leaves[row][i] for row in picked]) for i, name in enumerate(names)}


class TorchStep:
    """A `torch.optim` optimiser over every row's leaves, one parameter group per row with the
    row's own learning rate. Rows that are not moved this step get no gradient, and torch's
    optimisers leave such parameters alone. L-BFGS (one row) evaluates the problem in its line
    search; the loop then reuses the evaluation of the point it accepted."""

    def __init__(self, problem: Problem, kind: str, rates: Sequence[float]):
        groups = [{"params": problem.row_leaves(row), "lr": rate} for row, rate in enumerate(rates)]
        self.groups = [group for group in groups if group["params"]]
        self.kind = kind
        if kind not in ("adam", "sgd", "lbfgs"):
            raise ValueError(f"unknown torch optimiser {kind!r}")
        if kind == "lbfgs" and len(self.groups) > 1:
            raise ValueError("L-BFGS optimises one row at a time")
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimiser, built at the first step: the first one a process builds imports
        torch._dynamo (over a second), which a fit that converges at its start (the MLE from
        sufficient statistics) never needs."""
        if self._optimizer is None and self.groups:
            if self.kind == "adam":
                self._optimizer = torch.optim.Adam(self.groups)
            elif self.kind == "sgd":
                self._optimizer = torch.optim.SGD(self.groups)
            else:
                self._optimizer = lbfgs(self.groups[0]["params"], self.groups[0]["lr"])
        return self._optimizer

    def step(self, problem: Problem, current: StepValues, rows: Tensor, step: int) -> list[tuple[int, Outcome, str]]:
        if self.optimizer is None:
            return []
        moving = {row: position for position, row in enumerate(current.rows.tolist()) if row in set(rows.tolist())}
        for row in range(problem.rows):
            gradients = current.gradients[moving[row]] if row in moving else [None] * len(problem.row_leaves(row))
            for leaf, gradient in zip(problem.row_leaves(row), gradients, strict=True):
                leaf.grad = gradient
        if self.kind != "lbfgs":
            self.optimizer.step()
            return []
        cached = [current]
        seen = _Memo()

        def closure() -> Tensor:
            evaluation = cached.pop() if cached else problem.evaluate(rows)
            for leaf, gradient in zip(problem.row_leaves(0), evaluation.gradients[0], strict=True):
                leaf.grad = gradient
            seen.keep(problem, evaluation)
            return evaluation.mean_nll[0]

        self.optimizer.step(closure)
        problem.memo = seen  # type: ignore[attr-defined]
        return []


def lbfgs(parameters: Sequence[Tensor], lr: float) -> torch.optim.LBFGS:
    """torch's L-BFGS as one step of the loop: one iteration with a strong-Wolfe line search (at
    most 25 evaluations); the loop, not torch, decides convergence."""
    return torch.optim.LBFGS(
        parameters,
        lr=lr,
        max_iter=1,
        max_eval=25,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )


class _Memo:
    """Evaluations a line search made, by the point (copies of the leaves) they were made at."""

    def __init__(self) -> None:
        self.points: list[tuple[list[Tensor], StepValues]] = []

    def keep(self, problem: Problem, evaluation: StepValues) -> None:
        self.points.append(([leaf.detach().clone() for leaf in problem.row_leaves(0)], evaluation))

    def find(self, leaves: list[Tensor]) -> StepValues | None:
        for point, evaluation in self.points:
            if all(torch.equal(a, b) for a, b in zip(point, leaves, strict=True)):
                return evaluation
        return None


class RowRules:
    """Several step rules, each moving its own rows (a batched sweep of Adam and SGD rows)."""

    def __init__(self, rules: Sequence[tuple[Tensor, StepRule]]):
        self.rules = rules

    def step(self, problem: Problem, current: StepValues, rows: Tensor, step: int) -> list[tuple[int, Outcome, str]]:
        ended = []
        for mask, rule in self.rules:
            own = rows[mask[rows]]
            if len(own):
                ended += rule.step(problem, current, own, step)
        return ended


# Damping of the Newton step, relative to the largest absolute eigenvalue of a row's Hessian.
DAMPING_START, DAMPING_MIN = 1e-8, 1e-12
MAX_TRIALS = 40
HALVINGS_FIRST = 6


class NewtonStep:
    """Damped Newton steps on every row at once (Levenberg–Marquardt on the absolute eigenvalues of
    each row's small Hessian, which also steps downhill where a Hessian is not positive definite).
    A row whose objective stops changing, or that no damped step lowers (a numerical minimum, at a
    kink), has converged. The problem gives each row's leaves as one flat vector
    (`flat`, `set_flat`), the mean NLL of flat vectors (`objective`) and its gradient and Hessian
    (`derivatives`: `autograd_derivatives`, or what the problem's structure makes cheaper)."""

    def __init__(self, problem: Problem):
        self.damping = torch.full((problem.rows,), DAMPING_START, dtype=torch.float64)

    def step(self, problem, current: StepValues, rows: Tensor, step: int) -> list[tuple[int, Outcome, str]]:
        u = problem.flat(rows)
        value, gradient, hessian = problem.derivatives(rows, u)
        count, size = u.shape
        dtype, device = u.dtype, u.device
        damping = self.damping[rows].to(dtype=dtype, device=device)
        broken = ~torch.isfinite(hessian).flatten(1).all(1)
        hessian = torch.where(broken[:, None, None], torch.eye(size, dtype=dtype, device=device), hessian)
        eigenvalues, vectors = torch.linalg.eigh(hessian)
        magnitude = eigenvalues.abs()
        scale = magnitude.amax(1).clamp_min(torch.finfo(dtype).tiny)
        along = (vectors.transpose(1, 2) @ gradient.unsqueeze(2)).squeeze(2)
        accepted = broken.clone()
        moved_to, lowered_to = u.clone(), value.clone()
        damped_won = torch.ones_like(accepted)
        regular = problem.regular_columns()
        for trial in range(MAX_TRIALS):
            # a damped step; after the first failure also the undamped step, halved, and after
            # HALVINGS_FIRST failures each eigendirection's own Newton step, shortened, the lowest of
            # them taken: damping relative to the largest eigenvalue all but stops a badly scaled
            # problem (an indefinite Hessian far from the optimum), where a shorter Newton step
            # still goes far; at a kink (a Laplace location) every step along the full one fails
            # while another parameter can still move
            coefficients = -along / (magnitude + (damping * scale)[:, None])
            steps = [(vectors @ coefficients.unsqueeze(2)).squeeze(2)]
            newton = -along / magnitude.clamp_min(torch.finfo(dtype).tiny)
            if trial:
                steps.append((vectors @ (newton * 0.5**trial).unsqueeze(2)).squeeze(2))
            if trial > HALVINGS_FIRST:
                shorten = 0.5 ** (trial - HALVINGS_FIRST - 1)
                steps += [vectors[:, :, k] * newton[:, k : k + 1] * shorten for k in range(size)]
            still_open = ~accepted
            for j, candidate_step in enumerate(steps):
                before = lowered_to
                moved_to, lowered_to = _try(problem, rows, u + candidate_step, still_open, moved_to, lowered_to)
                damped_won = torch.where(lowered_to < before, j == 0, damped_won)
            accepted = accepted | (lowered_to < value)
            if bool(accepted.all()):
                break
            damping = torch.where(accepted, damping, damping * 10)
        if 0 < len(regular) < size and not bool(accepted.all()):
            # the last resort before a row stalls at a kink, where every step that moves the kinked
            # parameter fails: the Newton step of the regular parameters alone (a Laplace scale)
            alone = _subspace_newton(gradient, hessian, regular)
            for halving in range(MAX_TRIALS):
                moved_to, lowered_to = _try(problem, rows, u + alone * 0.5**halving, ~accepted, moved_to, lowered_to)
                damped_won = damped_won & ~(lowered_to < value)
                accepted = accepted | (lowered_to < value)
                if bool(accepted.all()):
                    break
        ftol = 4 * torch.finfo(dtype).eps
        settled = (
            accepted & ((value - lowered_to).abs() <= ftol * value.abs().clamp_min(1.0)) & (damping <= DAMPING_START)
        )
        # a shortened undamped step that lowers the NLL says that the Hessian is right and the step
        # too long: the next step starts undamped again rather than crawling down a large damping
        damping = torch.where(accepted, (damping / 10).clamp_min(DAMPING_MIN), damping)
        damping = torch.where(accepted & ~damped_won, torch.full_like(damping, DAMPING_START), damping)
        self.damping[rows] = damping.double().cpu()
        problem.set_flat(rows, moved_to)
        ended = []
        for i, row in enumerate(rows.tolist()):
            if bool(broken[i]):
                ended.append((row, Outcome.FAILED, "the Hessian is not finite"))
            elif not bool(accepted[i]):
                ended.append((row, Outcome.CHANGE, "no damped Newton step lowers the NLL"))
            elif bool(settled[i]):
                ended.append((row, Outcome.CHANGE, "relative change at rounding level"))
        return ended


def _try(
    problem, rows: Tensor, candidate: Tensor, still_open: Tensor, moved_to: Tensor, lowered_to: Tensor
) -> tuple[Tensor, Tensor]:
    """Each row still open moves to `candidate` where its objective there is below the lowest
    found so far (at first, the row's current value)."""
    with torch.no_grad():
        trial_value = problem.objective(rows, candidate)
    better = still_open & torch.isfinite(trial_value) & (trial_value < lowered_to)
    return torch.where(better[:, None], candidate, moved_to), torch.where(better, trial_value, lowered_to)


def _subspace_newton(gradient: Tensor, hessian: Tensor, columns: list[int]) -> Tensor:
    """The Newton step in `columns` alone (on the absolute eigenvalues of their Hessian), the other
    coordinates held."""
    index = torch.tensor(columns, device=gradient.device)
    sub = hessian.index_select(1, index).index_select(2, index)
    eigenvalues, vectors = torch.linalg.eigh(sub)
    along = (vectors.transpose(1, 2) @ gradient.index_select(1, index).unsqueeze(2)).squeeze(2)
    step = (vectors @ (-along / eigenvalues.abs().clamp_min(torch.finfo(gradient.dtype).tiny)).unsqueeze(2)).squeeze(2)
    return torch.zeros_like(gradient).index_copy(1, index, step)


def autograd_derivatives(objective: Callable[[Tensor], Tensor], u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's objective, gradient and Hessian: the rows are independent, so the gradient of the
    sum holds every row's gradient, and so do its derivatives."""
    with torch.enable_grad():
        u = u.detach().requires_grad_(True)
        value = objective(u)
        (gradient,) = torch.autograd.grad(value.sum(), u, create_graph=True)
        columns = [
            torch.autograd.grad(gradient[:, j].sum(), u, retain_graph=j < u.shape[1] - 1)[0] for j in range(u.shape[1])
        ]
    return value.detach(), gradient.detach(), torch.stack(columns, 1).detach()


def warn_unless_converged(outcome: Outcome, message: str, description: str) -> None:
    """A `ConvergenceWarning` for library callers, as scikit-learn gives; the result says it too."""
    if not outcome.converged:
        warnings.warn(f"{description}: {message}", ConvergenceWarning, stacklevel=3)
