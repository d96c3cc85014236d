"""nllflow against scipy.stats on the same data, and the costs around a fit (`make bench`).

    .venv/bin/python benchmarks/run.py [--quick] [--device cpu|cuda] [--dtype float64 float32]
                                       [--repeats 3] [--skip-fixed] [--out benchmarks/results]

In one run, on data drawn once per family and size and handed to both sides:
- scipy.stats `fit` (floc=0 for the positive families; Student-t with all three parameters) against
  nllflow's `fit_mle` (L-BFGS, the default) for normal, gamma, lognormal, Weibull and Student-t at
  N = 1e4, 1e5, 1e6: medians of --repeats runs (one run where scipy takes over 10 s; calls under
  0.25 s in all are repeated until they reach it, at most 25 times: see `timed`), imports and
  data generation excluded, each nllflow run on a fresh Observations (its statistics computed
  inside the timing). Both NLLs are computed by scipy's logpdf at each side's estimate. "one pass"
  is the time of np.log(x).sum() (of |x| for Student-t): the data-pass floor.
- Student-t at N = 1e7, nllflow alone, in a subprocess: fit time and peak memory (the RSS high-water
  mark above the process's RSS before the data were loaded; on CUDA the allocator's peak).
- The batched sweep: K = 16 Adam learning rates in one tensor program against one fit and against
  the 16 fits one after another.
- Fan-out: one sweep of K = 48 configurations (8 with --quick) through `threads`, `batched`, `dask`
  (a LocalCluster) and `deployment` (the `make serve` stack; skipped when none is up): configurations
  per second.
- Recording: `Tracker.record_fit` of a fit with a 1000-step trace into a fresh SQLite MLflow store,
  against the fit's own time.
- The parameter models (benchmarks/models.py): NB2 and Poisson regressions against statsmodels on
  20 190 rows; a network's test NLL against the linear model's and NGBoost's on bundled public data;
  network training throughput at 1e6 rows × 10 features against a hand-written PyTorch loop.
- Fixed costs: `nllflow --help`, `nllflow families`, a refused input, whether those import Prefect
  or MLflow, a Prefect temporary server's start, an MLflow store's creation, and one whole
  `nllflow fit --json` with the timings it reports.
- End to end: `nllflow fit` on the groundbeef file the first time in a fresh home, warm (the
  background Prefect server running) and cold (stopped); `nllflow run` of the demo spec (its flow
  body); and the whole `python -c` process of scipy.stats.gamma.fit on the same file, as ratios.
It prints the tables and every target with its measured value, and writes results.parquet,
summary.json (every target: target, measured, goal, met, the load average) and results.png to
--out (git-ignored). --device cuda runs the nllflow side on the GPU (data moved there
before the clock starts, CUDA synchronised) and exits cleanly with a note where CUDA is absent.
--quick is a smoke run at small N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from scipy import stats

from nllflow.families import get_family
from nllflow.fitting.mle import FitSettings, fit_mle
from nllflow.likelihood.observations import Observations

ROOT = Path(__file__).resolve().parents[1]

SLOW_SECONDS = 10.0  # a scipy fit slower than this is timed once
MIN_TIMED_SECONDS = 0.25  # faster calls are repeated until their times add up to this
MAX_REPEATS = 25
NLL_TOLERANCE = 1e-9  # nllflow's NLL may exceed scipy's by this fraction of |NLL|
TARGET_N = 1_000_000  # where the fit-time ratios are judged
SWEEP_K = 16
RECORD_STEPS = 1000


@dataclass(frozen=True)
class Case:
    """A family, how to draw data from it, and how scipy fits it (its estimate in nllflow's names)."""

    draw: Callable[[np.random.Generator, int], np.ndarray]
    scipy_fit: Callable[[np.ndarray], dict[str, float]]
    ratio_target: float  # nllflow / scipy fit time at the largest size


CASES: dict[str, Case] = {
    "normal": Case(
        lambda rng, n: rng.normal(1.0, 2.0, n),
        lambda x: (lambda t: {"loc": t[0], "scale": t[1]})(stats.norm.fit(x)),
        1.0,
    ),
    "gamma": Case(
        lambda rng, n: rng.gamma(2.5, 1 / 1.7, n),
        lambda x: (lambda t: {"concentration": t[0], "rate": 1 / t[2]})(stats.gamma.fit(x, floc=0)),
        1.0,
    ),
    "lognormal": Case(
        lambda rng, n: rng.lognormal(0.3, 0.8, n),
        lambda x: (lambda t: {"loc": math.log(t[2]), "scale": t[0]})(stats.lognorm.fit(x, floc=0)),
        1.0,
    ),
    "weibull": Case(
        lambda rng, n: 2.0 * rng.weibull(1.5, n),
        lambda x: (lambda t: {"scale": t[2], "concentration": t[0]})(stats.weibull_min.fit(x, floc=0)),
        0.1,
    ),
    "studentt": Case(
        lambda rng, n: 1.0 + 2.0 * rng.standard_t(4.0, n),
        lambda x: (lambda t: {"df": t[0], "loc": t[1], "scale": t[2]})(stats.t.fit(x)),
        0.1,
    ),
}


def scipy_nll(name: str, params: dict[str, float], x: np.ndarray) -> float:
    """The one judge of both estimates: scipy's log-density, through the registry's mapping."""
    return float(-get_family(name).scipy(params).logpdf(x).sum())


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(
    function: Callable[[], Any], repeats: int, device: str = "cpu", at_least: float = MIN_TIMED_SECONDS
) -> tuple[float, Any]:
    """Median wall time of `repeats` calls (one when the first is slow; more, up to MAX_REPEATS,
    while they add up to under `at_least` seconds: a median of three millisecond calls moved by 2x
    between runs here) and the last result."""
    times, result = [], None
    while len(times) < repeats or (sum(times) < at_least and len(times) < MAX_REPEATS):
        synchronize(device)
        start = time.perf_counter()
        result = function()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if times[0] > SLOW_SECONDS:
            break
    return float(np.median(times)), result


def nllflow_fit(name: str, x: torch.Tensor, settings: FitSettings | None = None, init: dict | None = None):
    return fit_mle(get_family(name), Observations(x), settings=settings or FitSettings(), init=init)


# where the batched sweep's Adam rows start: away from the MLE (the gamma's start rule is the MLE,
# from which every row would stop at step 0)
SWEEP_INIT: dict[str, dict[str, float] | None] = {"gamma": {"concentration": 0.8, "rate": 2.0}, "studentt": None}


def compare_with_scipy(
    families: list[str], sizes: list[int], repeats: int, device: str = "cpu", dtype: str = "float64", seed: int = 0
) -> list[dict[str, Any]]:
    """Both fitters on the same data per family and size; both NLLs judged by scipy."""
    rows = []
    torch_dtype = getattr(torch, dtype)
    for name in families:
        case = CASES[name]
        nllflow_fit(
            name, torch.as_tensor(case.draw(np.random.default_rng(seed), 100), dtype=torch_dtype, device=device)
        )
        for n in sizes:
            x = case.draw(np.random.default_rng(seed + n), n)
            tensor = torch.as_tensor(x, dtype=torch_dtype, device=device)
            positive = x if x.min() > 0 else np.abs(x)
            one_pass, _ = timed(lambda positive=positive: np.log(positive).sum(), repeats)
            scipy_s, scipy_params = timed(lambda case=case, x=x: case.scipy_fit(x), repeats)
            ours_s, result = timed(lambda name=name, tensor=tensor: nllflow_fit(name, tensor), repeats, device)
            ours_nll, theirs_nll = scipy_nll(name, result.params, x), scipy_nll(name, scipy_params, x)
            target = case.ratio_target if n == TARGET_N else None
            rows.append(
                {
                    "section": "vs scipy",
                    "name": name,
                    "n": n,
                    "device": device,
                    "dtype": dtype,
                    "scipy_s": scipy_s,
                    "nllflow_s": ours_s,
                    "ratio": ours_s / scipy_s,
                    "one_pass_s": one_pass,
                    "steps": result.steps,
                    "converged": result.converged,
                    "nll_scipy": theirs_nll,
                    "nll_nllflow": ours_nll,
                    "nll_diff": ours_nll - theirs_nll,
                    "nll_ok": ours_nll <= theirs_nll + NLL_TOLERANCE * abs(theirs_nll),
                    "target": f"ratio <= {target:g}" if target is not None else "",
                    "met": (ours_s / scipy_s <= target) if target is not None else None,
                }
            )
            print(_format_scipy_row(rows[-1]), flush=True)
    return rows


def _format_scipy_row(row: dict[str, Any]) -> str:
    verdict = "" if row["met"] is None else ("  target met" if row["met"] else "  target NOT met")
    return (
        f"{row['name']:10s} {row['n']:>10,d} {row['scipy_s'] * 1e3:11.2f} {row['nllflow_s'] * 1e3:11.2f} "
        f"{row['ratio']:8.3f} {row['one_pass_s'] * 1e3:10.2f} {row['steps']:6d} {row['nll_diff']:+12.3e} "
        f"{'yes' if row['nll_ok'] else 'NO':>6s}{verdict}"
    )


# --- Student-t at 1e7: time and peak memory in a process of its own -----------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def big_fit_child(path: str, device: str, dtype: str, repeats: int) -> None:
    """In the subprocess: load the data, fit it `repeats` times, print one JSON line."""
    torch_dtype = getattr(torch, dtype)
    nllflow_fit(
        "studentt", torch.as_tensor(np.random.default_rng(0).standard_t(4.0, 1000), dtype=torch_dtype, device=device)
    )
    before = _rss_bytes()
    x = np.load(path)
    tensor = torch.as_tensor(x, dtype=torch_dtype, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = nllflow_fit("studentt", tensor)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _maxrss_bytes() - before
    print(
        json.dumps(
            {
                "times": times,
                "peak_bytes": peak,
                "data_bytes": tensor.numel() * tensor.element_size(),
                "steps": result.steps,
                "converged": result.converged,
                "params": result.params,
            }
        )
    )


def big_fit(n: int, repeats: int, device: str, dtype: str) -> dict[str, Any]:
    """The Student-t fit at `n` points in a subprocess (see `big_fit_child`)."""
    x = CASES["studentt"].draw(np.random.default_rng(7), n)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.npy"
        np.save(path, x)
        del x
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child-big",
                str(path),
                "--device",
                device,
                "--dtype",
                dtype,
                "--repeats",
                str(repeats),
                "--threads",
                str(torch.get_num_threads()),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    seconds = float(np.median(found["times"]))
    memory = found["peak_bytes"] / found["data_bytes"]
    print(
        f"studentt   {n:>9,d}  fit {seconds:.3f} s (first {found['times'][0]:.3f} s), {found['steps']} steps, "
        f"peak memory {found['peak_bytes'] / 2**20:.0f} MiB = {memory:.2f} x the data "
        f"({found['data_bytes'] / 2**20:.0f} MiB)",
        flush=True,
    )
    return {
        "section": "1e7",
        "name": "studentt",
        "n": n,
        "device": device,
        "dtype": dtype,
        "nllflow_s": seconds,
        "steps": found["steps"],
        "converged": found["converged"],
        "value": memory,
        "target": "fit <= 2 s and peak memory <= 3x data",
        "met": seconds <= 2.0 and memory <= 3.0,
    }


# --- the batched sweep ---------------------------------------------------------------------------


def batched_sweep(name: str, n: int, device: str, dtype: str, repeats: int) -> dict[str, Any]:
    from nllflow.fitting.batched import fit_batched

    x = torch.as_tensor(CASES[name].draw(np.random.default_rng(3), n), dtype=getattr(torch, dtype), device=device)
    rates = np.logspace(-3, -0.5, SWEEP_K).tolist()
    settings = [FitSettings("adam", lr, 300) for lr in rates]
    one = FitSettings("adam", 0.05, 300)
    init = SWEEP_INIT[name]
    nllflow_fit(name, x[:100], one, init)
    one_s, single = timed(lambda: nllflow_fit(name, x, one, init), repeats, device)
    batched_s, results = timed(
        lambda: fit_batched(get_family(name), Observations(x), settings, init=init), repeats, device
    )
    sequential_s, _ = timed(lambda: [nllflow_fit(name, x, s, init) for s in settings], 1, device)
    steps = sum(r.steps for r in results)
    ratio = batched_s / one_s
    print(
        f"{name:10s} {n:>9,d}  one fit {one_s:.3f} s ({single.steps} steps)  {SWEEP_K} fits batched {batched_s:.3f} s "
        f"({steps} row-steps)  one by one {sequential_s:.3f} s  batched/one {ratio:.2f}  "
        f"{'target met' if ratio <= 3 else 'target NOT met'}",
        flush=True,
    )
    return {
        "section": "batched sweep",
        "name": name,
        "n": n,
        "device": device,
        "dtype": dtype,
        "nllflow_s": batched_s,
        "one_fit_s": one_s,
        "sequential_s": sequential_s,
        "ratio": ratio,
        "steps": steps,
        "target": "batched <= 3x one fit",
        "met": ratio <= 3.0,
    }


# --- recording overhead --------------------------------------------------------------------------


def recording(n: int, repeats: int) -> list[dict[str, Any]]:
    """A 1000-step Adam trace recorded into a fresh SQLite store: the trace alone (its metric
    histories and trace.parquet: the target) and the whole `record_fit` (parameters, final metrics,
    artifacts and three plots). The store's creation is timed apart, as a fixed cost."""
    home = Path(tempfile.mkdtemp(prefix="nllflow-bench-"))
    os.environ["NLLFLOW_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    from nllflow.pipeline import steps
    from nllflow.spec import parse_spec
    from nllflow.tracking.recorder import Tracker, _trace_metrics

    spec = parse_spec(
        {
            "name": "bench-record",
            "family": "gamma",
            "device": "cpu",
            "data": {"simulate": {"params": {"concentration": 2.5, "rate": 1.7}, "n": n, "seed": 1}},
            "init": {"concentration": 0.8, "rate": 2.0},
            "optimizer": {"name": "adam", "lr": 0.01, "max_steps": RECORD_STEPS - 1, "gtol": 1e-300, "ftol": 0.0},
        }
    )
    data = steps.load_data(spec)
    problem = steps.build_problem(spec, data)
    fit_s, result = timed(lambda: steps.optimise(problem), repeats)
    evaluation = steps.evaluate(problem, data, result)
    start = time.perf_counter()
    tracker = Tracker()
    experiment_id = tracker.experiment_id(spec.name)
    store_s = time.perf_counter() - start

    def trace_only() -> None:
        result.__dict__.pop("trace", None)  # the trace's frame is built by its first reader: here
        run_id = tracker.client.create_run(experiment_id).info.run_id
        tracker._log_metrics(run_id, _trace_metrics(result, int(time.time() * 1000)))
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "trace.parquet"
            result.trace.to_parquet(path, index=False)
            tracker.client.log_artifact(run_id, str(path))
        tracker.client.set_terminated(run_id)

    # (runs written to the store: `repeats` of each, no more)
    trace_s, _ = timed(trace_only, repeats, at_least=0)
    record_s, _ = timed(
        lambda: tracker.record_fit(spec, data, problem, result, evaluation, key=uuid.uuid4().hex), repeats, at_least=0
    )
    limit = max(0.1 * fit_s, 0.3)
    print(
        f"a {len(result.trace)}-step trace (metric histories + trace.parquet): {trace_s:.3f} s "
        f"for a fit of {fit_s:.3f} s "
        f"(+{trace_s / fit_s:.0%})  {'target met' if trace_s <= limit else 'target NOT met'}\n"
        f"the whole record_fit (parameters, metrics, trace, fit table, plots of n={n:,d}): {record_s:.3f} s\n"
        f"creating the SQLite store and its experiment (a fixed cost): {store_s:.3f} s",
        flush=True,
    )
    return [
        {
            "section": "recording",
            "name": "trace",
            "n": n,
            "nllflow_s": trace_s,
            "one_fit_s": fit_s,
            "ratio": trace_s / fit_s,
            "steps": len(result.trace),
            "device": "cpu",
            "target": "<= 10% of the fit or <= 0.3 s",
            "met": trace_s <= limit,
        },
        {
            "section": "recording",
            "name": "record_fit",
            "n": n,
            "nllflow_s": record_s,
            "one_fit_s": fit_s,
            "ratio": record_s / fit_s,
            "steps": len(result.trace),
            "device": "cpu",
        },
        {"section": "fixed", "name": "MLflow SQLite store creation", "nllflow_s": store_s},
    ]


# --- fan-out: configurations per second -----------------------------------------------------------


FAN_OUTS = ("threads", "batched", "dask", "deployment")


def fan_out_spec(k: int, fan_out: str, n: int = 2_000) -> dict[str, Any]:
    """One sweep for every fan-out: K Adam learning rates on one simulated gamma data set, without
    the per-child diagnostic plots (they cost about 1 s a child whatever the fan-out)."""
    return {
        "name": f"bench-fan-out-{fan_out}",
        "family": "gamma",
        "device": "cpu",
        "record_plots": False,
        "data": {"simulate": {"params": {"concentration": 2.5, "rate": 1.7}, "n": n, "seed": 1}},
        "init": {"concentration": 0.8, "rate": 2.0},
        "optimizer": {"name": "adam", "max_steps": 100},
        "sweep": {"lr": [float(f"{lr:.6g}") for lr in np.geomspace(1e-3, 0.3, k)], "fan_out": fan_out},
    }


def fan_out(k: int) -> list[dict[str, Any]]:
    """The same K-configuration sweep through each fan-out, in this process (one temporary Prefect
    server, started by a warm-up sweep that is not timed): configurations per second of the whole
    sweep flow, the parent run and the comparison included; `dask` includes its LocalCluster's start.
    `deployment` runs on the stack `make serve` started (its Prefect server, workers and MLflow
    server) and is skipped, saying why, when none is up. The others record into a fresh SQLite store."""
    from nllflow.flows import serve

    stack = serve.read_state()  # in the caller's nllflow home, before this run gets one of its own
    if stack is not None and not all(serve.is_running(p) for p in stack["processes"]):
        stack = None
    home = Path(tempfile.mkdtemp(prefix="nllflow-bench-fan-out-"))
    os.environ.update(
        NLLFLOW_HOME=str(home),
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        # a fresh PREFECT_HOME: the temporary server creates its database first (slow on a busy machine)
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )
    os.environ.pop("PREFECT_API_URL", None)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from nllflow.flows.sweep import sweep
    from nllflow.spec import parse_spec

    sweep(parse_spec(fan_out_spec(2, "threads")))  # the temporary server, imports, the first optimiser
    rows = []
    for mode in FAN_OUTS:
        settings, store = {}, os.environ["MLFLOW_TRACKING_URI"]
        if mode == "deployment":
            if stack is None:
                print(f"{mode:10s} skipped: no stack is up (make serve starts one; this measures its workers)")
                continue
            settings, store = {PREFECT_API_URL: stack["prefect_api_url"]}, stack["mlflow_tracking_uri"]
        saved, os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"], store
        try:
            with temporary_settings(settings):
                start = time.perf_counter()
                summary = sweep(parse_spec(fan_out_spec(k, mode)))
                seconds = time.perf_counter() - start
        finally:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        failed = len(summary["failed"])
        print(
            f"{mode:10s} {k} configurations in {seconds:7.2f} s: {k / seconds:6.2f} configurations/s"
            + (f", {failed} FAILED" if failed else ""),
            flush=True,
        )
        rows.append(
            {
                "section": "fan-out",
                "name": mode,
                "n": k,
                "nllflow_s": seconds,
                "value": k / seconds,
                "note": f"{failed} failed" if failed else "",
                "device": "cpu",
            }
        )
    return rows


# --- fixed costs ---------------------------------------------------------------------------------


def _run(command: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """The command's whole-process wall time and its outcome; an empty value in `env` unsets it."""
    start = time.perf_counter()
    merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if v != ""}
    done = subprocess.run(command, capture_output=True, text=True, env=merged, cwd=ROOT)
    return time.perf_counter() - start, done


def fixed_costs(repeats: int, n: int) -> list[dict[str, Any]]:
    cli = str(Path(sys.executable).parent / "nllflow")
    rows = []
    for label, args in (
        ("nllflow --help", ["--help"]),
        ("nllflow families", ["families"]),
        ("nllflow fit, refused input", ["fit", "--data", "missing.csv", "--column", "x", "--family", "gamma"]),
    ):
        seconds = float(np.median([_run([cli, *args])[0] for _ in range(repeats)]))
        rows.append({"section": "fixed", "name": label, "nllflow_s": seconds})
    probe = (
        "import sys, json; from nllflow.flows.cli import main; main({args!r}); "
        "print(json.dumps({{m: m in sys.modules for m in ('prefect', 'mlflow', 'torch')}}))"
    )
    for label, args in (
        ("families", ["families"]),
        ("refused input", ["fit", "--data", "missing.csv", "--column", "x", "--family", "gamma"]),
    ):
        _, done = _run([sys.executable, "-c", probe.format(args=args)])
        imported = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "section": "fixed",
                "name": f"imports of nllflow {label}",
                "note": ", ".join(f"{k}: {'imported' if v else 'not imported'}" for k, v in imported.items()),
                "met": not (imported["prefect"] or imported["mlflow"]),
                "target": "no prefect, no mlflow",
            }
        )
    with tempfile.TemporaryDirectory() as home:
        server = (
            "import time, prefect\nstart = time.perf_counter()\n@prefect.flow\ndef noop():\n    return 1\n"
            "noop()\nprint(time.perf_counter() - start)"
        )
        for label in ("a fresh PREFECT_HOME", "its database in place"):
            _, done = _run(
                [sys.executable, "-c", server],
                {"PREFECT_HOME": home, "PREFECT_API_URL": "", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
            )
            rows.append(
                {
                    "section": "fixed",
                    "name": f"Prefect temporary server + one flow, {label}",
                    "nllflow_s": float(done.stdout.strip().splitlines()[-1]),
                    "note": "import prefect excluded",
                }
            )
        data = Path(home) / "x.parquet"
        pd.DataFrame({"x": CASES["gamma"].draw(np.random.default_rng(2), n)}).to_parquet(data)
        env = {
            "PREFECT_HOME": home,
            "NLLFLOW_HOME": home,
            "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": "",
        }
        try:
            wall, done = _run(
                [cli, "fit", "--data", str(data), "--column", "x", "--family", "gamma", "--json", "--device", "cpu"],
                env,
            )
        finally:
            _run([cli, "server", "stop"], env)  # the server this fit started, by PID
        timings = json.loads(done.stdout.strip().splitlines()[-1])["timings"]
        rows.append(
            {
                "section": "fixed",
                "name": f"nllflow fit --json, n={n:,d}: whole process",
                "nllflow_s": wall,
                "note": ", ".join(f"{k} {v:.3f} s" for k, v in timings.items()),
            }
        )
    for row in rows:
        seconds = f"{row['nllflow_s']:8.3f} s" if "nllflow_s" in row else " " * 10
        print(f"{row['name']:52s} {seconds}  {row.get('note', '')}", flush=True)
    return rows


# --- end to end: the command as a user runs it ------------------------------------------------

GROUNDBEEF = ROOT / "experiments" / "data" / "groundbeef.parquet"
DEMO_SPEC = ROOT / "experiments" / "gamma_lr_sweep.yaml"
SCIPY_PROCESS = (
    "import sys, pandas as pd; from scipy import stats; "
    "x = pd.read_parquet(sys.argv[1])['serving'].to_numpy(); print(stats.gamma.fit(x, floc=0))"
)


def _checked(done: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    if done.returncode != 0:
        raise RuntimeError(f"{what} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _runner_idle(home: str, timeout_s: float = 120) -> None:
    """Until the warm runner of `home` has no child left: the last command's figures, rendered
    after its answer, are logged (the idle time a user leaves between commands)."""
    try:
        runner = json.loads((Path(home) / "server" / "runner.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                children.append(int(stat.read_text().rsplit(")", 1)[1].split()[1]) == runner)
            except (OSError, IndexError, ValueError):
                continue
        if not any(children):
            return
        time.sleep(0.2)


def end_to_end(repeats: int) -> list[dict[str, Any]]:
    """`nllflow fit` on the groundbeef file as a user runs it, in a fresh nllflow home: the first
    command ever (it creates the stores and starts the background server), warm (the server and
    its warm runner running, each command after the last one's figures are logged; and in a process
    of its own, NLLFLOW_WARM=0), cold (the server
    stopped, the home in place); `nllflow run` of the demo spec on the
    warm server (its flow body); the whole process of `python -c` with scipy.stats.gamma.fit on the
    same file. The server is stopped at the end by PID, also when a command fails."""
    cli = str(Path(sys.executable).parent / "nllflow")
    fit = [cli, "fit", "--data", str(GROUNDBEEF), "--column", "serving", "--family", "gamma", "--json"]
    rows: list[dict[str, Any]] = []

    def row(name: str, seconds: float, **extra: Any) -> None:
        rows.append({"section": "end to end", "name": name, "nllflow_s": seconds, **extra})

    with tempfile.TemporaryDirectory(prefix="nllflow-e2e-") as home:
        env = {
            "NLLFLOW_HOME": home,
            "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
            "PREFECT_API_URL": "",
            "PREFECT_HOME": "",
        }
        try:
            first_s, done = _run(fit, env)
            _checked(done, "nllflow fit (first)")
            runner = Path(home) / "server" / "runner.json"
            deadline = time.monotonic() + 300
            while not runner.exists() and time.monotonic() < deadline:  # a warm server: its runner ready
                time.sleep(0.5)
            scipy_s = float(
                np.median([_run([sys.executable, "-c", SCIPY_PROCESS, str(GROUNDBEEF)])[0] for _ in range(repeats)])
            )
            warm = []
            for _ in range(repeats):
                _runner_idle(home)
                seconds, done = _run(fit, env)
                warm.append((seconds, _checked(done, "nllflow fit (warm)")["timings"]))
            _runner_idle(home)
            warm_s = float(np.median([w for w, _ in warm]))
            own_process_s = float(np.median([_run(fit, {**env, "NLLFLOW_WARM": "0"})[0] for _ in range(repeats)]))
            body_s = float(np.median([t["total"] for _, t in warm]))
            sweep_wall, done = _run([cli, "run", str(DEMO_SPEC), "--json"], env)
            sweep_body = _checked(done, "nllflow run")["timings"]["total"]
            _runner_idle(home)
            _run([cli, "server", "stop"], env)
            cold_s, done = _run(fit, env)
            _checked(done, "nllflow fit (cold)")
        finally:
            _run([cli, "server", "stop"], env)
    laps = ", ".join(f"{k} {np.median([t[k] for _, t in warm]):.3f}" for k in warm[0][1])
    row("python -c scipy.stats.gamma.fit (whole process)", scipy_s)
    row(
        "nllflow fit, warm (server running)",
        warm_s,
        ratio=warm_s / scipy_s,
        target="<= 4x the scipy process",
        met=warm_s <= 4 * scipy_s,
        note=f"timings (medians): {laps}",
    )
    row(
        "nllflow fit, warm server, NLLFLOW_WARM=0 (own process)",
        own_process_s,
        ratio=own_process_s / scipy_s,
    )
    row(
        "nllflow fit, warm: timings.total (flow body)",
        body_s,
        target="<= 0.5 s",
        met=body_s <= 0.5,
    )
    row("nllflow fit, cold (no server running)", cold_s, ratio=cold_s / scipy_s, target="<= 10 s", met=cold_s <= 10)
    row("nllflow fit, first ever (fresh home: stores created)", first_s, ratio=first_s / scipy_s)
    row(
        "nllflow run gamma_lr_sweep.yaml: flow body (warm server)",
        sweep_body,
        target="<= 5 s",
        met=sweep_body <= 5,
        note=f"whole process {sweep_wall:.2f} s",
    )
    print(f"{'':52s} {'seconds':>9s} {'/ scipy':>8s}")
    for r in rows:
        ratio = f"{r['ratio']:8.2f}" if "ratio" in r else " " * 8
        verdict = "" if r.get("met") is None else ("  target met" if r["met"] else "  target NOT met")
        print(f"{r['name']:52s} {r['nllflow_s']:9.3f} {ratio}{verdict}  {r.get('note', '')}", flush=True)
    return rows


# --- output --------------------------------------------------------------------------------------


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versus = table[table["section"] == "vs scipy"]
    names = list(dict.fromkeys(versus["name"]))
    if not names:
        return
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names, strict=False):
        for (device, dtype), rows in versus[versus["name"] == name].groupby(["device", "dtype"]):
            axis.plot(rows["n"], rows["nllflow_s"], "o-", label=f"nllflow {device} {dtype}")
        rows = versus[(versus["name"] == name)].drop_duplicates("n")
        axis.plot(rows["n"], rows["scipy_s"], "s--", color="k", label="scipy.stats fit")
        axis.plot(rows["n"], rows["one_pass_s"], ":", color="grey", label="one pass (np.log sum)")
        axis.set(xscale="log", yscale="log", xlabel="N", ylabel="seconds", title=name)
        axis.legend(fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report_targets(table: pd.DataFrame, quick: bool) -> None:
    print("\nTargets")
    versus = table[(table["section"] == "vs scipy") & (table["dtype"] == "float64")]
    if len(versus):
        worst = versus.loc[(versus["nll_diff"] / versus["nll_scipy"].abs()).idxmax()]
        print(
            f"  NLL <= scipy's + {NLL_TOLERANCE:g}|NLL| in every comparison: "
            f"{'met' if versus['nll_ok'].all() else 'NOT met'} "
            f"(largest relative difference {worst['nll_diff'] / abs(worst['nll_scipy']):+.2e}, {worst['name']} "
            f"n={int(worst['n']):,d})"
        )
    if quick:
        print("  (a --quick run: the speed targets are judged at the full sizes only)")
    for row in table[table["met"].notna() & ~table["section"].isin(["fixed", "end to end"])].itertuples():
        value = f"ratio {row.ratio:.3f}" if isinstance(row.ratio, float) and math.isfinite(row.ratio) else ""
        if row.section == "1e7":
            value = f"{row.nllflow_s:.3f} s, peak memory {row.value:.2f}x the data"
        print(
            f"  {row.section:13s} {row.name:10s} n={int(row.n):>10,d} {row.device or '':5s} {row.target:32s} "
            f"{value:42s} "
            f"{'met' if row.met else 'NOT met'}"
        )
    for row in table[(table["section"] == "fixed") & table["met"].notna()].itertuples():
        print(f"  {row.name:45s} {row.target:32s} {row.note:42s} {'met' if row.met else 'NOT met'}")
    for row in table[(table["section"] == "end to end") & table["met"].notna()].itertuples():
        value = f"{row.nllflow_s:.3f} s" + (f" ({row.ratio:.2f}x scipy)" if "scipy" in row.target else "")
        print(f"  {row.name:58s} {row.target:26s} {value:26s} {'met' if row.met else 'NOT met'}")


def summary(table: pd.DataFrame, load: tuple[float, float]) -> list[dict[str, Any]]:
    """Every judged target with its measured value and verdict (summary.json)."""
    entries = []
    versus = table[(table["section"] == "vs scipy") & (table["dtype"] == "float64")]
    if len(versus):
        relative = (versus["nll_diff"] / versus["nll_scipy"].abs()).max()
        entries.append(
            {
                "target": "NLL never worse than scipy's (every vs-scipy comparison)",
                "measured": float(relative),
                "goal": f"largest (NLL nllflow - NLL scipy)/|NLL scipy| <= {NLL_TOLERANCE:g}",
                "met": bool(versus["nll_ok"].all()),
            }
        )
    for row in table[table["met"].notna()].itertuples():
        measured = row.ratio if isinstance(row.ratio, float) and math.isfinite(row.ratio) else row.nllflow_s
        if row.section == "1e7":
            measured = {"seconds": row.nllflow_s, "peak_memory_x_data": row.value}
        elif row.section == "end to end" and "x the scipy" not in row.target:
            measured = row.nllflow_s
        label = f"{row.section}: {row.name}" + (
            f" n={int(row.n):,d}" if isinstance(row.n, float) and row.n == row.n else ""
        )
        entries.append(
            {
                "target": label,
                "measured": measured if isinstance(measured, dict) else float(measured),
                "goal": row.target,
                "met": bool(row.met),
            }
        )
    for entry in entries:
        entry["load_average"] = {"start": round(load[0], 2), "end": round(load[1], 2)}
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run at small N")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", default=["float64"], choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own choice)")
    parser.add_argument("--skip-fixed", action="store_true", help="leave out the fixed costs (servers, CLI)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child-big", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_big:
        big_fit_child(args.child_big, args.device, args.dtype[0], args.repeats)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: the CUDA benchmark is skipped (run it on a machine with a GPU)")
        return 0
    sizes = [1_000, 10_000] if args.quick else [10_000, 100_000, 1_000_000]
    big_n = 100_000 if args.quick else 10_000_000
    load = os.getloadavg()[0]
    print(
        f"nllflow benchmark: {args.device}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}" + (" (a busy machine: timings are noisy)" if load > 1 else "")
    )
    rows: list[dict[str, Any]] = []
    for dtype in args.dtype:
        print(
            f"\nscipy.stats fit vs nllflow fit_mle (L-BFGS), {dtype}, medians of {args.repeats}; nll_diff = "
            "nllflow NLL - scipy NLL (negative: nllflow better), both by scipy's logpdf"
        )
        print(
            f"{'family':10s} {'N':>10s} {'scipy ms':>11s} {'nllflow ms':>11s} {'ratio':>8s} {'1 pass ms':>10s} "
            f"{'steps':>6s} {'nll_diff':>12s} {'NLL ok':>6s}"
        )
        rows += compare_with_scipy(list(CASES), sizes, args.repeats, args.device, dtype)
    print(f"\nStudent-t at N={big_n:,d}, nllflow alone, in a subprocess")
    for dtype in args.dtype:
        rows.append(big_fit(big_n, args.repeats, args.device, dtype))
    print(f"\nBatched sweep: K={SWEEP_K} Adam learning rates in one tensor program (300 steps at most)")
    for name, n in (
        ("gamma", 1_000 if args.quick else 100_000),
        ("studentt", 1_000 if args.quick else 10_000),
        ("studentt", 10_000 if args.quick else 100_000),
    ):
        rows.append(batched_sweep(name, n, args.device, args.dtype[0], args.repeats))
    import models

    print(f"\nRegression against statsmodels on the RAND HIE rows, medians of {args.repeats}")
    rows += models.regression_vs_statsmodels(args.repeats, args.quick)
    print("\nNetworks: test mean NLL on one train/test split (75/25) of bundled public data")
    with tempfile.TemporaryDirectory() as folder:
        rows += models.networks_vs_linear_and_ngboost(args.quick, Path(folder))
    print("\nNetwork training throughput against a hand-written PyTorch loop")
    rows += models.throughput(args.quick)
    print(f"\nFan-out: one sweep of {8 if args.quick else 48} configurations through each fan-out")
    rows += fan_out(8 if args.quick else 48)
    if not args.skip_fixed:
        print("\nRecording (MLflow + Parquet) against the fit")
        rows += recording(1_000 if args.quick else 100_000, args.repeats)
        print("\nFixed costs")
        rows += fixed_costs(args.repeats, 1_000 if args.quick else 100_000)
        print("\nEnd to end: the command as a user runs it (groundbeef, 254 points, gamma)")
        rows += end_to_end(args.repeats)
    table = pd.DataFrame(rows)
    if args.quick:  # the targets are set for the full sizes: a smoke run judges only the NLLs
        table.loc[table["section"].isin(["1e7", "batched sweep", "recording", "end to end"]), "met"] = None
    for column in ("note", "target", "device"):
        if column not in table:
            table[column] = ""
        table[column] = table[column].fillna("")
    for column in ("ratio", "value", "met", "n"):
        if column not in table:
            table[column] = None
    report_targets(table, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    end_load = os.getloadavg()[0]
    (args.out / "summary.json").write_text(json.dumps(summary(table, (load, end_load)), indent=2))
    print(f"load average {load:.1f} at the start, {end_load:.1f} at the end")
    table.assign(load_average=load, torch_threads=torch.get_num_threads()).to_parquet(
        args.out / "results.parquet", index=False
    )
    plot(table, args.out / "results.png")
    print(f"\nwrote {args.out / 'results.parquet'}, {args.out / 'summary.json'} and {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
