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

from nllflow.data.samples import Sample  # noqa: E402
from nllflow.errors import InputError  # noqa: E402
from nllflow.families import Family  # noqa: E402
from nllflow.fitting.mle import FitResult  # noqa: E402
from nllflow.likelihood.quantiles import quantiles  # noqa: E402

# matplotlib's text layout (mathtext tick labels of a log axis) is not thread-safe, and the
# flows record fits from a thread pool: build and save figures under this lock
LOCK = threading.RLock()


def save_figures(folder, figures: Mapping[str, Figure]) -> None:
    """Each figure as a PNG in `folder` (a Path), closed."""
    folder.mkdir(parents=True, exist_ok=True)
    with LOCK:
        for name, figure in figures.items():
            figure.savefig(folder / name, dpi=110)
            plt.close(figure)


def hyperparameter_chart(table: pd.DataFrame, metric: str) -> Figure:
    """The final `metric` and the steps taken against the learning rate (a log axis), one line per
    optimiser: which rate was best, at a glance."""
    with LOCK:
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True)
        for optimizer, rows in table.sort_values("lr").groupby("optimizer", dropna=False):
            top.plot(rows["lr"], rows[metric], "o-", label=str(optimizer))
            bottom.plot(rows["lr"], rows["steps"], "o-", label=str(optimizer))
        best = table.loc[table[metric].idxmin()]
        top.plot([best["lr"]], [best[metric]], "*", markersize=14, color="C3", label=f"best: lr={best['lr']:g}")
        top.set(xscale="log", ylabel=f"final {metric}", title=f"final {metric} and steps by learning rate")
        bottom.set(xscale="log", xlabel="learning rate", ylabel="steps")
        top.legend(fontsize="small")
        figure.tight_layout()
    return figure


def family_chart(table: pd.DataFrame) -> Figure:
    """A comparison's answer to the hyperparameter chart, with the family as the swept axis: ΔAIC
    (AIC minus the best AIC) and the steps taken per family, as bars in the order of the ranking."""
    with LOCK:
        rows = table.sort_values("aic")
        delta = rows["aic"] - rows["aic"].min()
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True)
        colours = ["C3" if d == 0 else "C0" for d in delta]
        bars = top.bar(rows["run_name"], delta, color=colours)
        top.bar_label(bars, labels=["best" if d == 0 else f"+{d:.3g}" for d in delta], fontsize="small")
        top.margins(y=0.15)
        bottom.bar(rows["run_name"], rows["steps"], color=colours)
        top.set(ylabel="ΔAIC", title=f"AIC by family (best: {rows['run_name'].iloc[0]}, AIC {rows['aic'].iloc[0]:.6g})")
        bottom.set(xlabel="family", ylabel="steps")
        bottom.tick_params(axis="x", labelrotation=30)
        figure.tight_layout()
    return figure


def loss_curve(trace: pd.DataFrame, title: str) -> Figure:
    """The total NLL per step; a network's training and validation mean NLL per epoch, with the
    epoch whose weights were kept."""
    figure, axis = plt.subplots(figsize=(6, 4))
    if "val_mean_nll" in trace and trace["val_mean_nll"].notna().any():
        axis.plot(trace["step"], trace["mean_nll"], color="C0", label="training")
        axis.plot(trace["step"], trace["val_mean_nll"], color="C1", label="validation")
        best = trace.loc[trace["val_mean_nll"].idxmin()]
        axis.plot(
            [best["step"]], [best["val_mean_nll"]], "*", color="C3", ms=12, label=f"kept: epoch {best['step']:.0f}"
        )
        axis.set(xlabel="epoch", ylabel="mean NLL", title=title.replace("NLL per step", "NLL per epoch"))
        axis.legend(fontsize="small")
    else:
        axis.plot(trace["step"], trace["nll"], color="C0")
        axis.set(xlabel="step", ylabel="NLL (total)", title=title)
        _log_scale_if_wide(axis, trace["nll"].to_numpy())
    figure.tight_layout()
    return figure


def configuration_colours(names: Sequence[str]) -> dict[str, str]:
    """A colour (#rrggbb) per configuration of a sweep, in the given order, along viridis (its pale
    yellow end left out, unreadable on white): neighbouring configurations get neighbouring colours,
    so a chart of a learning-rate sweep reads from the lowest rate to the highest."""
    colour_map = matplotlib.colormaps["viridis"]
    last = max(len(names) - 1, 1)
    return {name: matplotlib.colors.to_hex(colour_map(0.9 * i / last)) for i, name in enumerate(names)}


