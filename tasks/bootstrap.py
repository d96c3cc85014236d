"""The bootstrap: B refits on resampled data as one batched tensor program.

A nonparametric resample draws the rows (exact and censored) with replacement, with probabilities
proportional to their frequency weights; it is represented by a (B, rows) matrix of counts that
serves as frequency weights on the unchanged data. A parametric resample draws B samples of the
same size from the fitted distribution, a (B, n) tensor. Either way every parameter gets a leading
batch dimension and `Observations.log_likelihood` returns one value per resample, so the B refits
are one objective whose gradient separates: a damped Newton method (Levenberg–Marquardt on the
absolute eigenvalues of each resample's small Hessian, which also steps downhill where a Hessian is
not positive definite) runs all of them at once, from the original estimate.

Percentile intervals come from the refitted estimates. The parametric bootstrap also gives
goodness-of-fit p-values that account for the estimated parameters: the KS, Cramér–von Mises and
Anderson–Darling statistics of each simulated sample against its own refit, against the observed
statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence, get_args

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tasks.censoring import CensoredRows, has_tails, log_tails
from tasks.errors import InputError
from tasks.evaluation import edf_statistics, goodness_of_fit
from tasks.families import Family
from tasks.fitting import FitResult, Observations, ParameterSpace, Tolerances

Kind = Literal["nonparametric", "parametric"]
KINDS: tuple[str, ...] = get_args(Kind)
MAX_ITERATIONS = 200
MAX_TRIALS = 40
# damping of the Newton step, relative to the largest absolute eigenvalue of a resample's Hessian
DAMPING_START, DAMPING_MIN = 1e-8, 1e-12
# tensor elements (resamples × rows) per batch: bounds the memory of one objective evaluation
MAX_ELEMENTS = 4_000_000


@dataclass
class BootstrapResult:
    """`estimates`: one row per resample, one column per free parameter (NaN where a refit did not
    converge); `intervals`: percentile intervals at `level`; `stderr`: the estimates' standard
    deviations; `gof_pvalue`: parametric-bootstrap p-values of the EDF statistics."""

    kind: str
    replicates: int
    level: float
    seed: int
    estimates: pd.DataFrame
    converged: int
    intervals: dict[str, tuple[float, float]]
    stderr: dict[str, float]
    gof_pvalue: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        values = {"bootstrap_converged": float(self.converged)}
        values.update({f"bootstrap_se_{k}": v for k, v in self.stderr.items()})
        values.update({f"gof_pvalue_{k}": v for k, v in self.gof_pvalue.items()})
        return values

    def summary(self) -> dict:
        return {"kind": self.kind, "replicates": self.replicates, "level": self.level, "seed": self.seed,
                "converged": self.converged, "intervals": self.intervals, "stderr": self.stderr,
                "gof_pvalue": self.gof_pvalue}


@dataclass
class BatchFit:
    """Refits of one batch: natural values of every parameter with a leading batch dimension for
    the free ones, the mean NLL and whether each refit converged."""

    natural: dict[str, Tensor]
    mean_nll: Tensor
    converged: Tensor


def check_bootstrap(family: Family, observations: Observations, free: Sequence[str], kind: str) -> None:
    """Refuse, in one line and before any fit, what this bootstrap cannot do."""
    if kind not in KINDS:
        raise InputError(f"unknown bootstrap kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "parametric" and observations.censored is not None:
        raise InputError("a parametric bootstrap of censored data needs a model of the censoring; "
                         "use the nonparametric bootstrap")
    on_bound = [name for name in family.non_regular if name in free] if family.polish is not None else []
    if on_bound:
        raise InputError(
            f"no bootstrap for {family.name} with {', '.join(on_bound)} free: its MLE sits on the data, where "
            f"the bootstrap is inconsistent; fix {', '.join(on_bound)} (--fix) or drop the bootstrap"
        )


def draw_resamples(
    family: Family, observations: Observations, natural: Mapping[str, Tensor], kind: Kind, count: int,
    generator: torch.Generator,
) -> Observations:
    """`count` resamples as one batched Observations (counts as weights, or a (count, n) sample)."""
    size = round(observations.total_weight)
    if kind == "parametric":
        dist = family.build(**natural, validate_args=False)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        device = observations.values.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            values = dist.sample((count, size)).to(observations.values.dtype)
        return Observations(values)
    exact = observations.values.numel()
    weights = [observations.weights if observations.weights is not None else torch.ones_like(observations.values)]
    censored = observations.censored
    if censored is not None:
        weights.append(censored.weights if censored.weights is not None else torch.ones_like(censored.low))
    probabilities = torch.cat(weights).double().cpu()
    drawn = torch.multinomial(probabilities, count * size, replacement=True, generator=generator).reshape(count, size)
    counts = torch.zeros(count, len(probabilities), dtype=observations.values.dtype)
    counts.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=counts.dtype))
    counts = counts.to(observations.values.device)
    rows = None
    if censored is not None:
        rows = CensoredRows(censored.low, censored.high, counts[:, exact:])
    return Observations(observations.values, counts[:, :exact], rows)


def fit_batch(space: ParameterSpace, batch: Observations, start: Mapping[str, Tensor], count: int,
              tolerances: Tolerances) -> BatchFit:
    """Refit the free parameters of `space` to each of the `count` resamples in `batch` at once,
    all starting from `start` (natural values)."""
    family = space.family
    optimised = space.optimised
    shapes = [space.shapes[name] for name in optimised]
    sizes = [math.prod(shape) for shape in shapes]
    size = _resample_size(batch)

    def natural_of(u: Tensor | None) -> dict[str, Tensor]:
        if not optimised:
            return space.natural({})
        pieces = {name: piece.reshape(count, *shape) for name, piece, shape in zip(optimised, u.split(sizes, 1), shapes)}
        return space.natural(pieces)

    def objective(u: Tensor | None) -> Tensor:
        natural = natural_of(u)
        # a batch dimension in front of the rows: (count, 1, *shape) broadcasts against (rows,)
        params = {name: value.unsqueeze(1) if name in optimised else value for name, value in natural.items()}
        return -batch.log_likelihood(family, params) / size

    unconstrained = space.unconstrained(dict(start))
    u = torch.cat([unconstrained[name].reshape(1, -1).expand(count, -1) for name in optimised], 1) if optimised else None
    if u is None:  # nothing to refit: every parameter is fixed
        with torch.no_grad():
            mean_nll = objective(u)
        return BatchFit(natural_of(u), mean_nll, torch.isfinite(mean_nll))
    u, converged = _newton(objective, u.clone(), tolerances)
    with torch.no_grad():
        return BatchFit(natural_of(u), objective(u), converged)


def _resample_size(batch: Observations) -> Tensor | float:
    if batch.weights is None and batch.censored is None:
        return float(batch.values.shape[-1])
    total = batch.weights.sum(-1) if batch.weights is not None else 0.0
    if batch.censored is not None:
        total = total + batch.censored.total_weight
    return total


def _derivatives(objective, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each resample's objective, gradient and Hessian: the resamples are independent, so the
    gradient of the sum holds every resample's gradient, and so do its derivatives."""
    with torch.enable_grad():
        u = u.detach().requires_grad_(True)
        value = objective(u)
        (gradient,) = torch.autograd.grad(value.sum(), u, create_graph=True)
        columns = [
            torch.autograd.grad(gradient[:, j].sum(), u, retain_graph=j < u.shape[1] - 1)[0] for j in range(u.shape[1])
        ]
    return value.detach(), gradient.detach(), torch.stack(columns, 1).detach()


