"""GPU check: the same fits on CUDA and on the CPU, their agreement and their times.

    .venv/bin/python benchmarks/gpu_check.py [--sizes 10000 1000000] [--repeats 3]

For each family × dtype × sample size: fit with L-BFGS (to convergence) and with Adam (a fixed
100 steps, a per-step throughput figure) on both devices; print the wall time of the optimisation
(best of --repeats, after a warm-up, CUDA synchronised), the steps, and the largest relative
difference of the estimates and of the NLL between the devices. Then train a network parameter
model (an MLP 64x64 from 10 covariates to a normal's loc and scale, mini-batches of 4096) on
--network-rows rows on CUDA (float32, its default there) and on the CPU (float32 and float64):
rows per second of training and the test mean NLL each reaches in the same epochs. Last, check
what the work pools rely on: `device: auto` resolves to CUDA with CUDA_VISIBLE_DEVICES=0 and to the
CPU with it empty.
Exit status 0 when every comparison is within tolerance, 1 otherwise or without CUDA.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nllflow.evaluation.summary import heldout_nll  # noqa: E402
from nllflow.pipeline.steps import build_problem, load_data, optimise  # noqa: E402
from nllflow.spec import parse_spec  # noqa: E402

CASES = {
    "normal": ({"loc": 2.0, "scale": 1.5}, {"loc": 0.0, "scale": 1.0}),
    "gamma": ({"concentration": 2.5, "rate": 1.5}, {"concentration": 0.8, "rate": 2.0}),
    "studentt": ({"df": 4.0, "loc": 1.0, "scale": 2.0}, {"df": 10.0, "loc": 0.0, "scale": 1.0}),
}
# what "agree" means: L-BFGS stops within its gtol of the same optimum on both devices; float32
# sums of many terms in a different order differ in their last bits
TOLERANCE = {"float64": 1e-6, "float32": 5e-3}


def spec(family: str, n: int, dtype: str, device: str, optimizer: dict):
    truth, init = CASES[family]
    return parse_spec(
        {
            "name": "gpu-check",
            "family": family,
            "device": device,
            "dtype": dtype,
            "init": init,
            "data": {"simulate": {"params": truth, "n": n, "seed": 23}},
            "optimizer": optimizer,
        }
    )


def timed_fit(family: str, n: int, dtype: str, device: str, optimizer: dict, repeats: int):
    configuration = spec(family, n, dtype, device, optimizer)
    problem = build_problem(configuration, load_data(configuration))
    optimise(problem)  # warm-up: CUDA context, kernels, allocator
    best, result = float("inf"), None
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = optimise(problem)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return problem, result, best


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def compare(sizes: list[int], repeats: int) -> bool:
    agree = True
    print(
        f"{'family':9s} {'dtype':8s} {'n':>8s} {'optimizer':10s} {'steps gpu/cpu':>13s} "
        f"{'gpu s':>8s} {'cpu s':>8s} {'speed-up':>8s} {'max rel diff':>12s}  verdict"
    )
    for family in CASES:
        for dtype in ("float64", "float32"):
            for n in sizes:
                for optimizer in ({"name": "lbfgs", "max_steps": 500}, {"name": "adam", "lr": 0.05, "max_steps": 100}):
                    gpu_problem, gpu, gpu_s = timed_fit(family, n, dtype, "auto", optimizer, repeats)
                    assert gpu_problem.device.startswith("cuda"), gpu_problem.device
                    _, cpu, cpu_s = timed_fit(family, n, dtype, "cpu", optimizer, repeats)
                    differences = [relative_difference(gpu.params[k], cpu.params[k]) for k in cpu.params]
                    differences.append(relative_difference(gpu.nll, cpu.nll))
                    worst = max(differences)
                    # Adam's fixed steps from the same start differ between devices by rounding only
                    ok = worst <= TOLERANCE[dtype] and gpu.converged == cpu.converged
                    agree &= ok
                    print(
                        f"{family:9s} {dtype:8s} {n:8d} {optimizer['name']:10s} {gpu.steps:>6d}/{cpu.steps:<6d} "
                        f"{gpu_s:8.3f} {cpu_s:8.3f} {cpu_s / gpu_s:8.2f} {worst:12.2e}  "
                        f"{'agree' if ok else 'DISAGREE'} ({gpu.reason} | {cpu.reason})"
                    )
    return agree


NETWORK_EPOCHS = 5


def network_data(rows: int, folder: Path) -> tuple[Path, Path]:
    """y ~ Normal(sin(x₁) + x₂x₃/2, exp(x₄/3)) with eight more standard-normal covariates."""
    paths = []
    for name, count, seed in (("train", rows, 1), ("test", max(rows // 10, 1000), 2)):
        generator = np.random.default_rng(seed)
        x = generator.standard_normal((count, 10))
        y = np.sin(x[:, 0]) + x[:, 1] * x[:, 2] / 2 + np.exp(x[:, 3] / 3) * generator.standard_normal(count)
        frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(10)]).assign(y=y)
        paths.append(folder / f"{name}.parquet")
        frame.to_parquet(paths[-1], index=False)
    return paths[0], paths[1]


def network_spec(train: Path, test: Path, device: str, dtype: str | None):
    return parse_spec(
        {
            "name": "gpu-check-network",
            "family": "normal",
            "device": device,
            "dtype": dtype,
            "data": {"path": str(train), "column": "y", "test_path": str(test)},
            "network": {"terms": " + ".join(f"x{i}" for i in range(10)), "hidden": [64, 64]},
            "training": {"batch_size": 4096, "validation": 0.0},
            "optimizer": {"name": "adam", "lr": 0.003, "max_steps": NETWORK_EPOCHS},
        }
    )


def network_check(rows: int) -> bool:
    """Network training on CUDA against the CPU: throughput and the test NLL after the same epochs."""
    print(f"\nnetwork 10 -> 64 -> 64 -> 2, {rows} rows, batch 4096, {NETWORK_EPOCHS} Adam epochs")
    print(f"{'device':6s} {'dtype':8s} {'rows/s':>12s} {'test mean NLL':>14s}")
    found = {}
    with tempfile.TemporaryDirectory() as folder:
        train, test = network_data(rows, Path(folder))
        for device, dtype in (("cuda", None), ("cpu", "float32"), ("cpu", "float64")):
            configuration = network_spec(train, test, device, dtype)
            data = load_data(configuration)
            problem = build_problem(configuration, data)
            if device == "cuda":
                assert problem.dtype == "float32" and problem.observations.values.is_cuda
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = optimise(problem)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            test_mean = heldout_nll(problem.family, problem.test, result) / problem.test.total_weight
            found[(device, problem.dtype)] = test_mean
            print(f"{device:6s} {problem.dtype:8s} {rows * NETWORK_EPOCHS / seconds:12.0f} {test_mean:14.6f}")
    # the same seed, data and epochs: CUDA float32 and CPU float32 follow nearly the same path
    agree = abs(found[("cuda", "float32")] - found[("cpu", "float32")]) <= 0.01 * abs(found[("cpu", "float32")])
    print("the network trains to the same test NLL on CUDA and the CPU" if agree else "network results DISAGREE")
    return agree


def auto_device_under(visible: str) -> str:
    """What `device: auto` resolves to in a process that sees CUDA_VISIBLE_DEVICES=`visible` (the
    work pools' job variables)."""
    code = "from nllflow.fitting.mle import resolve_device; print(resolve_device('auto'))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": visible},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--network-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"CUDA is not available to torch {torch.__version__}: nothing to compare")
        return 1
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    agree = compare(args.sizes, args.repeats)
    agree &= network_check(args.network_rows)
    pools = {"0": auto_device_under("0"), "": auto_device_under("")}
    print(f"device auto with CUDA_VISIBLE_DEVICES=0 (GPU pool): {pools['0']}; with it empty (CPU pool): {pools['']}")
    pools_ok = pools["0"].startswith("cuda") and pools[""] == "cpu"
    print("all fits agree" if agree else "some fits DISAGREE")
    print(
        "the pools' CUDA_VISIBLE_DEVICES select the devices"
        if pools_ok
        else "the pools' CUDA_VISIBLE_DEVICES do NOT select the devices"
    )
    return 0 if agree and pools_ok else 1


if __name__ == "__main__":
    sys.exit(main())