def loss_overlay(curves: Mapping[str, pd.DataFrame], title: str, colours: Mapping[str, str]) -> Figure:
    """One NLL curve per configuration of a sweep (frames with `step` and `value`), each in its
    colour in `colours` (where it has one)."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    values = []
    for label, curve in curves.items():
        axis.plot(curve["step"], curve["value"], label=label, color=colours.get(label))
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


def fit_figures(title: str, sample: Sample, family: Family, result: FitResult, evaluation=None) -> dict[str, Figure]:
    """The figures of one fit: the NLL per step (`loss.png`) and, unless it diverged, the four
    diagnostics on the data it was fitted to (a regression's: its residual plots and centiles)."""
    with LOCK:
        figures = {"loss.png": loss_curve(result.trace, f"{title}: NLL per step")}
        if result.diverged:
            return figures
        if result.model is not None:
            figures.update(regression_plots(sample, result, evaluation, title))
        else:
            figures.update(diagnostic_plots(sample, [Curve(title, family, result.natural)], title))
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
        return curve.family.log_tails(curve.dist(), torch.as_tensor(x, dtype=torch.float64))[0].numpy()


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
            axis.step(
                support, np.cumsum(_pmf(curve, support)), where="post", color=_colour(i, len(curves)), label=curve.label
            )
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
        weights = np.concatenate(
            [
                sample.weights if sample.weights is not None else np.ones(len(sample.values)),
                sample.censored_weights if sample.censored_weights is not None else np.ones(sample.n_censored),
            ]
        )
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
        axis.scatter(
            empirical, np.exp(_log_cdf(curve, x)), s=8, alpha=0.6, color=_colour(i, len(curves)), label=curve.label
        )
    axis.plot([0, 1], [0, 1], color="0.4", lw=1)
    axis.set(xlabel="empirical probabilities", ylabel="fitted probabilities", title=f"{title}: P-P")
    _legend(axis, len(curves))
    figure.tight_layout()
    return figure


def _fitted_quantiles(curve: Curve, x: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The fitted quantiles at `probabilities`: scipy's quantile function where the family maps to
    one (a Q-Q plot of a gamma fit took half a second of Newton steps on its continued fraction),
    else Newton from the data themselves, near a fitted quantile when the fit is any good."""
    if curve.family.scipy is not None and all(value.numel() == 1 for value in curve.natural.values()):
        fitted = np.asarray(curve.family.scipy({k: float(v) for k, v in curve.natural.items()}).ppf(probabilities))
        if np.isfinite(fitted).all():
            return fitted
    span = float(x.max() - x.min()) or 1.0
    return quantiles(
        curve.family, curve.dist(), probabilities, float(x.min()) - span, float(x.max()) + span, guess=x
    ).numpy()


def qq_plot(sample: Sample, curves: Sequence[Curve], title: str) -> Figure:
    """Empirical against fitted quantiles, at the empirical probabilities of the data."""
    x, empirical = _thinned(sample)
    figure, axis = plt.subplots(figsize=_square(len(curves)))
    shown = [x]
    for i, curve in enumerate(curves):
        fitted = _fitted_quantiles(curve, x, empirical)
        axis.scatter(fitted, x, s=8, alpha=0.6, color=_colour(i, len(curves)), label=curve.label)
        shown.append(fitted[np.isfinite(fitted)])
    everything = np.concatenate(shown)
    edges = [everything.min(), everything.max()]
    axis.plot(edges, edges, color="0.4", lw=1)
    axis.set(xlabel="fitted quantiles", ylabel="empirical quantiles", title=f"{title}: Q-Q")
    _legend(axis, len(curves))
    figure.tight_layout()
    return figure


CENTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def regression_plots(sample: Sample, result, evaluation, title: str) -> dict[str, Figure]:
    """A regression's or a network's diagnostics: the normal Q-Q plot, the worm plot (detrended
    Q-Q, with its 95 % band) and the PIT histogram of the randomized quantile residuals, and the
    fitted centile curves against the first numeric covariate (the others held at their median or
    most frequent value)."""
    figures = {}
    residuals = None if evaluation is None else evaluation.residuals
    if residuals is not None and np.isfinite(residuals).sum() > 2:
        figures["residuals_qq.png"] = residual_qq_plot(residuals, title)
        figures["worm.png"] = worm_plot(residuals, title)
        figures["pit.png"] = pit_histogram(residuals, title)
    covariates = [] if sample.covariates is None else list(sample.covariates.columns)
    numeric = [c for c in covariates if pd.api.types.is_numeric_dtype(sample.covariates[c])]
    for covariate in numeric:
        try:
            figures["centiles.png"] = centile_plot(sample, result, covariate, title)
            break
        except InputError:  # a numeric column the formulas read as categories (C(x)): no grid between levels
            continue
    return figures


def pit_histogram(residuals: np.ndarray, title: str) -> Figure:
    """The probability integral transform Φ(r) of the quantile residuals: flat for a correct model
    (a hump: too wide; a U: too narrow), with the 95 % band of the counts of a flat histogram."""
    from scipy import stats

    u = stats.norm.cdf(residuals[np.isfinite(residuals)])
    bins = int(np.clip(np.sqrt(len(u)), 10, 40))
    expected = len(u) / bins
    spread = stats.norm.ppf(0.975) * np.sqrt(expected * (1 - 1 / bins))
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.hist(u, bins=bins, range=(0, 1), color="C0", alpha=0.7)
    axis.axhline(expected, color="0.3", lw=1)
    axis.axhspan(expected - spread, expected + spread, color="0.3", alpha=0.2, lw=0, zorder=3)
    axis.set(xlabel="PIT value", ylabel="rows", xlim=(0, 1), title=f"{title}: PIT histogram")
    figure.tight_layout()
    return figure


def _normal_scores(count: int) -> np.ndarray:
    from scipy import stats

    return stats.norm.ppf((np.arange(1, count + 1) - 0.5) / count)


def residual_qq_plot(residuals: np.ndarray, title: str) -> Figure:
    r = np.sort(residuals[np.isfinite(residuals)])
    theoretical = _normal_scores(len(r))
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(theoretical, r, s=8, alpha=0.6, color="C0")
    edges = [min(theoretical[0], r[0]), max(theoretical[-1], r[-1])]
    axis.plot(edges, edges, color="0.4", lw=1)
    axis.set(xlabel="standard normal quantiles", ylabel="quantile residuals", title=f"{title}: residual Q-Q")
    figure.tight_layout()
    return figure


def worm_plot(residuals: np.ndarray, title: str) -> Figure:
    """van Buuren & Fredriks' worm plot: residual minus normal quantile against the normal quantile,
    with the pointwise 95 % band of a correct model."""
    from scipy import stats

    r = np.sort(residuals[np.isfinite(residuals)])
    count = len(r)
    z = _normal_scores(count)
    p = (np.arange(1, count + 1) - 0.5) / count
    band = stats.norm.ppf(0.975) * np.sqrt(p * (1 - p) / count) / stats.norm.pdf(z)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(z, band, color="0.5", lw=1, ls="--")
    axis.plot(z, -band, color="0.5", lw=1, ls="--")
    axis.scatter(z, r - z, s=8, alpha=0.6, color="C0")
    axis.axhline(0.0, color="0.4", lw=1)
    axis.set(xlabel="standard normal quantiles", ylabel="deviation", title=f"{title}: worm plot")
    figure.tight_layout()
    return figure


def centile_plot(sample: Sample, result, covariate: str, title: str) -> Figure:
    """The data against `covariate`, with the fitted 5, 25, 50, 75 and 95 % centile curves (any
    other covariate held at its median, or its most frequent value)."""
    from nllflow.models.prediction import FittedModel

    frame = sample.covariates
    x = frame[covariate].to_numpy(dtype=float)
    grid = pd.DataFrame({covariate: np.linspace(x.min(), x.max(), 120)})
    held = []
    for other in frame.columns:
        if other != covariate:
            column = frame[other]
            numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
            grid[other] = column.median() if numeric else column.mode().iloc[0]
            held.append(f"{other}={grid[other].iloc[0]:.4g}" if numeric else f"{other}={grid[other].iloc[0]}")
    if held:
        title = f"{title} ({', '.join(held)})"
    predicted = FittedModel.of(result).predict(grid, CENTILES)
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    y = sample.stand_in()
    axis.scatter(x, y, s=8, alpha=0.4, color=DATA_COLOUR, label="data")
    for i, p in enumerate(CENTILES):
        axis.plot(
            grid[covariate],
            predicted[f"q{p:g}"],
            color=plt.get_cmap("viridis")(i / (len(CENTILES) - 1)),
            label=f"{p:.0%} centile",
        )
    axis.set(xlabel=covariate, ylabel="response", title=f"{title}: fitted centiles")
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure
