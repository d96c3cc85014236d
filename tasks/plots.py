"""Diagnostic figures of a fit (matplotlib, no display needed)."""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from tasks.families import Family  # noqa: E402


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


def fitted_density(family: Family, values: np.ndarray, natural: Mapping[str, Tensor], title: str) -> Figure:
    """Histogram with the fitted density, or observed frequencies with the fitted PMF."""
    dist = family.build(**{k: v.detach().double().cpu() for k, v in natural.items()}, validate_args=False)
    figure, axis = plt.subplots(figsize=(6, 4))
    if family.discrete:
        support = np.arange(int(values.max()) + 1)
        counts = np.bincount(values.astype(int), minlength=len(support)) / len(values)
        axis.bar(support, counts, color="C0", alpha=0.5, label="observed")
        pmf = dist.log_prob(torch.as_tensor(support, dtype=torch.float64)).exp().numpy()
        axis.plot(support, pmf, "o-", color="C1", label="fitted PMF")
        axis.set(xlabel="value", ylabel="probability")
    else:
        axis.hist(values, bins="auto", density=True, color="C0", alpha=0.5, label="data")
        low, high = np.quantile(values, [0.001, 0.999])
        pad = 0.05 * (high - low)
        grid = np.linspace(low - pad, high + pad, 400)
        density = dist.log_prob(torch.as_tensor(grid)).exp().numpy()
        axis.plot(grid, density, color="C1", label="fitted density")
        axis.set(xlabel="value", ylabel="density")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    return figure


def qq_plot(family: Family, values: np.ndarray, params: Mapping[str, float], title: str) -> Figure:
    """Empirical against fitted quantiles (continuous families with a scipy counterpart)."""
    frozen = family.scipy(params)  # type: ignore[misc]
    sorted_values = np.sort(values)
    probabilities = (np.arange(1, len(values) + 1) - 0.5) / len(values)
    theoretical = frozen.ppf(probabilities)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(theoretical, sorted_values, s=8, alpha=0.6)
    finite = np.isfinite(theoretical)
    edges = [min(theoretical[finite].min(), sorted_values.min()), max(theoretical[finite].max(), sorted_values.max())]
    axis.plot(edges, edges, color="C1")
    axis.set(xlabel="fitted quantiles", ylabel="empirical quantiles", title=title)
    figure.tight_layout()
    return figure