def _newton(objective, u: Tensor, tolerances: Tolerances) -> tuple[Tensor, Tensor]:
    """Damped Newton steps on every resample at once until each one's gradient is below gtol, its
    objective stops changing, or no damped step lowers it (a numerical minimum, e.g. at a kink)."""
    count = u.shape[0]
    ftol = 4 * torch.finfo(u.dtype).eps
    done = torch.zeros(count, dtype=torch.bool, device=u.device)
    converged = torch.zeros_like(done)
    damping = torch.full((count,), DAMPING_START, dtype=u.dtype, device=u.device)
    identity = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    for _ in range(MAX_ITERATIONS):
        value, gradient, hessian = _derivatives(objective, u)
        finite = torch.isfinite(value) & torch.isfinite(gradient).all(1) & torch.isfinite(hessian).flatten(1).all(1)
        small = finite & (gradient.abs().amax(1) <= tolerances.gtol)
        converged |= small & ~done
        done |= small | ~finite
        if bool(done.all()):
            break
        hessian = torch.where(done[:, None, None], identity, hessian)
        eigenvalues, vectors = torch.linalg.eigh(hessian)
        magnitude = eigenvalues.abs()
        scale = magnitude.amax(1).clamp_min(torch.finfo(u.dtype).tiny)
        along = (vectors.transpose(1, 2) @ gradient.unsqueeze(2)).squeeze(2)
        accepted = done.clone()
        moved_to, lowered_to = u.clone(), value.clone()
        for trial in range(MAX_TRIALS):
            # a damped step; after the first failure also each eigendirection's own Newton step, shortened:
            # at a kink (a Laplace location) the full step fails while another parameter can still move
            coefficients = -along / (magnitude + (damping * scale)[:, None])
            steps = [(vectors @ coefficients.unsqueeze(2)).squeeze(2)]
            if trial:
                newton = -along / magnitude.clamp_min(torch.finfo(u.dtype).tiny) * 0.5 ** (trial - 1)
                steps += [vectors[:, :, k] * newton[:, k : k + 1] for k in range(u.shape[1])]
            for step in steps:
                candidate = u + step
                with torch.no_grad():
                    trial_value = objective(candidate)
                better = ~accepted & torch.isfinite(trial_value) & (trial_value < value)
                moved_to = torch.where(better[:, None], candidate, moved_to)
                lowered_to = torch.where(better, trial_value, lowered_to)
                accepted |= better
            if bool(accepted.all()):
                break
            damping = torch.where(accepted, damping, damping * 10)
        stalled = ~accepted
        moved = accepted & ~done
        settled = moved & ((value - lowered_to).abs() <= ftol * value.abs().clamp_min(1.0)) & (damping <= DAMPING_START)
        converged |= (stalled | settled) & ~done
        done |= stalled | settled
        damping = torch.where(moved, (damping / 10).clamp_min(DAMPING_MIN), damping)
        u = moved_to
    return u, converged


def _labelled(space: ParameterSpace, natural: Mapping[str, Tensor], count: int) -> dict[str, np.ndarray]:
    columns = {}
    for name in space.free:
        labels = space.labels([name])
        values = natural[name].detach().reshape(count, -1).double().cpu().numpy()
        columns.update({label: values[:, i] for i, label in enumerate(labels)})
    return columns


def bootstrap(
    family: Family,
    observations: Observations,
    result: FitResult,
    *,
    replicates: int,
    kind: Kind = "nonparametric",
    seed: int = 0,
    level: float = 0.95,
    fixed: Mapping[str, float | list[float]] | None = None,
) -> BootstrapResult:
    """Percentile intervals (and, for the parametric kind, goodness-of-fit p-values) from
    `replicates` batched refits of `result`'s free parameters; `fixed` as in the original fit."""
    check_bootstrap(family, observations, result.free_params, kind)
    if replicates < 2:
        raise InputError(f"a bootstrap needs at least 2 replicates, got {replicates}")
    if not 0 < level < 1:
        raise InputError(f"the interval level must lie in (0, 1), got {level}")
    space = ParameterSpace(family, observations, fixed=fixed)
    start = {name: result.natural[name] for name in family.params}
    tolerances = Tolerances.for_settings(observations.values.dtype, "lbfgs", None, None)
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, round(observations.total_weight) if kind == "parametric" else
               observations.values.numel() + (0 if observations.censored is None else len(observations.censored)))
    per_batch = max(1, MAX_ELEMENTS // rows)
    with_gof = (kind == "parametric" and not family.discrete and observations.censored is None
                and has_tails(type(family.build(**result.natural, validate_args=False))))
    columns: dict[str, list[np.ndarray]] = {}
    statistics: dict[str, list[np.ndarray]] = {}
    converged_total = 0
    for first in range(0, replicates, per_batch):
        count = min(per_batch, replicates - first)
        batch = draw_resamples(family, observations, result.natural, kind, count, generator)
        fitted = fit_batch(space, batch, start, count, tolerances)
        ok = fitted.converged.cpu().numpy()
        converged_total += int(ok.sum())
        for label, values in _labelled(space, fitted.natural, count).items():
            columns.setdefault(label, []).append(np.where(ok, values, np.nan))
        if with_gof:
            for name, values in _batch_statistics(family, batch, fitted, space.optimised).items():
                statistics.setdefault(name, []).append(np.where(ok, values, np.nan))
    estimates = pd.DataFrame({label: np.concatenate(parts) for label, parts in columns.items()})
    tail = (1 - level) / 2
    intervals, stderr = {}, {}
    for label in estimates.columns:
        good = estimates[label].dropna().to_numpy()
        intervals[label] = (float(np.quantile(good, tail)), float(np.quantile(good, 1 - tail))) if len(good) else (math.nan, math.nan)
        stderr[label] = float(good.std(ddof=1)) if len(good) > 1 else math.nan
    gof_pvalue = {}
    if with_gof:
        observed = goodness_of_fit(family, observations, result)
        for name, parts in statistics.items():
            simulated = np.concatenate(parts)
            simulated = simulated[np.isfinite(simulated)]
            gof_pvalue[name] = float((1 + np.sum(simulated >= observed[name])) / (1 + len(simulated)))
    return BootstrapResult(kind, replicates, level, seed, estimates, converged_total, intervals, stderr, gof_pvalue)


def _batch_statistics(family: Family, batch: Observations, fitted: BatchFit, optimised: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The EDF statistics of each simulated sample against its own refit."""
    params = {name: value.unsqueeze(1) if name in optimised else value for name, value in fitted.natural.items()}
    dist = family.build(**params, validate_args=False)
    with torch.no_grad():
        log_cdf, log_sf = log_tails(dist, batch.values.sort(-1).values)
    return edf_statistics(log_cdf.double().cpu().numpy(), log_sf.double().cpu().numpy())
