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

from nllflow.errors import InputError
from nllflow.evaluation.goodness import edf_statistics, goodness_of_fit
from nllflow.families import Family
from nllflow.fitting.engine import NewtonStep, RowSettings, Tolerances, minimise
from nllflow.fitting.mle import FitResult
from nllflow.likelihood.censoring import CensoredRows
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import ConstantModel, ConstantProblem

Kind = Literal["nonparametric", "parametric"]
KINDS: tuple[str, ...] = get_args(Kind)
MAX_ITERATIONS = 200
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
        return {
            "kind": self.kind,
            "replicates": self.replicates,
            "level": self.level,
            "seed": self.seed,
            "converged": self.converged,
            "intervals": self.intervals,
            "stderr": self.stderr,
            "gof_pvalue": self.gof_pvalue,
        }


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
        raise InputError(
            "a parametric bootstrap of censored data needs a model of the censoring; use the nonparametric bootstrap"
        )
    if kind == "parametric" and observations.features and observations.weights is not None:
        raise InputError(
            "a parametric bootstrap of a weighted regression is not defined here; use the nonparametric one"
        )
    on_bound = [name for name in family.non_regular if name in free] if family.polish is not None else []
    if on_bound:
        raise InputError(
            f"no bootstrap for {family.name} with {', '.join(on_bound)} free: its MLE sits on the data, where "
            f"the bootstrap is inconsistent; fix {', '.join(on_bound)} (--fix) or drop the bootstrap"
        )


def draw_resamples(
    family: Family,
    observations: Observations,
    natural: Mapping[str, Tensor],
    kind: Kind,
    count: int,
    generator: torch.Generator,
) -> Observations:
    """`count` resamples as one batched Observations (counts as weights, or a (count, n) sample); a
    regression's (`natural` per row) keep their covariates, a parametric one draws each row from its
    own distribution."""
    size = round(observations.total_weight)
    if kind == "parametric":
        per_row = bool(observations.features)
        dist = family.build(**natural, validate_args=False)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        device = observations.values.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            values = dist.sample((count,) if per_row else (count, size)).to(observations.values.dtype)
        return Observations(values, features=observations.features)
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
    return Observations(observations.values, counts[:, :exact], rows, observations.features)


def fit_batch(
    model: ConstantModel, batch: Observations, start: Mapping[str, Tensor], count: int, tolerances: Tolerances
) -> BatchFit:
    """Refit the free parameters of `model` to each of the `count` resamples in `batch` at once,
    all starting from `start` (natural values): damped Newton steps in the one loop."""
    problem = ConstantProblem(model, batch, rows=count, starts=[dict(start)] * count)
    # Newton's own test of a settled objective (a change at rounding level) replaces ftol
    limits = RowSettings.of([Tolerances(tolerances.gtol, 0.0)] * count, [MAX_ITERATIONS] * count, torch.float64)
    runs = minimise(problem, NewtonStep(problem), limits, trace=False)
    with torch.no_grad():
        everyone = problem.assemble(torch.arange(count))
        natural = model.natural(everyone)
        mean_nll = problem.mean_nll(torch.arange(count), natural)
    converged = torch.tensor([run.outcome.converged for run in runs], device=batch.device)
    natural = {name: value.squeeze(1) if name in model.optimised else value for name, value in natural.items()}
    return BatchFit(natural, mean_nll, converged)


