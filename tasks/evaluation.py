"""How good a fit is: uncertainty from the observed information, information criteria, goodness of
fit, held-out NLL and recovery error against a known truth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from tasks.censoring import has_tails, log_tails
from tasks.families import Family
from tasks.fitting import FitResult, Observations, flat_labels

if TYPE_CHECKING:
    from tasks.bootstrap import BootstrapResult

Z_95 = float(stats.norm.ppf(0.975))


@dataclass
class Evaluation:
    """Everything computed about a finished fit. Standard errors are NaN where they do not exist
    (a parameter at a data bound or a kink, or an observed information that is not positive
    definite); `information` says which."""

    n: int
    k: int
    nll: float
    mean_nll: float
    aic: float
    bic: float
    grad_norm: float
    stderr: dict[str, float]
    ci95: dict[str, tuple[float, float]]
    correlation: dict[str, dict[str, float]]
    information: str
    gof: dict[str, float]
    heldout_nll: float | None = None
    heldout_mean_nll: float | None = None
    recovery: dict[str, float] = field(default_factory=dict)
    bootstrap: BootstrapResult | None = None

    def metrics(self) -> dict[str, float]:
        """Flat numeric summary (for MLflow metrics and JSON)."""
        values = {"nll": self.nll, "mean_nll": self.mean_nll, "aic": self.aic, "bic": self.bic,
                  "grad_norm": self.grad_norm, **{f"gof_{k}": v for k, v in self.gof.items()}}
        values.update({f"se_{k}": v for k, v in self.stderr.items()})
        values.update({f"abs_error_{k}": v for k, v in self.recovery.items()})
        if self.heldout_nll is not None:
            values.update(heldout_nll=self.heldout_nll, heldout_mean_nll=self.heldout_mean_nll)
        if self.bootstrap is not None:
            values.update(self.bootstrap.metrics())
        return values


def jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def fit_summary(result: FitResult, evaluation: Evaluation | None) -> dict[str, Any]:
    """The CLI's JSON contract: family, params, stderr, ci95, nll, n, converged, reason, steps,
    aic, bic, and the rest of the evaluation."""
    summary: dict[str, Any] = {
        "family": result.family,
        "params": result.params,
        "fixed": sorted(result.fixed),
        "converged": result.converged,
        "reason": result.reason,
        "steps": result.steps,
        "nll": result.nll,
        "mean_nll": result.mean_nll,
        "optimizer": result.optimizer,
        "lr": result.lr,
    }
    if evaluation is not None:
        summary.update(
            n=evaluation.n, k=evaluation.k, stderr=evaluation.stderr, ci95=evaluation.ci95, aic=evaluation.aic,
            bic=evaluation.bic, gof=evaluation.gof, grad_norm=evaluation.grad_norm, information=evaluation.information,
            correlation=evaluation.correlation, heldout_nll=evaluation.heldout_nll,
            heldout_mean_nll=evaluation.heldout_mean_nll, recovery=evaluation.recovery,
        )
        if evaluation.bootstrap is not None:
            summary["bootstrap"] = evaluation.bootstrap.summary()
    return jsonable(summary)


def evaluate_fit(
    family: Family,
    observations: Observations,
    result: FitResult,
    *,
    heldout: Observations | None = None,
    truth: Mapping[str, float] | None = None,
) -> Evaluation:
    n = int(round(observations.total_weight))
    k = len(result.free)
    stderr, correlation, information = observed_information(family, observations, result)
    ci95 = {label: (result.params[label] - Z_95 * se, result.params[label] + Z_95 * se) for label, se in stderr.items()}
    evaluation = Evaluation(
        n=n,
        k=k,
        nll=result.nll,
        mean_nll=result.mean_nll,
        aic=2 * k + 2 * result.nll,
        bic=k * math.log(n) + 2 * result.nll,
        grad_norm=result.grad_norm,
        stderr=stderr,
        ci95=ci95,
        correlation=correlation,
        information=information,
        gof=goodness_of_fit(family, observations, result),
    )
    if heldout is not None and heldout.total_weight > 0:
        evaluation.heldout_nll = float(-heldout.log_likelihood(family, result.natural))
        evaluation.heldout_mean_nll = evaluation.heldout_nll / heldout.total_weight
    if truth:
        evaluation.recovery = {
            label: abs(result.params[label] - value) for label, value in truth.items() if label in result.params
        }
    return evaluation


def observed_information(
    family: Family, observations: Observations, result: FitResult
) -> tuple[dict[str, float], dict[str, dict[str, float]], str]:
    """Standard errors and correlations from the inverse of the autograd Hessian of the total NLL
    at the estimate, over the free, regular natural parameters.

    The Hessian is scaled to unit diagonal before it is factorised, so badly scaled problems
    (a rate of 1e-6 beside a shape of 1e3) do not lose their standard errors to rounding.
    """
    regular = [name for name in result.free_params if name not in family.non_regular]
    labels = [label for name in regular for label in flat_labels(name, tuple(result.natural[name].shape))]
    stderr = {label: math.nan for label in result.free}
    if not regular:
        return stderr, {}, "no regular free parameters"
    sizes = [result.natural[name].numel() for name in regular]

    def total_nll(flat: Tensor) -> Tensor:
        pieces = dict(zip(regular, torch.split(flat, sizes)))
        params = {
            name: pieces[name].reshape(result.natural[name].shape) if name in pieces else result.natural[name]
            for name in family.params
        }
        return -observations.log_likelihood(family, params)

    point = torch.cat([result.natural[name].reshape(-1) for name in regular]).detach()
    hessian = torch.autograd.functional.hessian(total_nll, point).detach().double().cpu()
    if not bool(torch.isfinite(hessian).all()):
        return stderr, {}, "observed information is not finite at the estimate"
    scale = hessian.diagonal().abs().sqrt().clamp_min(1e-300)
    # one factor at a time: the outer product of two tiny (or huge) scales under- or overflows
    scaled = hessian / scale[:, None] / scale[None, :]
    factor, info = torch.linalg.cholesky_ex(scaled)
    if int(info) != 0:
        smallest = float(torch.linalg.eigvalsh(scaled)[0])
        return stderr, {}, (
            f"observed information is not positive definite (smallest scaled eigenvalue {smallest:.3g}): "
            "the estimate is not a strict local maximum, standard errors unavailable"
        )
    covariance = torch.cholesky_inverse(factor) / scale[:, None] / scale[None, :]
    se = covariance.diagonal().sqrt()
    corr = covariance / torch.outer(se, se)
    stderr.update(zip(labels, se.tolist()))
    correlation = {a: dict(zip(labels, row)) for a, row in zip(labels, corr.tolist())}
    skipped = [name for name in result.free_params if name in family.non_regular]
    note = f"; no Wald interval for {', '.join(skipped)} (MLE at a data bound or kink)" if skipped else ""
    return stderr, correlation, "ok" + note


def goodness_of_fit(family: Family, observations: Observations, result: FitResult) -> dict[str, float]:
    """KS, Cramér–von Mises and Anderson–Darling statistics for continuous families (with frequency
    weights, those of the sample expanded by its weights); a pooled chi-square statistic with its
    degrees of freedom and p-value for discrete ones. None for censored data, which has no
    empirical distribution function of exact points, or for a family without a cdf."""
    if family.discrete:
        return _chi_square(family, observations, result)
    natural = {name: value.detach() for name, value in result.natural.items()}
    dist = family.build(**natural, validate_args=False)
    if observations.censored is not None or not has_tails(type(dist)):
        return {}
    order = torch.argsort(observations.values)
    with torch.no_grad():
        log_cdf, log_sf = log_tails(dist, observations.values[order])
    weights = None if observations.weights is None else observations.weights[order].double().cpu().numpy()
    statistics = edf_statistics(log_cdf.double().cpu().numpy(), log_sf.double().cpu().numpy(), weights)
    return {name: float(value) for name, value in statistics.items()}


def edf_statistics(log_cdf: np.ndarray, log_sf: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """KS, Cramér–von Mises and Anderson–Darling statistics from the fitted log F and log S at the
    sorted data (the last axis; leading axes are independent samples). A point of weight w stands
    for w tied points: it covers the ranks before+1 … before+w, whose sums are taken in closed form
    (for whole weights exactly the statistics of the expanded sample)."""
    cdf = np.exp(log_cdf)
    w = np.ones_like(cdf) if weights is None else np.broadcast_to(weights, cdf.shape)
    after = np.cumsum(w, axis=-1)
    before = after - w
    n = after[..., -1:]
    ks = np.maximum(np.max(after / n - cdf, axis=-1), np.max(cdf - before / n, axis=-1))
    # Σ over the block of (F - (2i-1)/2n)²: the block's mean rank term and its spread w(w²-1)/3
    centre = (before + after) / (2 * n)
    cvm = 1 / (12 * n[..., 0]) + np.sum(w * (cdf - centre) ** 2 + w * (w * w - 1) / (12 * n * n), axis=-1)
    # Σ over the block of (2i-1) = w(before+after), of (2n+1-2i) = w(2n-before-after)
    ad = -n[..., 0] - np.sum(w * ((before + after) * log_cdf + (2 * n - before - after) * log_sf), axis=-1) / n[..., 0]
    return {"ks": ks, "cvm": cvm, "ad": ad}


MIN_EXPECTED = 5.0


def _chi_square(family: Family, observations: Observations, result: FitResult) -> dict[str, float]:
    values = observations.values.detach().double().cpu()
    weights = None if observations.weights is None else observations.weights.detach().double().cpu()
    top = int(values.max())
    counts = torch.bincount(values.long(), weights=weights, minlength=top + 1).numpy()
    natural = {name: v.detach().double().cpu() for name, v in result.natural.items()}
    dist = family.build(**natural, validate_args=False)
    support = torch.arange(top + 1, dtype=torch.float64)
    pmf = dist.log_prob(support).exp().numpy()
    n = counts.sum()
    expected = np.append(n * pmf, max(n * (1 - pmf.sum()), 0.0))
    observed = np.append(counts, 0.0)
    bins_o, bins_e, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed[::-1], expected[::-1]):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= MIN_EXPECTED:
            bins_o.append(acc_o)
            bins_e.append(acc_e)
            acc_o = acc_e = 0.0
    if bins_e:
        bins_o[-1] += acc_o
        bins_e[-1] += acc_e
    bins_o, bins_e = np.array(bins_o), np.array(bins_e)
    statistic = float(np.sum((bins_o - bins_e) ** 2 / bins_e)) if len(bins_e) else math.nan
    dof = len(bins_e) - 1 - len(result.free)
    p_value = float(stats.chi2.sf(statistic, dof)) if dof > 0 else math.nan
    return {"chi2": statistic, "chi2_dof": float(dof), "chi2_pvalue": p_value}
