"""`device: auto` on a machine with CUDA: the data and parameters go to the GPU, and the fit agrees
with the same fit on the CPU and with an independent estimate (closed form, scipy); a network trains
there in float32 with its data moved once, and without hidden layers matches the linear model.
Skipped where CUDA is not available."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from nllflow.pipeline.steps import run_core
from nllflow.spec import parse_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# float32: L-BFGS stops at gtol 1e-4 on the mean NLL, and reductions of 20000 terms in a different
# order (GPU vs CPU) differ in the last bits of a float32
RTOL = {"float64": 1e-6, "float32": 5e-3}
N = 20_000


# start values away from the optimum, so the optimiser does the work on the device
INIT = {"normal": {"loc": 0.0, "scale": 1.0}, "gamma": {"concentration": 0.8, "rate": 2.0}}


def spec(family: str, params: dict, device: str, dtype: str):
    return parse_spec(
        {
            "name": "gpu-check",
            "family": family,
            "device": device,
            "dtype": dtype,
            "init": INIT[family],
            "data": {"simulate": {"params": params, "n": N, "seed": 17}},
            "optimizer": {"name": "lbfgs", "max_steps": 500},
        }
    )


def fit_on(family: str, params: dict, device: str, dtype: str):
    data, problem, result, evaluation = run_core(spec(family, params, device, dtype))
    assert result.converged, result.reason
    return data, problem, result, evaluation


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_normal_fit_on_cuda_matches_the_cpu_and_the_closed_form(dtype):
    data, problem, gpu, gpu_evaluation = fit_on("normal", {"loc": 2.0, "scale": 1.5}, "auto", dtype)
    assert problem.device.startswith("cuda") and problem.observations.values.is_cuda
    assert problem.dtype == dtype
    _, cpu_problem, cpu, cpu_evaluation = fit_on("normal", {"loc": 2.0, "scale": 1.5}, "cpu", dtype)
    assert cpu_problem.device == "cpu"

    x = data.train.values
    closed_form = {"loc": x.mean(), "scale": np.sqrt(((x - x.mean()) ** 2).mean())}
    for name, value in closed_form.items():
        assert gpu.params[name] == pytest.approx(value, rel=RTOL[dtype])
        assert gpu.params[name] == pytest.approx(cpu.params[name], rel=RTOL[dtype])
        assert gpu_evaluation.stderr[name] == pytest.approx(cpu_evaluation.stderr[name], rel=RTOL[dtype] * 10)
    assert gpu.nll == pytest.approx(
        -stats.norm.logpdf(x, closed_form["loc"], closed_form["scale"]).sum(), rel=RTOL[dtype]
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gamma_fit_on_cuda_matches_the_cpu_and_scipy(dtype):
    data, problem, gpu, gpu_evaluation = fit_on("gamma", {"concentration": 2.5, "rate": 1.5}, "auto", dtype)
    assert problem.device.startswith("cuda")
    _, _, cpu, cpu_evaluation = fit_on("gamma", {"concentration": 2.5, "rate": 1.5}, "cpu", dtype)

    shape, _, scale = stats.gamma.fit(data.train.values, floc=0)
    reference = {"concentration": shape, "rate": 1 / scale}
    for name, value in reference.items():
        assert gpu.params[name] == pytest.approx(value, rel=10 * RTOL[dtype])
        assert gpu.params[name] == pytest.approx(cpu.params[name], rel=RTOL[dtype])
        assert gpu_evaluation.stderr[name] == pytest.approx(cpu_evaluation.stderr[name], rel=RTOL[dtype] * 10)
    assert gpu.nll == pytest.approx(cpu.nll, rel=RTOL[dtype])


def _network_data(tmp_path, n: int = 4000):
    generator = np.random.default_rng(9)
    x = generator.uniform(-2, 2, n)
    frame = pd.DataFrame({"x": x, "y": np.sin(2 * x) + np.exp(0.3 * x - 0.5) * generator.standard_normal(n)})
    frame.to_csv(tmp_path / "network.csv", index=False)
    return str(tmp_path / "network.csv")


def network_spec(path: str, device: str, **sections):
    return parse_spec(
        {"name": "gpu-network", "family": "normal", "device": device, "data": {"path": path, "column": "y"}, **sections}
    )


def test_a_network_trains_on_cuda_in_float32_with_its_data_moved_once(tmp_path):
    path = _network_data(tmp_path)
    sections = {
        "network": {"terms": "x", "hidden": [32, 32], "activation": "tanh"},
        "training": {"batch_size": 256, "patience": 10},
        "optimizer": {"lr": 0.01, "max_steps": 60},
    }
    _, problem, gpu, evaluation = run_core(network_spec(path, "cuda", **sections))
    assert problem.dtype == "float32"  # the default for a network on CUDA
    assert problem.observations.values.is_cuda and problem.observations.features["network"].is_cuda
    assert problem.validation.values.is_cuda
    assert all(p.is_cuda for p in gpu.model.network.parameters())
    assert torch.isfinite(torch.tensor(gpu.trace["nll"].to_numpy())).all()
    _, _, cpu, _ = run_core(network_spec(path, "cpu", **sections))
    # different kernels, the same model class: both reach nearly the same validation NLL
    assert gpu.validation_mean_nll == pytest.approx(cpu.validation_mean_nll, rel=0.03)
    assert gpu.validation_mean_nll < gpu.trace["val_mean_nll"].iloc[0] - 0.3
    # the fitted model predicts on the CPU from weights trained on the GPU
    from nllflow.models.prediction import FittedModel

    predicted = FittedModel.of(gpu).predict(pd.DataFrame({"x": [0.0, 1.0]}))
    assert predicted["loc"].to_numpy() == pytest.approx([0.0, np.sin(2.0)], abs=0.2)


def test_a_network_without_hidden_layers_on_cuda_is_the_linear_model(tmp_path):
    path = _network_data(tmp_path, 2000)
    network = {
        "network": {"terms": "x", "hidden": []},
        "training": {"validation": 0.0},
        "optimizer": {"name": "lbfgs", "max_steps": 500},
        "dtype": "float64",
    }
    _, _, gpu, _ = run_core(network_spec(path, "cuda", **network))
    _, _, linear, _ = run_core(network_spec(path, "cpu", formulas={"loc": "x", "scale": "x"}))
    assert gpu.nll == pytest.approx(linear.nll, rel=1e-6)
