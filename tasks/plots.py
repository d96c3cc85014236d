"""Diagnostic figures of a fit, or of several fits overlaid (matplotlib, no display needed)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.distributions import Distribution  # noqa: E402

from tasks.censoring import log_tails  # noqa: E402
from tasks.data import Sample  # noqa: E402
from tasks.families import Family  # noqa: E402

# matplotlib's text layout (mathtext tick labels of a log axis) is not thread-safe, and the
# flows record fits from a thread pool: build and save figures under this lock
LOCK = threading.RLock()


def loss_curve(trace: pd.DataFrame, title: str) -> Figure:
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(trace["step"], trace["nll"], color="C0")
    axis.set(xlabel="step", ylabel="NLL (total)", title=title)
    _log_scale_if_wide(axis, trace["nll"].to_numpy())
    figure.tight_layout()
    return figure


def loss_overlay(curves: Mapping[str, pd.DataFrame], title: str) -> Figure:
    """One NLL curve per configuration of a sweep (frames with `step` and `value`)."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    values = []
    for label, curve in curves.items():
        axis.plot(curve["step"], curve["value"], label=label)
        values.append(curve["value"].to_numpy())
    axis.set(xlabel="step", ylabel="NLL (total)", title=title)
    if values:
        _log_scale_if_wide(axis, np.concatenate(values))
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _log_scale_if_wide(axis, values: np.ndarray) -> None:
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 100:
        axis.set_yscale("log")


@dataclass(frozen=True)
class Curve:
    """One fitted distribution to draw: a label, its family and its natural parameters."""

    label: str
    family: Family
    natural: Mapping[str, Tensor]

    def dist(self) -> Distribution:
        return self.family.build(**{k: v.detach().double().cpu() for k, v in self.natural.items()}, validate_args=False)


DATA_COLOUR = "0.3"


def _colour(i: int, count: int):
    """Distinct colours for up to 20 overlaid fits (tab10, then tab20)."""
    return plt.get_cmap("tab10" if count <= 10 else "tab20")(i % 20)


def _legend(axis, curves: int) -> None:
    """Inside the axes for a fit or two; beside them for a comparison of many."""
    if curves <= 3:
        axis.legend(fontsize="small")
    else:
        axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))


def _square(curves: int) -> tuple[float, float]:
    """A square plot, with room beside it for a long legend."""
    return (5.0, 5.0) if curves <= 3 else (6.8, 5.0)


def diagnostic_plots(sample: Sample, curves: Sequence[Curve], title: str) -> dict[str, Figure]:
    """fitdistrplus's four diagnostics, for one fit or overlaid for a comparison: the density over
    the histogram (PMF over frequencies), the CDF over the empirical CDF, and for continuous
    families the P-P and Q-Q plots. Censored data gets the CDF plot, with each censored row drawn
    as the segment it is known to lie on."""
    discrete = curves[0].family.discrete
    figures = {"cdf.png": cdf_plot(sample, curves, title)}
    if sample.n_censored:
        return figures
    figures["density.png"] = density_plot(sample, curves, title)
    if not discrete:
        figures["pp.png"] = pp_plot(sample, curves, title)
        figures["qq.png"] = qq_plot(sample, curves, title)
    return figures