def _regression_bootstrap(
    family: Family, observations: Observations, result: FitResult, replicates: int, kind: Kind, seed: int, level: float
) -> BootstrapResult:
    """The bootstrap of a regression: resampled rows (with their covariates) or responses drawn at
    each row's fitted distribution, every resample's coefficients refitted by Newton from the fit."""
    from nllflow.evaluation.regression import estimates as reported
    from nllflow.models.linear import LinearProblem

    model = result.model
    tolerances = Tolerances.for_settings(observations.values.dtype, "lbfgs", None, None)
    generator = torch.Generator().manual_seed(seed)
    per_batch = max(1, MAX_ELEMENTS // max(1, observations.n_rows * max(1, model.size)))
    start = {name: value.reshape(1, -1) for name, value in result.standardised.items()}
    labels = list(reported(result))
    columns: list[np.ndarray] = []
    converged_total = 0
    for first in range(0, replicates, per_batch):
        count = min(per_batch, replicates - first)
        batch = draw_resamples(family, observations, result.natural, kind, count, generator)
        problem = LinearProblem(model, batch, [start] * count)
        limits = RowSettings.of([Tolerances(tolerances.gtol, 0.0)] * count, [MAX_ITERATIONS] * count, torch.float64)
        runs = minimise(problem, NewtonStep(problem), limits, trace=False)
        ok = np.array([run.outcome.converged for run in runs])
        converged_total += int(ok.sum())
        values = np.empty((count, len(labels)))
        for row in range(count):
            coefficients = problem.coefficients_of(row)
            at = 0
            for name in model.optimised:
                original = model.original(name, coefficients[name].double().cpu())[0]
                if name in model.formula_parameters:
                    values[row, at : at + len(original)] = original.numpy()
                    at += len(original)
                else:
                    values[row, at] = float(model.predictors[name].link.inverse(original[0]))
                    at += 1
        columns.append(np.where(ok[:, None], values, np.nan))
    estimates = pd.DataFrame(np.concatenate(columns), columns=labels)
    intervals, stderr = _percentiles(estimates, level)
    return BootstrapResult(kind, replicates, level, seed, estimates, converged_total, intervals, stderr, {})


def _percentiles(estimates: pd.DataFrame, level: float) -> tuple[dict, dict]:
    tail = (1 - level) / 2
    intervals, stderr = {}, {}
    for label in estimates.columns:
        good = estimates[label].dropna().to_numpy()
        intervals[label] = (
            (float(np.quantile(good, tail)), float(np.quantile(good, 1 - tail))) if len(good) else (math.nan, math.nan)
        )
        stderr[label] = float(good.std(ddof=1)) if len(good) > 1 else math.nan
    return intervals, stderr


def _labelled(model: ConstantModel, natural: Mapping[str, Tensor], count: int) -> dict[str, np.ndarray]:
    columns = {}
    for name in model.free:
        labels = model.labels([name])
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
    if result.model is not None:
        return _regression_bootstrap(family, observations, result, replicates, kind, seed, level)
    model = ConstantModel(family, observations, fixed=fixed)
    start = {name: result.natural[name] for name in family.params}
    tolerances = Tolerances.for_settings(observations.values.dtype, "lbfgs", None, None)
    generator = torch.Generator().manual_seed(seed)
    rows = max(
        1,
        round(observations.total_weight)
        if kind == "parametric"
        else observations.values.numel() + (0 if observations.censored is None else len(observations.censored)),
    )
    per_batch = max(1, MAX_ELEMENTS // rows)
    with_gof = kind == "parametric" and not family.discrete and observations.censored is None and family.has_tails
    columns: dict[str, list[np.ndarray]] = {}
    statistics: dict[str, list[np.ndarray]] = {}
    converged_total = 0
    for first in range(0, replicates, per_batch):
        count = min(per_batch, replicates - first)
        batch = draw_resamples(family, observations, result.natural, kind, count, generator)
        fitted = fit_batch(model, batch, start, count, tolerances)
        ok = fitted.converged.cpu().numpy()
        converged_total += int(ok.sum())
        for label, values in _labelled(model, fitted.natural, count).items():
            columns.setdefault(label, []).append(np.where(ok, values, np.nan))
        if with_gof:
            for name, values in _batch_statistics(family, batch, fitted, model.optimised).items():
                statistics.setdefault(name, []).append(np.where(ok, values, np.nan))
    estimates = pd.DataFrame({label: np.concatenate(parts) for label, parts in columns.items()})
    intervals, stderr = _percentiles(estimates, level)
    gof_pvalue = {}
    if with_gof:
        observed = goodness_of_fit(family, observations, result)
        for name, parts in statistics.items():
            simulated = np.concatenate(parts)
            simulated = simulated[np.isfinite(simulated)]
            gof_pvalue[name] = float((1 + np.sum(simulated >= observed[name])) / (1 + len(simulated)))
    return BootstrapResult(kind, replicates, level, seed, estimates, converged_total, intervals, stderr, gof_pvalue)


def _batch_statistics(
    family: Family, batch: Observations, fitted: BatchFit, optimised: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """The EDF statistics of each simulated sample against its own refit."""
    params = {name: value.unsqueeze(1) if name in optimised else value for name, value in fitted.natural.items()}
    dist = family.build(**params, validate_args=False)
    with torch.no_grad():
        log_cdf, log_sf = family.log_tails(dist, batch.values.sort(-1).values)
    return edf_statistics(log_cdf.double().cpu().numpy(), log_sf.double().cpu().numpy())
