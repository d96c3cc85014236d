"""`device: auto` on a machine with CUDA: the data and parameters go to the GPU, and the fit agrees
with the same fit on the CPU and with an independent estimate (closed form, scipy). Skipped where
CUDA is not available."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from tasks.experiment import run_core
from tasks.spec import parse_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# float32: L-BFGS stops at gtol 1e-4 on the mean NLL, and reductions of 20000 terms in a different
# order (GPU vs CPU) differ in the last bits of a float32
RTOL = {"float64": 1e-6, "float32": 5e-3}
N = 20_000


# start values away from the optimum, so the optimiser does the work on the device
INIT = {"normal": {"loc": 0.0, "scale": 1.0}, "gamma": {"concentration": 0.8, "rate": 2.0}}


def spec(family: str, params: dict, device: str, dtype: str):
    return parse_spec({
        "name": "gpu-check", "family": family, "device": device, "dtype": dtype, "init": INIT[family],
        "data": {"simulate": {"params": params, "n": N, "seed": 17}},
        "optimizer": {"name": "lbfgs", "max_steps": 500},
    })


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
    assert gpu.nll == pytest.approx(-stats.norm.logpdf(x, closed_form["loc"], closed_form["scale"]).sum(),
                                    rel=RTOL[dtype])


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