def _sorted(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact values in order, their weights, and their empirical probabilities at the middle
    of each step."""
    order = np.argsort(sample.values, kind="stable")
    x = sample.values[order]
    w = np.ones_like(x) if sample.weights is None else sample.weights[order]
    after = np.cumsum(w)
    return x, w, (after - w / 2) / after[-1]


def _grid(values: np.ndarray, log: bool = False) -> np.ndarray:
    low, high = np.quantile(values, [0.001, 0.999])
    if log:
        return np.geomspace(low / 1.5, high * 1.5, 400)
    pad = 0.05 * (high - low) if high > low else 1.0
    return np.linspace(low - pad, high + pad, 400)


def _wide_positive(values: np.ndarray) -> bool:
    """Positive data over more than two decades: its CDF is read on a log axis."""
    return bool(values.min() > 0 and values.max() / values.min() > 100)


def _log_cdf(curve: Curve, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return log_tails(curve.dist(), torch.as_tensor(x, dtype=torch.float64))[0].numpy()


def _pmf(curve: Curve, support: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return curve.dist().log_prob(torch.as_tensor(support, dtype=torch.float64)).exp().numpy()


def density_plot(sample: Sample, curves: Sequence[Curve], title: str) -> Figure:
    """Histogram with the fitted densities, or observed frequencies with the fitted PMFs."""
    values, weights = sample.values, sample.weights
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    if curves[0].family.discrete:
        support = np.arange(int(values.max()) + 1)
        counts = np.bincount(values.astype(int), weights=weights, minlength=len(support))
        axis.bar(support, counts / counts.sum(), color=DATA_COLOUR, alpha=0.35, label="observed")
        for i, curve in enumerate(curves):
            axis.plot(support, _pmf(curve, support), "o-", color=_colour(i, len(curves)), ms=4, label=curve.label)
        axis.set(xlabel="value", ylabel="probability")
    else:
        edges = np.histogram_bin_edges(values, bins="auto")
        axis.hist(values, bins=edges, weights=weights, density=True, color=DATA_COLOUR, alpha=0.35, label="data")
        grid = _grid(values)
        for i, curve in enumerate(curves):
            with torch.no_grad():
                density = curve.dist().log_prob(torch.as_tensor(grid)).exp().numpy()
            axis.plot(grid, density, color=_colour(i, len(curves)), label=curve.label)
        axis.set(xlabel="value", ylabel="density")
    axis.set_title(f"{title}: density")
    _legend(axis, len(curves))
    figure.tight_layout()
    return figure


def cdf_plot(sample: Sample, curves: Sequence[Curve], title: str) -> Figure:
    """The empirical CDF (censored rows as segments at their rank) with the fitted CDFs."""
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    stand_in = sample.stand_in()
    if curves[0].family.discrete:
        support = np.arange(int(stand_in.max()) + 1)
        counts = np.bincount(sample.values.astype(int), weights=sample.weights, minlength=len(support))
        axis.step(support, np.cumsum(counts) / counts.sum(), where="post", color=DATA_COLOUR, label="empirical")
        for i, curve in enumerate(curves):
            axis.step(support, np.cumsum(_pmf(curve, support)), where="post", color=_colour(i, len(curves)), label=curve.label)
    else:
        log = _wide_positive(stand_in)
        grid = _grid(stand_in, log)
        if log:
            axis.set_xscale("log")
        if sample.n_censored:
            _censored_ecdf(axis, sample, grid)
        else:
            x, w, _ = _sorted(sample)
            axis.step(x, np.cumsum(w) / w.sum(), where="post", color=DATA_COLOUR, label="empirical")
        for i, curve in enumerate(curves):
            axis.plot(grid, np.exp(_log_cdf(curve, grid)), color=_colour(i, len(curves)), label=curve.label)
    axis.set(xlabel="value", ylabel="CDF", ylim=(-0.02, 1.02), title=f"{title}: CDF")
    _legend(axis, len(curves))
    figure.tight_layout()
    return figure


def _censored_ecdf(axis, sample: Sample, grid: np.ndarray) -> None:
    """Rows ordered by their stand-in value, each at the height of its rank: exact values as
    points, censored rows as the segment (low, high] clipped to the plot."""
    low = np.concatenate([sample.values, sample.censored_low])
    high = np.concatenate([sample.values, sample.censored_high])
    weights = np.ones(len(low))
    if sample.weights is not None or sample.censored_weights is not None:
        weights = np.concatenate([
            sample.weights if sample.weights is not None else np.ones(len(sample.values)),
            sample.censored_weights if sample.censored_weights is not None else np.ones(sample.n_censored),
        ])
    order = np.argsort(sample.stand_in(), kind="stable")
    height = (np.cumsum(weights[order]) - weights[order] / 2) / weights.sum()
    low, high = np.clip(low[order], grid[0], grid[-1]), np.clip(high[order], grid[0], grid[-1])
    exact = low == high
    axis.hlines(height[~exact], low[~exact], high[~exact], color=DATA_COLOUR, lw=1.0, label="censored rows")
    axis.plot(low[exact], height[exact], "o", color=DATA_COLOUR, ms=3, label="exact values")


MAX_PLOTTED_POINTS = 2000


def _thinned(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The sorted data and their empirical probabilities, at most MAX_PLOTTED_POINTS of them evenly
    spaced in rank (the extremes kept): a P-P or Q-Q plot of a million points shows no more, and
    inverting the fitted CDF at each would cost seconds."""
    x, _, empirical = _sorted(sample)
    if len(x) > MAX_PLOTTED_POINTS:
        keep = np.unique(np.linspace(0, len(x) - 1, MAX_PLOTTED_POINTS).round().astype(int))
        x, empirical = x[keep], empirical[keep]
    return x, empirical


def pp_plot(sample: Sample, curves: Sequence[Curve], title: str) -> Figure:
    """Fitted against empirical probabilities at the data."""
    x, empirical = _thinned(sample)
    figure, axis = plt.subplots(figsize=_square(len(curves)))
    for i, curve in enumerate(curves):
        axis.scatter(empirical, np.exp(_log_cdf(curve, x)), s=8, alpha=0.6, color=_colour(i, len(curves)), label=curve.label)
    axis.plot([0, 1], [0, 1], color="0.4", lw=1)
    axis.set(xlabel="empirical probabilities", ylabel="fitted probabilities", title=f"{title}: P-P")
    _legend(axis, len(curves))
    figure.tight_layout()
    return figure


def qq_plot(sample: Sample, curves: Sequence[Curve], title: str) -> Figure:
    """Empirical against fitted quantiles, at the empirical probabilities of the data."""
    x, empirical = _thinned(sample)
    figure, axis = plt.subplots(figsize=_square(len(curves)))
    shown = [x]
    for i, curve in enumerate(curves):
        fitted = quantiles(curve.dist(), empirical, x)
        axis.scatter(fitted, x, s=8, alpha=0.6, color=_colour(i, len(curves)), label=curve.label)
        shown.append(fitted[np.isfinite(fitted)])
    everything = np.concatenate(shown)
    edges = [everything.min(), everything.max()]
    axis.plot(edges, edges, color="0.4", lw=1)
    axis.set(xlabel="fitted quantiles", ylabel="empirical quantiles", title=f"{title}: Q-Q")
    _legend(axis, len(curves))
    figure.tight_layout()
    return figure


def quantiles(dist: Distribution, probabilities: np.ndarray, values: np.ndarray, iterations: int = 200) -> np.ndarray:
    """The continuous `dist`'s quantiles at `probabilities` (any family with tails, icdf or not):
    Newton steps on log F inside a bracket that shrinks like bisection's, which takes over where a
    step leaves it. The bracket starts at the data's range and doubles out, so `dist` is evaluated
    outside its support: build it with validate_args=False (as Curve.dist does)."""
    with torch.no_grad():
        target = torch.as_tensor(np.log(probabilities), dtype=torch.float64)
        span = float(values.max() - values.min()) or 1.0
        low = torch.full_like(target, float(values.min()) - span)
        high = torch.full_like(target, float(values.max()) + span)
        for _ in range(iterations):
            below = log_tails(dist, low)[0] > target
            above = log_tails(dist, high)[0] < target
            if not bool(below.any() or above.any()):
                break
            width = high - low
            low = torch.where(below, low - width, low)
            high = torch.where(above, high + width, high)
        x = (low + high) / 2
        for _ in range(iterations):
            log_cdf = log_tails(dist, x)[0]
            left = log_cdf < target
            low, high = torch.where(left, x, low), torch.where(left, high, x)
            # d log F / dx = f / F
            newton = x - (log_cdf - target) * torch.exp(log_cdf - dist.log_prob(x))
            inside = torch.isfinite(newton) & (newton > low) & (newton < high)
            moved = torch.where(inside, newton, (low + high) / 2)
            if bool(((moved - x).abs() <= 4 * torch.finfo(x.dtype).eps * x.abs().clamp_min(1.0)).all()):
                return moved.numpy()
            x = moved
        return x.numpy()
