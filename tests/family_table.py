"""One row per registered family: true parameters, the matching scipy.stats distribution (our own
mapping, written independently of the family's `scipy` field), a sampler, and how scipy fits it.

The rows drive the generic tests in test_families.py (log_prob, cdf, support, recovery, NLL against
scipy's own fit). A family registered without a row here fails `test_every_family_has_a_row`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from scipy import stats
from scipy.special import softmax

from nllflow.evaluation.summary import Evaluation, evaluate_fit
from nllflow.families import get_family
from nllflow.fitting.mle import FitResult, fit_mle
from nllflow.likelihood.observations import Observations

ParamValue = float | list[float]


def _categorical_scipy(p: Mapping[str, Any]) -> Any:
    """Category 0 is the reference with logit 0; the free logits are logits_1, logits_2, ..."""
    free = [p[key] for key in sorted((k for k in p if k.startswith("logits_")), key=lambda k: int(k.split("_")[1]))]
    probs = softmax(np.array([0.0, *free]))
    return stats.rv_discrete(values=(np.arange(len(probs)), probs))


@dataclass(frozen=True)
class FamilyCase:
    """One family's fixtures. `scipy` maps labelled parameters (`logits_1`, not `logits`) to a frozen
    scipy distribution; `fixed` holds parameters the fit must be told (binomial's total_count);
    `scipy_fit` is (scipy family, fit keyword arguments, labels from scipy's fitted tuple) for
    continuous families that scipy can fit; `recovery_tol` is an absolute tolerance for parameters
    without a standard error (an MLE at a data bound or kink)."""

    name: str
    params: Mapping[str, ParamValue]
    scipy: Callable[[Mapping[str, float]], Any]
    discrete: bool = False
    has_cdf: bool = False
    fixed: Mapping[str, ParamValue] = field(default_factory=dict)
    scipy_fit: tuple[Any, Mapping[str, float], Callable[[tuple], Mapping[str, float]]] | None = None
    recovery_tol: Mapping[str, float] = field(default_factory=dict)
    # points certainly outside the family's data support
    outside: tuple[float, ...] = ()

    @property
    def labels(self) -> dict[str, float]:
        """The true parameters by scalar label (vectors numbered from 1, as the fitter does)."""
        out: dict[str, float] = {}
        for name, value in self.params.items():
            if isinstance(value, list):
                out.update({f"{name}_{i + 1}": float(v) for i, v in enumerate(value)})
            else:
                out[name] = float(value)
        return out

    def frozen(self) -> Any:
        return self.scipy(self.labels)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """`n` draws from scipy (not from torch), as float64."""
        return np.asarray(self.frozen().rvs(size=n, random_state=np.random.default_rng(seed)), dtype=np.float64)


CASES: dict[str, FamilyCase] = {
    case.name: case
    for case in [
        FamilyCase(
            "normal",
            {"loc": 1.5, "scale": 2.0},
            lambda p: stats.norm(p["loc"], p["scale"]),
            has_cdf=True,
            scipy_fit=(stats.norm, {}, lambda t: {"loc": t[0], "scale": t[1]}),
        ),
        FamilyCase(
            "studentt",
            {"df": 4.0, "loc": -1.0, "scale": 0.5},
            lambda p: stats.t(p["df"], p["loc"], p["scale"]),
            scipy_fit=(stats.t, {}, lambda t: {"df": t[0], "loc": t[1], "scale": t[2]}),
        ),
        FamilyCase(
            "laplace",
            {"loc": 0.5, "scale": 1.5},
            lambda p: stats.laplace(p["loc"], p["scale"]),
            has_cdf=True,
            scipy_fit=(stats.laplace, {}, lambda t: {"loc": t[0], "scale": t[1]}),
            # the MLE of loc is a sample median (a kink): its error is about scale / sqrt(n)
            recovery_tol={"loc": 0.15},
        ),
        FamilyCase(
            "cauchy",
            {"loc": 2.0, "scale": 0.7},
            lambda p: stats.cauchy(p["loc"], p["scale"]),
            has_cdf=True,
            scipy_fit=(stats.cauchy, {}, lambda t: {"loc": t[0], "scale": t[1]}),
        ),
        FamilyCase(
            "gumbel",
            {"loc": 3.0, "scale": 1.2},
            lambda p: stats.gumbel_r(p["loc"], p["scale"]),
            has_cdf=True,
            scipy_fit=(stats.gumbel_r, {}, lambda t: {"loc": t[0], "scale": t[1]}),
        ),
        FamilyCase(
            "lognormal",
            {"loc": 0.3, "scale": 0.6},
            lambda p: stats.lognorm(p["scale"], 0.0, math.exp(p["loc"])),
            has_cdf=True,
            outside=(-1.0, 0.0),
            scipy_fit=(stats.lognorm, {"floc": 0.0}, lambda t: {"loc": math.log(t[2]), "scale": t[0]}),
        ),
        FamilyCase(
            "gamma",
            {"concentration": 2.5, "rate": 1.7},
            lambda p: stats.gamma(p["concentration"], 0.0, 1 / p["rate"]),
            has_cdf=True,
            outside=(-0.5, 0.0),
            scipy_fit=(stats.gamma, {"floc": 0.0}, lambda t: {"concentration": t[0], "rate": 1 / t[2]}),
        ),
        FamilyCase(
            "exponential",
            {"rate": 0.8},
            lambda p: stats.expon(0.0, 1 / p["rate"]),
            has_cdf=True,
            outside=(-0.1,),
            scipy_fit=(stats.expon, {"floc": 0.0}, lambda t: {"rate": 1 / t[1]}),
        ),
        FamilyCase(
            "weibull",
            {"scale": 2.0, "concentration": 1.6},
            lambda p: stats.weibull_min(p["concentration"], 0.0, p["scale"]),
            has_cdf=True,
            outside=(-1.0, 0.0),
            scipy_fit=(stats.weibull_min, {"floc": 0.0}, lambda t: {"scale": t[2], "concentration": t[0]}),
        ),
        FamilyCase(
            "halfnormal",
            {"scale": 1.3},
            lambda p: stats.halfnorm(0.0, p["scale"]),
            has_cdf=True,
            outside=(-0.2,),
            scipy_fit=(stats.halfnorm, {"floc": 0.0}, lambda t: {"scale": t[1]}),
        ),
        FamilyCase(
            "halfcauchy",
            {"scale": 0.9},
            lambda p: stats.halfcauchy(0.0, p["scale"]),
            has_cdf=True,
            outside=(-0.2,),
            scipy_fit=(stats.halfcauchy, {"floc": 0.0}, lambda t: {"scale": t[1]}),
        ),
        FamilyCase(
            "pareto",
            {"scale": 1.5, "alpha": 3.0},
            lambda p: stats.pareto(p["alpha"], 0.0, p["scale"]),
            has_cdf=True,
            outside=(-1.0, 0.0),
            scipy_fit=(stats.pareto, {"floc": 0.0}, lambda t: {"alpha": t[0], "scale": t[2]}),
            # the MLE of the scale is the sample minimum: its error is about scale / (n alpha)
            recovery_tol={"scale": 0.01},
        ),
        FamilyCase(
            "beta",
            {"concentration1": 2.0, "concentration0": 5.0},
            lambda p: stats.beta(p["concentration1"], p["concentration0"]),
            outside=(-0.1, 0.0, 1.0, 1.5),
            scipy_fit=(
                stats.beta,
                {"floc": 0.0, "fscale": 1.0},
                lambda t: {"concentration1": t[0], "concentration0": t[1]},
            ),
        ),
        FamilyCase(
            "uniform",
            {"low": -1.0, "high": 3.0},
            lambda p: stats.uniform(p["low"], p["high"] - p["low"]),
            has_cdf=True,
            scipy_fit=(stats.uniform, {}, lambda t: {"low": t[0], "high": t[0] + t[1]}),
            # the MLEs are the sample extremes: errors about (high - low) / n
            recovery_tol={"low": 0.02, "high": 0.02},
        ),
        FamilyCase(
            "triangular",
            {"lower": 1.0, "peak": 3.5, "upper": 5.0},
            lambda p: stats.triang(
                (p["peak"] - p["lower"]) / (p["upper"] - p["lower"]), p["lower"], p["upper"] - p["lower"]
            ),
            has_cdf=True,
            scipy_fit=(stats.triang, {}, lambda t: {"lower": t[1], "peak": t[1] + t[0] * t[2], "upper": t[1] + t[2]}),
            # the peak is a kink of the likelihood: no Wald interval
            recovery_tol={"peak": 0.25},
        ),
        FamilyCase(
            "poisson",
            {"rate": 3.5},
            lambda p: stats.poisson(p["rate"]),
            discrete=True,
            outside=(-1.0, 0.5, 2.5),
        ),
        FamilyCase(
            "binomial",
            {"total_count": 12.0, "probs": 0.3},
            lambda p: stats.binom(round(p["total_count"]), p["probs"]),
            discrete=True,
            fixed={"total_count": 12.0},
            outside=(-1.0, 1.5),
        ),
        FamilyCase(
            "negativebinomial",
            {"total_count": 4.0, "probs": 0.6},
            # torch counts successes (probability `probs`) before `total_count` failures; scipy
            # counts failures before n successes
            lambda p: stats.nbinom(p["total_count"], 1 - p["probs"]),
            discrete=True,
            outside=(-2.0, 0.25),
        ),
        FamilyCase(
            "geometric",
            {"probs": 0.25},
            # failures before the first success: a negative binomial with one success
            lambda p: stats.nbinom(1, p["probs"]),
            discrete=True,
            outside=(-1.0, 3.5),
        ),
        FamilyCase(
            "categorical",
            {"logits": [0.5, -0.3, 1.0]},
            _categorical_scipy,
            discrete=True,
            outside=(-1.0, 0.5),
        ),
    ]
}

CONTINUOUS = sorted(name for name, case in CASES.items() if not case.discrete)
DISCRETE = sorted(name for name, case in CASES.items() if case.discrete)
WITH_CDF = sorted(name for name, case in CASES.items() if case.has_cdf)
SCIPY_FITTABLE = sorted(name for name, case in CASES.items() if case.scipy_fit is not None)


@dataclass(frozen=True)
class CaseFit:
    """A default (L-BFGS, float64) fit of one case to its scipy-simulated sample."""

    case: FamilyCase
    x: np.ndarray
    observations: Observations
    result: FitResult
    evaluation: Evaluation


RECOVERY_N = 2000
_FITS: dict[tuple[str, int, int], CaseFit] = {}


def fit_case(name: str, n: int = RECOVERY_N, seed: int = 1) -> CaseFit:
    """Simulate `n` points of the case `name` with scipy, fit them, evaluate the fit (cached: the
    recovery, scipy-comparison and evaluation tests share the fits)."""
    key = (name, n, seed)
    if key not in _FITS:
        case = CASES[name]
        family = get_family(name)
        x = case.sample(n, seed)
        observations = Observations(torch.as_tensor(x, dtype=torch.float64))
        result = fit_mle(family, observations, fixed=case.fixed)
        _FITS[key] = CaseFit(case, x, observations, result, evaluate_fit(family, observations, result))
    return _FITS[key]


def scipy_nll(case: FamilyCase, params: Mapping[str, float], x: np.ndarray) -> float:
    """The total NLL of `x` under our own scipy mapping of `params`."""
    frozen = case.scipy(params)
    return float(-np.sum(frozen.logpmf(x) if case.discrete else frozen.logpdf(x)))
