"""Network parameter models against independent oracles: without hidden layers a network is the
linear model, so its optimum matches the formula fit and statsmodels (Poisson GLM, NB2 and Gamma
GLM on statsmodels' data); on simulated heteroscedastic data with a known nonlinear truth its test
NLL comes within 2 % of the true model's and far below the linear model's; censored responses
recover the truth where treating them as exact does not; the untrained network is the
intercept-only MLE (scipy's closed form); the per-layer gradient norms of the trace equal the
analytic gradient; the same seed gives the same training on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import torch
from scipy import stats
from statsmodels.discrete.discrete_model import NegativeBinomial

from nllflow.errors import InputError
from nllflow.models.prediction import FittedModel
from nllflow.pipeline.steps import run_core
from nllflow.spec import parse_spec

RANDHIE = "lncoins + idp + lpi + fmde + physlm + disea + hlthg + hlthf + hlthp"
SCOTLAND = "COUTAX + UNEMPF + MOR + ACT + GDP + AGE + COUTAX_FEMALEUNEMP"


def _run(tmp_path: Path, frame: pd.DataFrame, column: str, family: str, *, test: pd.DataFrame | None = None, **spec):
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    data = {"path": str(path), "column": column}
    if test is not None:
        test.to_csv(tmp_path / "test.csv", index=False)
        data["test_path"] = str(tmp_path / "test.csv")
    raw = {"name": "network", "family": family, "data": data, "device": "cpu", **spec}
    return run_core(parse_spec(raw))


def _linear_network(terms: str, outputs: list[str]) -> dict:
    """A network without hidden layers, trained by full-batch L-BFGS on every row."""
    return {
        "network": {"terms": terms, "parameters": outputs, "hidden": []},
        "training": {"validation": 0.0},
        "optimizer": {"name": "lbfgs", "max_steps": 1000},
    }


# --- a network without hidden layers is the linear model ------------------------------------------


@pytest.fixture(scope="module")
def randhie() -> pd.DataFrame:
    return sm.datasets.randhie.load_pandas().data


def _same_optimum(network_nll: float, formula_nll: float, oracle_nll: float) -> None:
    assert network_nll == pytest.approx(formula_nll, rel=1e-6)
    assert network_nll <= oracle_nll * (1 + 1e-6)


def test_a_poisson_network_without_hidden_layers_is_the_poisson_glm(tmp_path, randhie):
    oracle = sm.GLM.from_formula(f"mdvis ~ {RANDHIE}", randhie, family=sm.families.Poisson()).fit(tol=1e-12)
    _, _, network, _ = _run(tmp_path, randhie, "mdvis", "poisson", **_linear_network(RANDHIE, ["rate"]))
    _, _, formula, _ = _run(tmp_path, randhie, "mdvis", "poisson", formulas={"rate": RANDHIE})
    assert network.converged, network.reason
    _same_optimum(network.nll, formula.nll, -oracle.llf)


def test_a_negative_binomial_network_for_the_mean_is_nb2(tmp_path, randhie):
    oracle = NegativeBinomial.from_formula(f"mdvis ~ {RANDHIE}", randhie, loglike_method="nb2").fit(
        method="newton", tol=1e-12, maxiter=100, disp=0
    )
    _, _, network, _ = _run(tmp_path, randhie, "mdvis", "negativebinomial", **_linear_network(RANDHIE, ["mean"]))
    _, _, formula, _ = _run(tmp_path, randhie, "mdvis", "negativebinomial", formulas={"mean": RANDHIE})
    _same_optimum(network.nll, formula.nll, -oracle.llf)
    # the dispersion is a constant beside the network, as in NB2
    assert network.params["dispersion"] == pytest.approx(oracle.params["alpha"], rel=1e-4)


def test_a_gamma_network_for_the_mean_is_the_gamma_glm_with_a_log_link(tmp_path):
    data = sm.datasets.scotland.load_pandas().data
    glm = sm.GLM.from_formula(f"YES ~ {SCOTLAND}", data, family=sm.families.Gamma(link=sm.families.links.Log()))
    oracle = glm.fit(tol=1e-13, maxiter=1000)
    _, _, network, _ = _run(tmp_path, data, "YES", "gamma", **_linear_network(SCOTLAND, ["mean"]))
    _, _, formula, _ = _run(tmp_path, data, "YES", "gamma", formulas={"mean": SCOTLAND})
    # statsmodels' llf uses the Pearson dispersion; the MLE of the dispersion is at least as good
    _same_optimum(network.nll, formula.nll, -oracle.llf)
    np.testing.assert_allclose(
        np.log((network.natural["concentration"] / network.natural["rate"]).numpy()), np.log(oracle.mu), rtol=1e-4
    )


# --- a nonlinear, heteroscedastic truth --------------------------------------------------------------


def _truth(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return 1.5 * np.sin(2 * x), np.exp(0.6 * np.cos(2 * x) - 0.4)


def _simulated(n: int, seed: int) -> pd.DataFrame:
    generator = np.random.default_rng(seed)
    x = generator.uniform(-2.5, 2.5, n)
    loc, scale = _truth(x)
    return pd.DataFrame({"x": x, "y": loc + scale * generator.standard_normal(n)})


def test_a_network_learns_a_nonlinear_mean_and_scale(tmp_path):
    train, test = _simulated(4000, 11), _simulated(10_000, 12)
    loc, scale = _truth(test["x"].to_numpy())
    true_nll = -stats.norm.logpdf(test["y"], loc, scale).mean()
    network_spec = {
        "network": {"terms": "x", "hidden": [32, 32], "activation": "tanh"},
        "training": {"batch_size": 256, "scheduler": "plateau", "patience": 30},
        "optimizer": {"lr": 0.01, "max_steps": 400},
    }
    _, _, network, evaluation = _run(tmp_path, train, "y", "normal", test=test, **network_spec)
    assert network.outcome.value == "early_stopped"
    assert evaluation.test_mean_nll == pytest.approx(true_nll, rel=0.02)
    _, _, _, linear = _run(tmp_path, train, "y", "normal", test=test, formulas={"loc": "x", "scale": "x"})
    assert linear.test_mean_nll > 1.3 * true_nll
    # the fitted curves themselves: the predicted mean and scale follow the truth between the data
    grid = pd.DataFrame({"x": np.linspace(-2.3, 2.3, 47)})
    predicted = FittedModel.of(network).predict(grid)
    loc, scale = _truth(grid["x"].to_numpy())
    assert np.abs(predicted["loc"] - loc).max() < 0.15
    assert np.abs(np.log(predicted["scale"] / scale)).max() < 0.2


def test_censored_responses_are_fitted_through_their_tails(tmp_path):
    """Right-censoring at 0.5 hides the top of the sine; the censored likelihood recovers it, the
    censored values taken as exact do not."""
    generator = np.random.default_rng(3)
    n = 3000
    x = generator.uniform(-2, 2, n)
    y = np.sin(1.5 * x) + 0.3 * generator.standard_normal(n)
    cut = 0.5
    frame = pd.DataFrame({"x": x, "low": np.minimum(y, cut), "high": np.where(y > cut, np.nan, y)})
    assert 0.2 < (y > cut).mean() < 0.45
    frame.to_csv(tmp_path / "censored.csv", index=False)
    spec = {
        "name": "censored-network",
        "family": "normal",
        "device": "cpu",
        "data": {"path": str(tmp_path / "censored.csv"), "censored": ["low", "high"]},
        "network": {"terms": "x", "parameters": ["loc"], "hidden": [16, 16], "activation": "tanh"},
        "training": {"validation": 0.0},
        "optimizer": {"name": "lbfgs", "max_steps": 400},
    }
    _, _, result, _ = run_core(parse_spec(spec))
    grid = pd.DataFrame({"x": np.linspace(-1.8, 1.8, 37)})
    predicted = FittedModel.of(result).predict(grid)
    assert np.abs(predicted["loc"] - np.sin(1.5 * grid["x"])).max() < 0.12
    assert result.params["scale"] == pytest.approx(0.3, rel=0.08)
    naive = frame.assign(y=frame["low"])
    _, _, exact, _ = _run(tmp_path, naive, "y", "normal", **{k: spec[k] for k in ("network", "training", "optimizer")})
    at_peak = FittedModel.of(exact).predict(pd.DataFrame({"x": [math.pi / 3]}))["loc"].iloc[0]
    assert at_peak < 0.8  # the truth is 1: taken as exact, the censored rows pull the peak down


# --- the start, the gradients, reproducibility --------------------------------------------------------


def test_the_untrained_network_is_the_intercept_only_mle(tmp_path, rng):
    frame = pd.DataFrame({"x": rng.normal(size=500), "g": rng.choice(["a", "b", "c"], 500)})
    frame["y"] = rng.gamma(2.0, 1.5, size=500)
    spec = {"network": {"terms": "x + C(g)", "hidden": [8]}, "training": {"validation": 0.0}}
    _, _, result, _ = _run(tmp_path, frame, "y", "gamma", **spec, optimizer={"max_steps": 1})
    shape, _, scale = stats.gamma.fit(frame["y"], floc=0)
    constant_nll = -stats.gamma.logpdf(frame["y"], shape, scale=scale).mean()
    assert result.trace["mean_nll"].iloc[0] == pytest.approx(constant_nll, rel=1e-9)


def test_per_layer_gradient_norms_are_the_analytic_gradient(tmp_path, rng):
    """At the start (output weights 0, biases at the normal MLE), ∂ mean NLL / ∂ output weight j is
    -s mean((y - μ) h_j) / σ² for the location (whose output is scaled by s, the standard deviation
    of y) and mean(1 - ((y - μ)/σ)²) h_j for log σ, with h the
    last hidden layer; the output biases have gradient 0 at the MLE, and so has the hidden layer."""
    n = 400
    frame = pd.DataFrame({"x": rng.normal(size=n)})
    frame["y"] = 1.0 + np.sin(frame["x"]) + 0.5 * rng.normal(size=n)
    spec = {"network": {"terms": "x", "hidden": [6], "activation": "tanh"}, "training": {"validation": 0.0}}
    _, problem, result, _ = _run(tmp_path, frame, "y", "normal", **spec, optimizer={"max_steps": 1})
    model = result.model
    first = result.trace.iloc[0]
    # the network at the start, rebuilt from the seed (training moved it one step since)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        start = type(model.network)(1, 2, [6], "tanh", 0.0).double()
    x = torch.as_tensor(((frame["x"] - frame["x"].mean()) / frame["x"].std(ddof=0)).to_numpy()).reshape(-1, 1)
    hidden = start.hidden(x).detach().numpy()
    y = frame["y"].to_numpy()
    mu, sigma = y.mean(), y.std()
    z = (y - mu) / sigma
    # the location's output moves in units of the response's standard deviation
    weight_gradient = np.concatenate([-(z / sigma) @ hidden / n * y.std(ddof=1), (1 - z**2) @ hidden / n])
    expected = np.linalg.norm(weight_gradient)  # and the biases' gradient is 0 at the MLE
    assert first["grad_norm:output"] == pytest.approx(expected, rel=1e-6)
    # the hidden layer's gradient passes through the output weights, which start at 0
    assert first["grad_norm:hidden.0"] == 0.0
    assert problem.observations.features["network"].shape == (n, 1)


def test_the_same_seed_trains_the_same_network_and_another_seed_does_not(tmp_path, rng):
    frame = _simulated(800, 5)
    spec = {
        "network": {"terms": "x", "hidden": [16], "dropout": 0.1},
        "training": {"batch_size": 64, "seed": 7},
        "optimizer": {"lr": 0.01, "max_steps": 15},
    }
    first = _run(tmp_path, frame, "y", "normal", **spec)[2]
    again = _run(tmp_path, frame, "y", "normal", **spec)[2]
    pd.testing.assert_frame_equal(first.trace, again.trace)
    other = _run(tmp_path, frame, "y", "normal", **{**spec, "training": {"batch_size": 64, "seed": 8}})[2]
    assert not np.allclose(first.trace["nll"], other.trace["nll"])


def test_networks_refuse_what_they_cannot_do(tmp_path, rng):
    frame = pd.DataFrame({"x": rng.normal(size=50), "y": rng.normal(size=50)})
    with pytest.raises(InputError, match="no parameter of normal to output: every one is fixed"):
        _run(tmp_path, frame, "y", "normal", network={"terms": "x"}, fix={"loc": 0.0, "scale": 1.0})
    with pytest.raises(InputError, match="loc has a formula and is an output of the network"):
        parse_spec(
            {
                "name": "n",
                "family": "normal",
                "data": {"path": str(tmp_path / "train.csv"), "column": "y"},
                "formulas": {"loc": "x"},
                "network": {"terms": "x", "parameters": ["loc"]},
            }
        )
    with pytest.raises(InputError, match="L-BFGS needs a deterministic objective"):
        _run(tmp_path, frame, "y", "normal", network={"terms": "x", "dropout": 0.2}, optimizer={"name": "lbfgs"})
    with pytest.raises(InputError, match="L-BFGS takes the whole data each step"):
        _run(tmp_path, frame, "y", "normal", network={"terms": "x"}, training={"batch_size": 8},
             optimizer={"name": "lbfgs"})  # fmt: skip


RESMLP = """
from torch import nn
from nllflow.models.network import ACTIVATIONS, register_network

@register_network("resmlp-test")
def resmlp(inputs, outputs, hidden, activation, dropout):
    class ResMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(inputs, hidden[0])
            self.block = nn.Sequential(nn.Linear(hidden[0], hidden[0]), ACTIVATIONS[activation]())
            self.output = nn.Linear(hidden[0], outputs)

        def forward(self, x):
            h = self.inner(x)
            return self.output(h + self.block(h))

    return ResMLP()
"""


def test_a_network_of_ones_own_is_one_file_registered_by_name(tmp_path, monkeypatch):
    """The README's example: a residual MLP in a plugin file, trained and predicting like the MLP."""
    (tmp_path / "my_networks.py").write_text(RESMLP)
    monkeypatch.setenv("NLLFLOW_PLUGINS", str(tmp_path / "my_networks.py"))
    train = _simulated(1500, 21)
    spec = {
        "network": {"terms": "x", "architecture": "resmlp-test", "hidden": [16], "activation": "tanh"},
        "training": {"batch_size": 128},
        "optimizer": {"lr": 0.01, "max_steps": 150},
    }
    _, _, result, _ = _run(tmp_path, train, "y", "normal", **spec)
    assert result.model.architecture.name == "resmlp-test"
    assert [name for name, _ in result.model.layers()] == ["inner", "block.0", "output"]
    # it learns the curve, and what it predicts is what it was fitted with
    grid = pd.DataFrame({"x": np.linspace(-2, 2, 21)})
    predicted = FittedModel.of(result).predict(grid)
    assert np.abs(predicted["loc"] - _truth(grid["x"].to_numpy())[0]).max() < 0.3
    with pytest.raises(InputError, match="unknown network 'resmlp-other'; valid: mlp, resmlp-test"):
        _run(tmp_path, train, "y", "normal", **{**spec, "network": {**spec["network"], "architecture": "resmlp-other"}})
