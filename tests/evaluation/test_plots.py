"""The four diagnostic plots: which ones each kind of data gets, that they decode as PNG images, and
the quantiles the Q-Q plot uses against scipy's ppf."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from family_table import CASES

from nllflow.data.samples import Sample
from nllflow.evaluation import plots
from nllflow.families import get_family
from nllflow.fitting.mle import fit_mle
from nllflow.likelihood.quantiles import quantiles

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curves(sample: Sample, names: list[str]) -> list[plots.Curve]:
    return [
        plots.Curve(name, get_family(name), fit_mle(get_family(name), sample.observations()).natural) for name in names
    ]


def _written(figures, folder: Path) -> dict[str, tuple[int, ...]]:
    """Save as the recorder does; the decoded image's shape per file."""
    folder.mkdir()
    with plots.LOCK:
        for name, figure in figures.items():
            figure.savefig(folder / name, dpi=60)
            plots.plt.close(figure)
    shapes = {}
    for path in folder.iterdir():
        assert path.read_bytes()[:8] == PNG_MAGIC
        shapes[path.name] = matplotlib.image.imread(path).shape
    return shapes


@pytest.mark.parametrize(
    "kind, names, expected",
    [
        ("continuous", ["gamma"], {"density.png", "cdf.png", "pp.png", "qq.png"}),
        ("continuous", ["gamma", "lognormal", "weibull", "normal"], {"density.png", "cdf.png", "pp.png", "qq.png"}),
        ("weighted", ["gamma", "lognormal"], {"density.png", "cdf.png", "pp.png", "qq.png"}),
        ("discrete", ["poisson", "negativebinomial"], {"density.png", "cdf.png"}),
        # a support that ends at the largest category
        ("categories", ["categorical"], {"density.png", "cdf.png"}),
        ("censored", ["lognormal", "weibull"], {"cdf.png"}),
    ],
)
def test_diagnostic_plots_are_png_images(tmp_path, kind, names, expected):
    rng = np.random.default_rng(3)
    if kind == "discrete":
        sample = Sample(rng.poisson(3.0, 200).astype(float), "counts")
    elif kind == "categories":
        sample = Sample(rng.integers(0, 4, 200).astype(float), "categories")
    elif kind == "censored":
        x = rng.lognormal(0.0, 1.5, 150)
        low = np.where(x < 0.5, -np.inf, np.floor(x))
        sample = Sample(np.empty(0), "censored", censored_low=low, censored_high=np.where(x < 0.5, 0.5, low + 1))
    else:
        x = np.round(rng.gamma(2.0, 1.5, 300), 1) + 0.05
        weights = rng.integers(1, 4, 300).astype(float) if kind == "weighted" else None
        sample = Sample(x, kind, weights=weights)
    shapes = _written(plots.diagnostic_plots(sample, _curves(sample, names), kind), tmp_path / "plots")
    assert set(shapes) == expected
    for shape in shapes.values():
        assert len(shape) == 3 and shape[0] > 100 and shape[1] > 100 and shape[2] in (3, 4)


@pytest.mark.parametrize("name", ["gamma", "studentt", "cauchy", "beta", "weibull", "triangular"])
def test_qq_quantiles_match_scipy(name):
    case = CASES[name]
    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in case.params.items()}
    dist = get_family(name).build(**params, validate_args=False)
    probabilities = np.array([1e-4, 0.01, 0.25, 0.5, 0.9, 0.999])
    data = case.sample(50, seed=1)
    np.testing.assert_allclose(
        quantiles(get_family(name), dist, probabilities, data.min() - 1, data.max() + 1).numpy(),
        case.frozen().ppf(probabilities),
        rtol=1e-9,
    )


@pytest.mark.parametrize("name", ["gamma", "triangular"])
def test_qq_plot_quantiles_agree_with_the_newton_search(name):
    # gamma's come from scipy's quantile function, the Triangular's (no scipy mapping) from Newton
    case = CASES[name]
    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in case.params.items()}
    family = get_family(name)
    x = np.sort(case.sample(200, seed=3))
    probabilities = (np.arange(1, 201) - 0.5) / 200
    fitted = plots._fitted_quantiles(plots.Curve(name, family, params), x, probabilities)
    searched = quantiles(family, family.build(**params, validate_args=False), probabilities, x.min() - 1, x.max() + 1)
    np.testing.assert_allclose(fitted, searched.numpy(), rtol=1e-9)
