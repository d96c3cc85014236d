"""How good a fit is: uncertainty from the observed information, information criteria, goodness of
fit, held-out NLL and recovery error against a known truth."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from nllflow.evaluation.goodness import goodness_of_fit
from nllflow.families import Family
from nllflow.fitting.mle import FitResult
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import flat_labels

if TYPE_CHECKING:
    from nllflow.fitting.bootstrap import BootstrapResult

Z_95 = statistics.NormalDist().inv_cdf(0.975)


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
    # a regression or a network: the global deviance (-2 log-likelihood) and the randomized quantile residuals
    deviance: float | None = None
    residuals: np.ndarray | None = field(default=None, repr=False)
    # the NLL of the rows of a test file, and a network's mean NLL on its validation rows
    test_nll: float | None = None
    test_mean_nll: float | None = None
    validation_mean_nll: float | None = None

    def gaic(self, penalty: float) -> float:
        """The generalised AIC of gamlss: deviance + penalty · (number of estimated parameters)."""
        return 2 * self.nll + penalty * self.k

    def metrics(self) -> dict[str, float]:
        """Flat numeric summary (for MLflow metrics and JSON)."""
        values = {
            "nll": self.nll,
            "mean_nll": self.mean_nll,
            "aic": self.aic,
            "bic": self.bic,
            "grad_norm": self.grad_norm,
            **{f"gof_{k}": v for k, v in self.gof.items()},
        }
        values.update({f"se_{k}": v for k, v in self.stderr.items()})
        values.update({f"abs_error_{k}": v for k, v in self.recovery.items()})
        if self.heldout_nll is not None:
            values.update(heldout_nll=self.heldout_nll, heldout_mean_nll=self.heldout_mean_nll)
        if self.test_nll is not None:
            values.update(test_nll=self.test_nll, test_mean_nll=self.test_mean_nll)
        if self.validation_mean_nll is not None:
            values.update(validation_mean_nll=self.validation_mean_nll)
        if self.deviance is not None:
            values.update(deviance=self.deviance, gaic_3=self.gaic(3.0))
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
    if result.model is not None:
        model = result.model
        summary["coefficients"] = result.coefficients
        summary["formulas"] = {name: p.design.formula for name, p in model.predictors.items()}
        summary["links"] = {name: p.link.name for name, p in model.predictors.items()}
    if getattr(result.model, "kind", None) == "network":
        model = result.model
        summary["network"] = {"terms": model.inputs.formula, "outputs": list(model.targets)}
        summary["links"].update({name: link.name for name, link in model.links.items()})
        summary["architecture"] = {**model.architecture.describe(), "weights": model.size}
        summary["epochs"] = result.steps
        summary["validation_mean_nll"] = result.validation_mean_nll
    if evaluation is not None and result.model is not None:
        from nllflow.evaluation.regression import coefficient_table

        summary["coef_stderr"] = {
            name: {term: evaluation.stderr.get(f"{name}:{term}", math.nan) for term in terms}
            for name, terms in result.coefficients.items()
        }
        summary["deviance"] = evaluation.deviance
        summary["gaic_3"] = evaluation.gaic(3.0)
        summary["coefficient_table"] = coefficient_table(result, evaluation.stderr).to_dict(orient="records")
    if evaluation is not None:
        summary.update(
            n=evaluation.n,
            k=evaluation.k,
            stderr=evaluation.stderr,
            ci95=evaluation.ci95,
            aic=evaluation.aic,
            bic=evaluation.bic,
            gof=evaluation.gof,
            grad_norm=evaluation.grad_norm,
            information=evaluation.information,
            correlation=evaluation.correlation,
            heldout_nll=evaluation.heldout_nll,
            heldout_mean_nll=evaluation.heldout_mean_nll,
            recovery=evaluation.recovery,
        )
        if evaluation.test_nll is not None:
            summary.update(test_nll=evaluation.test_nll, test_mean_nll=evaluation.test_mean_nll)
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
    validation: Observations | None = None,
    test: Observations | None = None,
) -> Evaluation:
    """The evaluation of a fit: a distribution's (observed information over the natural parameters,
    EDF statistics), a regression's (over the coefficients; randomized quantile residuals) or a
    network's (its residuals; no standard errors for weights, which are not identified); the NLL
    of held-out, validation and test rows."""
    from nllflow.evaluation import regression

    n = int(round(observations.total_weight))
    k = len(result.free)
    network = getattr(result.model, "kind", None) == "network"
    if network:
        k = result.model.size
        stderr, correlation = {}, {}
        information = "no standard errors for a network: its weights are not identified"
        estimates = regression.estimates(result)
        residuals = regression.quantile_residuals(family, observations, result.natural)
        gof = regression.residual_summary(residuals)
    elif result.model is not None:
        stderr, correlation, information = regression.information(result.model, observations, result)
        estimates = regression.estimates(result)
        residuals = regression.quantile_residuals(family, observations, result.natural)
        gof = regression.residual_summary(residuals)
    else:
        stderr, correlation, information = observed_information(family, observations, result)
        estimates, residuals = result.params, None
        gof = goodness_of_fit(family, observations, result)
    ci95 = {label: (estimates[label] - Z_95 * se, estimates[label] + Z_95 * se) for label, se in stderr.items()}
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
        gof=gof,
        deviance=2 * result.nll if result.model is not None else None,
        residuals=residuals,
    )
    if heldout is not None and heldout.total_weight > 0:
        evaluation.heldout_nll = heldout_nll(family, heldout, result)
        evaluation.heldout_mean_nll = evaluation.heldout_nll / heldout.total_weight
    if test is not None and test.total_weight > 0:
        evaluation.test_nll = heldout_nll(family, test, result)
        evaluation.test_mean_nll = evaluation.test_nll / test.total_weight
    if validation is not None and validation.total_weight > 0:
        evaluation.validation_mean_nll = heldout_nll(family, validation, result) / validation.total_weight
    if truth:
        evaluation.recovery = {
            label: abs(estimates[label] - value) for label, value in truth.items() if label in estimates
        }
    return evaluation


def heldout_nll(family: Family, observations: Observations, result: FitResult) -> float:
    """The total NLL of other observations (held out, a test file) under the fit; a regression's
    observations carry their own designs."""
    if result.model is None:
        return float(-observations.log_likelihood(family, result.natural))
    from nllflow.evaluation.regression import natural_for

    with torch.no_grad():
        return float(-observations.log_likelihood(family, natural_for(result, observations), per_row=True))


def invert_information(hessian: Tensor, labels: list[str]) -> tuple[dict[str, float], dict[str, dict[str, float]], str]:
    """Standard errors and correlations from an observed information matrix over `labels`.

    The Hessian is scaled to unit diagonal before it is factorised, so badly scaled problems
    (a rate of 1e-6 beside a shape of 1e3) do not lose their standard errors to rounding; one that
    is not finite or not positive definite is reported (the note), not hidden.
    """
    stderr = {label: math.nan for label in labels}
    hessian = hessian.detach().double().cpu()
    if not bool(torch.isfinite(hessian).all()):
        return stderr, {}, "observed information is not finite at the estimate"
    scale = hessian.diagonal().abs().sqrt().clamp_min(1e-300)
    # one factor at a time: the outer product of two tiny (or huge) scales under- or overflows
    scaled = hessian / scale[:, None] / scale[None, :]
    factor, info = torch.linalg.cholesky_ex(scaled)
    if int(info) != 0:
        smallest = float(torch.linalg.eigvalsh(scaled)[0])
        return (
            stderr,
            {},
            (
                f"observed information is not positive definite (smallest scaled eigenvalue {smallest:.3g}): "
                "the estimate is not a strict local maximum, standard errors unavailable"
            ),
        )
    covariance = torch.cholesky_inverse(factor) / scale[:, None] / scale[None, :]
    se = covariance.diagonal().sqrt()
    if not bool(torch.isfinite(se).all()):
        # a rate of 1e155 has a variance of 1e310: past float64, as is any data this far from 1
        return stderr, {}, "the standard errors overflow float64 at this scale of the data: rescale it"
    corr = covariance / torch.outer(se, se)
    stderr.update(zip(labels, se.tolist(), strict=True))
    correlation = {a: dict(zip(labels, row, strict=True)) for a, row in zip(labels, corr.tolist(), strict=True)}
    return stderr, correlation, "ok"


def observed_information(
    family: Family, observations: Observations, result: FitResult
) -> tuple[dict[str, float], dict[str, dict[str, float]], str]:
    """Standard errors and correlations from the inverse of the autograd Hessian of the total NLL
    at the estimate, over the free, regular natural parameters."""
    regular = [name for name in result.free_params if name not in family.non_regular]
    labels = [label for name in regular for label in flat_labels(name, tuple(result.natural[name].shape))]
    if not regular:
        return {label: math.nan for label in result.free}, {}, "no regular free parameters"
    sizes = [result.natural[name].numel() for name in regular]

    def total_nll(flat: Tensor) -> Tensor:
        pieces = dict(zip(regular, torch.split(flat, sizes), strict=True))
        params = {
            name: pieces[name].reshape(result.natural[name].shape) if name in pieces else result.natural[name]
            for name in family.params
        }
        return -observations.log_likelihood(family, params)

    point = torch.cat([result.natural[name].reshape(-1) for name in regular]).detach()
    stderr, correlation, note = invert_information(torch.autograd.functional.hessian(total_nll, point), labels)
    stderr = {**{label: math.nan for label in result.free}, **stderr}
    skipped = [name for name in result.free_params if name in family.non_regular]
    if skipped and note == "ok":
        note += f"; no Wald interval for {', '.join(skipped)} (MLE at a data bound or kink)"
    return stderr, correlation, note


def fit_table(result: FitResult, evaluation: Evaluation | None, truth: Mapping[str, float] | None) -> pd.DataFrame:
    """One row per parameter: estimate, SE, 95% CI, whether fixed, truth when known, and with a
    bootstrap its standard error and percentile interval. A regression's: one row per coefficient
    (and per formula-free parameter), with z and its p-value."""
    if result.model is not None:
        from nllflow.evaluation.regression import coefficient_table

        return coefficient_table(result, evaluation.stderr if evaluation is not None else {})
    rows = []
    boot = evaluation.bootstrap if evaluation is not None else None
    for label, estimate in result.params.items():
        se = evaluation.stderr.get(label, math.nan) if evaluation else math.nan
        low, high = evaluation.ci95.get(label, (math.nan, math.nan)) if evaluation else (math.nan, math.nan)
        row = {
            "parameter": label,
            "estimate": estimate,
            "stderr": se,
            "ci95_low": low,
            "ci95_high": high,
            "fixed": label in result.fixed,
            "truth": (truth or {}).get(label, math.nan),
        }
        if boot is not None:
            boot_low, boot_high = boot.intervals.get(label, (math.nan, math.nan))
            row.update(bootstrap_se=boot.stderr.get(label, math.nan), bootstrap_low=boot_low, bootstrap_high=boot_high)
        rows.append(row)
    return pd.DataFrame(rows)
