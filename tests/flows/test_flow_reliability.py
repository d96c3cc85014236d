"""Reliability of the pipeline: bad input refused in one line by the CLI and by the flows with no run
left behind; divergence recorded as a failure with its finite trace; concurrent writers to a fresh
store lose nothing; a killed sweep leaves no ghost run; an unreachable tracking server fails fast.

(The first rows of the bad-input matrix live in test_cli.py; these are the rest.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nllflow.errors import InputError
from nllflow.flows.cli import main
from nllflow.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]


def all_runs(tracker) -> list:
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    return tracker.client.search_runs(experiments, max_results=10000) if experiments else []


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def bad_data(tmp_path):
    pd.DataFrame(
        {
            "half": [0, 1, 2, 2.5, 1],
            "negative": [0, 1, -1, 2, 1],
            "counts": [0, 3, 7, 2, 1],
            "x": [1.0, 2.0, 3.5, 4.0, 6.0],
            "w": [1.0, -1.0, 1.0, 1.0, 1.0],
            "holes": [1.0, np.nan, 2.0, np.inf, 3.0],
        }
    ).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "ragged.csv").write_text("x,y\n1,2\n3,4,5,6\n7,8\n")
    (tmp_path / "short.csv").write_text("x,y\n1,2\n3\n7,8\n")
    (tmp_path / "binary.csv").write_bytes(b"x\n\xff\xfe\x00\x01\n")
    (tmp_path / "header.csv").write_text("x,y\n")
    (tmp_path / "d.txt").write_text("x\n1\n2\n")
    return tmp_path


# --- the bad-input matrix through the CLI ----------------------------------------------------------

CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
BAD_FITS = [
    ("--column half --family categorical", "1 of 5 values in {d}/d.csv#half are outside the support of categorical"),
    (
        "--column negative --family categorical",
        "1 of 5 values in {d}/d.csv#negative are outside the support of categorical",
    ),
    ("--column half --family poisson", "1 of 5 values in {d}/d.csv#half are outside the support of poisson"),
    (
        "--column counts --family binomial --fix total_count=5",
        "fixed value total_count=5 is outside the parameter space of binomial: it must satisfy "
        "IntegerInterval(lower_bound=7.0",
    ),
    (
        "--column counts --family categorical --fix logits=0.1,0.2",
        "fixed value of logits for categorical must have 7 component(s), got 2",
    ),
    ("--init scale=-1", "initial value scale=-1 is outside the parameter space of normal"),
    ("--fix scale=inf", "fixed value of scale must be finite, got inf"),
    ("--init loc=nan", "initial value of loc must be finite, got nan"),
    ("--init loc=1,2", "initial value of loc for normal must have 1 component(s), got 2"),
    ("--family uniform --init low=2", "initial value low=2 is outside the parameter space of uniform"),
    ("--weights w", "weights column 'w' in {d}/d.csv has negative values"),
    ("--weights missing", "column 'missing' not found in {d}/d.csv"),
    ("--column holes", "column 'holes' in {d}/d.csv has 1 missing/NaN and 1 infinite value(s) out of 5"),
    ("--data {d}/ragged.csv", "cannot read {d}/ragged.csv as CSV: CSV parse error: Expected 2 columns, got 4"),
    ("--data {d}/short.csv", "cannot read {d}/short.csv as CSV: CSV parse error: Expected 2 columns, got 1"),
    # "cannot read ... as CSV" or "... is not numeric", as the installed pyarrow decodes the bytes
    ("--data {d}/binary.csv", "{d}/binary.csv"),
    ("--data {d}/header.csv", "column 'x' in {d}/header.csv is empty"),
    ("--data {d}/d.txt", "unsupported data file extension '.txt'"),
    ("--max-steps 0", "invalid arguments at optimizer.max_steps: Input should be greater than or equal to 1"),
    ("--max-steps many", "argument --max-steps: invalid int value: 'many'"),
    ("--holdout 1", "invalid arguments at data.holdout: Input should be less than 1"),
    ("--lr inf", "argument --lr: must be a positive number, got 'inf'"),
    ("--lr nan", "argument --lr: must be a positive number, got 'nan'"),
    ("--optimizer newton --lr 0.5", "newton takes full Newton steps, damped where they would not lower the NLL"),
    ("--dtype float16", "argument --dtype: invalid choice: 'float16'"),
    ("--device tpu", "argument --device: invalid choice: 'tpu'"),
    pytest.param(
        "--device cuda",
        "device 'cuda' requested but CUDA is not available here; valid: auto, cpu",
        marks=CUDA,
        id="cuda-without-cuda",
    ),
]


@pytest.mark.parametrize("arguments, message", BAD_FITS)
def test_more_bad_fit_input_is_one_line_exit_2_and_records_nothing(tracker, bad_data, capsys, arguments, message):
    given = arguments.format(d=bad_data).split()
    base = {"--data": f"{bad_data}/d.csv", "--column": "x", "--family": "normal"}
    base.update(dict(zip(given[::2], given[1::2], strict=False)))
    before = len(all_runs(tracker))
    assert main(["fit", *[part for pair in base.items() for part in pair]]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("nllflow: error: ")
    assert message.format(d=bad_data) in captured.err
    assert len(all_runs(tracker)) == before


SIMULATED = "data: {simulate: {params: {loc: 0, scale: 1}, n: 20}}\n"
BAD_SPECS = [
    (
        "name: s\nfamily: normal\noptimizer: {name: adam, momentum: 0.9}\n" + SIMULATED,
        "at optimizer.momentum: unknown key 'momentum'",
    ),
    (
        "name: s\nfamily: normal\nsweep: {lr: [0.1, fast]}\n" + SIMULATED,
        "at sweep.lr.1: Input should be a valid number",
    ),
    (
        "name: s\nfamily: normal\nsweep: {lr: [0.1, -1]}\n" + SIMULATED,
        "at sweep.lr: learning rates must be > 0, got -1",
    ),
    ("name: s\nfamily: normal\noptimizer: {lr: 0}\n" + SIMULATED, "at optimizer.lr: Input should be greater than 0"),
    ("name: s\nfamily: normal\ndevice: tpu\n" + SIMULATED, "at device: Input should be 'auto', 'cpu' or 'cuda'"),
    ("name: s\nfamily: normal\nfix: {scale: wide}\n" + SIMULATED, "at fix.scale.float: Input should be a valid number"),
    (
        "name: s\nfamily: normal\ndata: {simulate: {params: {loc: 0, sigma: 1}, n: 20}}\n",
        "simulating normal needs exactly the parameters loc, scale; got loc, sigma",
    ),
    (
        "name: s\nfamily: normal\ndata: {simulate: {params: {loc: 0, scale: -1}, n: 20}}\n",
        "invalid parameters for simulating normal",
    ),
    (
        "name: s\nfamily: normal\ndata: {simulate: {params: {loc: 0, scale: 1}, n: 1}}\n",
        "at data.simulate.n: Input should be greater than 1",
    ),
    (
        "name: s\nfamily: normal\noptimizer: {name: newton}\nsweep: {lr: [0.1, 1.0]}\n" + SIMULATED,
        "newton takes full Newton steps, damped where they would not lower the NLL: give no learning rate",
    ),
    ("- just\n- a list\n", "must hold a mapping of spec keys, got list"),
    ("name: [unclosed\n", "is not valid YAML"),
]


@pytest.mark.parametrize("text, message", BAD_SPECS, ids=[m[:40] for _, m in BAD_SPECS])
def test_more_bad_specs_fail_before_any_run(tracker, tmp_path, capsys, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    before = len(all_runs(tracker))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert len(all_runs(tracker)) == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("name.x=1", "--set name.x: 'name' is not a section"),
        ("optimizer.lr", "--set needs key=value, got 'optimizer.lr'"),
    ],
)
def test_bad_set_overrides_fail_before_any_run(tracker, capsys, override, message):
    before = len(all_runs(tracker))
    assert main(["run", str(ROOT / "experiments" / "seed_gaussian.yaml"), "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert len(all_runs(tracker)) == before


def test_the_installed_command_refuses_bad_data_in_exactly_one_line(bad_data, tmp_path):
    """No warning from the libraries on the way (torch warned about pandas' read-only arrays)."""
    env = {**os.environ, "NLLFLOW_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("nllflow")),
            "fit",
            "--data",
            str(bad_data / "d.csv"),
            "--column",
            "negative",
            "--family",
            "exponential",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"nllflow: error: 1 of 5 values in {bad_data}/d.csv#negative are outside "
        f"the support of exponential (GreaterThanEq(lower_bound=0.0)), e.g. -1"
    ]
    assert not (tmp_path / "m.db").exists()


# --- the same bad input handed to the flows directly (as a deployment would) -----------------------


def file_spec(bad_data: Path, **overrides) -> dict:
    raw = {
        "name": "bad-flow-input",
        "family": "normal",
        "device": "cpu",
        "data": {"path": str(bad_data / "d.csv"), "column": "x"},
        "optimizer": {"max_steps": 20},
    }
    raw.update(overrides)
    return raw


FLOW_ROWS = [
    ({"data": {"path": "{d}/d.csv", "column": "y"}}, "column 'y' not found in {d}/d.csv"),
    ({"data": {"path": "{d}/d.csv", "column": "holes"}}, "has 1 missing/NaN and 1 infinite value(s)"),
    ({"data": {"path": "{d}/ragged.csv", "column": "x"}}, "CSV parse error: Expected 2 columns, got 4"),
    ({"family": "categorical", "data": {"path": "{d}/d.csv", "column": "half"}}, "outside the support of categorical"),
    (
        {"family": "binomial", "fix": {"total_count": 5}, "data": {"path": "{d}/d.csv", "column": "counts"}},
        "fixed value total_count=5 is outside the parameter space of binomial",
    ),
    ({"init": {"scale": -1.0}}, "initial value scale=-1 is outside the parameter space of normal"),
    pytest.param({"device": "cuda"}, "CUDA is not available", marks=CUDA, id="cuda-without-cuda"),
]


def _with_folder(value, folder: Path):
    if isinstance(value, dict):
        return {k: _with_folder(v, folder) for k, v in value.items()}
    return value.format(d=folder) if isinstance(value, str) else value


@pytest.mark.parametrize("overrides, message", FLOW_ROWS)
def test_the_fit_flow_fails_on_bad_input_with_an_input_error_and_no_run(tracker, bad_data, overrides, message):
    from nllflow.flows.fit import fit

    spec = parse_spec(file_spec(bad_data, **_with_folder(overrides, bad_data)))
    before = len(all_runs(tracker))
    state = fit(spec, return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, InputError) and message.format(d=bad_data) in str(error)
    assert len(all_runs(tracker)) == before


@pytest.mark.parametrize("overrides, message", [FLOW_ROWS[2], FLOW_ROWS[4]])
def test_the_sweep_flow_fails_on_bad_input_before_its_parent_run_exists(tracker, bad_data, overrides, message):
    from nllflow.flows.sweep import sweep

    spec = parse_spec(file_spec(bad_data, sweep={"lr": [0.1, 1.0]}, **_with_folder(overrides, bad_data)))
    before = len(all_runs(tracker))
    with pytest.raises(InputError, match=message.format(d=bad_data).replace("(", r"\(")):
        sweep(spec)
    assert len(all_runs(tracker)) == before


def test_a_flow_given_an_invalid_spec_is_refused_by_its_parameter_schema(tracker):
    from nllflow.flows.fit import fit

    before = len(all_runs(tracker))
    raw = {
        "name": "x",
        "family": "normal",
        "colour": "red",
        "data": {"simulate": {"params": {"loc": 0, "scale": 1}, "n": 9}},
    }
    state = fit(raw, return_state=True)
    assert state.is_failed() and "colour" in state.message
    assert len(all_runs(tracker)) == before


# --- divergence -----------------------------------------------------------------------------------


def gamma_spec(**overrides):
    raw = {
        "name": "reliability-diverge",
        "family": "gamma",
        "device": "cpu",
        "data": {"simulate": {"params": {"concentration": 2.5, "rate": 1.5}, "n": 300, "seed": 5}},
        "init": {"concentration": 0.8, "rate": 2.0},
    }
    raw.update(overrides)
    return parse_spec(raw)


def assert_recorded_as_diverged(tracker, run_id: str, tmp_path: Path) -> pd.DataFrame:
    """FAILED with the reason; the trace is every finite step, up to the one before the blow-up the
    reason names, as artifact and as metric history alike."""
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED"
    reason = run.data.tags["reason"]
    assert reason.startswith("diverged: NLL became ")
    trace = pd.read_parquet(tracker.client.download_artifacts(run_id, "trace.parquet", str(tmp_path)))
    assert reason.endswith(f" at step {len(trace)}")  # it stopped at the first non-finite step
    assert np.isfinite(trace[["nll", "concentration", "rate"]].to_numpy()).all()
    assert run.data.metrics["steps"] == len(trace) - 1
    history = tracker.client.get_metric_history(run_id, "nll")
    assert [m.step for m in history] == list(range(len(trace)))
    np.testing.assert_array_equal([m.value for m in history], trace["nll"].to_numpy())
    assert run.data.metrics["estimate.rate"] == trace["rate"].iloc[-1]
    return trace


def test_an_lbfgs_blow_up_is_a_failed_flow_and_run_with_its_finite_trace(tracker, tmp_path):
    from nllflow.flows.fit import fit

    state = fit(gamma_spec(optimizer={"name": "lbfgs", "lr": 1e6, "max_steps": 50}), return_state=True)
    assert state.is_failed() and state.message.startswith("diverged")
    assert_recorded_as_diverged(tracker, state.result(raise_on_failure=False)["run_id"], tmp_path)


def test_an_adam_blow_up_in_a_sweep_is_marked_and_the_other_rate_finishes(tracker, tmp_path):
    from nllflow.flows.sweep import sweep

    summary = sweep(gamma_spec(optimizer={"name": "adam", "max_steps": 50}, sweep={"lr": [0.05, 300.0]}))
    rows = {row["run_name"]: row for row in summary["runs"]}
    diverged, fine = rows["gamma adam lr=300"], rows["gamma adam lr=0.05"]
    trace = assert_recorded_as_diverged(tracker, diverged["run_id"], tmp_path)
    assert len(trace) > 2  # Adam at lr=300 runs a few finite steps before the NLL overflows
    assert diverged["status"] == "FAILED" and summary["failed"] == {"gamma adam lr=300": diverged["reason"]}
    assert fine["status"] == "FINISHED" and summary["best_run_id"] == fine["run_id"]
    table = pd.read_parquet(tracker.client.download_artifacts(summary["parent_run_id"], "sweep.parquet", str(tmp_path)))
    assert table.set_index("run_name").loc["gamma adam lr=300", "reason"] == diverged["reason"]


# --- tracking unavailable ---------------------------------------------------------------------------


@pytest.mark.timeout(120)  # a guard against a hang, not a speed test
def test_an_unreachable_tracking_server_fails_the_cli_in_one_line(tracker, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = len(all_runs(tracker))
    code = main(
        [
            "fit",
            "--data",
            str(ROOT / "experiments" / "data" / "groundbeef.parquet"),
            "--column",
            "serving",
            "--family",
            "lognormal",
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.splitlines() == [
        f"nllflow: failed: TrackingUnavailable: MLflow tracking server {uri} is not reachable ([Errno 111] Connection "
        "refused); start it or point MLFLOW_TRACKING_URI at a running one (rerun with --debug for the traceback)"
    ]
    assert len(all_runs(tracker)) == before


@pytest.mark.timeout(120)
def test_an_unreachable_tracking_server_fails_a_flow_at_its_start(prefect_harness, monkeypatch):
    from nllflow.flows.fit import fit
    from nllflow.tracking.store import TrackingUnavailable

    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    state = fit(gamma_spec(optimizer={"max_steps": 5}), return_state=True)
    error = state.result(raise_on_failure=False)
    assert state.is_failed() and isinstance(error, TrackingUnavailable) and uri in str(error)


# --- concurrency ------------------------------------------------------------------------------------

N_WRITERS = 16


def concurrent_spec(seed: int) -> dict:
    """Adam from a poor start: 30 steps, none of them converged, so every history has 31 points."""
    return {
        "name": "concurrent",
        "family": "normal",
        "device": "cpu",
        "init": {"loc": 0.0, "scale": 1.0},
        "data": {"simulate": {"params": {"loc": 1.0, "scale": 2.0}, "n": 50, "seed": seed}},
        "optimizer": {"name": "adam", "lr": 0.05, "max_steps": 30},
    }


WRITER = '''"""Fit one sample per process, then record all at the same instant (fork after the imports:
the race is in opening the store, not in importing torch)."""
import json, multiprocessing, sys
import torch
import nllflow.evaluation.plots  # noqa: F401 (imported once, before the fork)
# a forked child must not inherit a started OpenMP pool (it would hang): one thread before the fork
torch.set_num_threads(1)
from nllflow.pipeline.steps import run_core
from nllflow.tracking.recorder import Tracker, run_key
from nllflow.spec import parse_spec


def spec(index):
    raw = json.loads(sys.argv[3])
    raw["data"]["simulate"]["seed"] = index
    return parse_spec(raw)


def record(uri, index, fitted, barrier, queue):
    try:
        barrier.wait()
        queue.put([index, Tracker(uri).record_fit(spec(index), *fitted, key=run_key("concurrent", str(index))), None])
    except BaseException as error:
        queue.put([index, None, f"{type(error).__name__}: {error}"[:300]])


if __name__ == "__main__":
    uri, n = sys.argv[1], int(sys.argv[2])
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(n), context.Queue()
    writers = [context.Process(target=record, args=(uri, i, run_core(spec(i)), barrier, queue)) for i in range(n)]
    for writer in writers:
        writer.start()
    results = [queue.get(timeout=300) for _ in writers]
    for writer in writers:
        writer.join()
    print(json.dumps({"results": sorted(results), "exitcodes": [w.exitcode for w in writers]}))
'''


def write_concurrently(uri: str, folder: Path) -> list[str]:
    """N_WRITERS processes record one fit each into `uri` at once; their run ids, in seed order."""
    script = folder / "writers.py"
    script.write_text(WRITER)
    env = {**os.environ, "NLLFLOW_HOME": str(folder), "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [sys.executable, str(script), uri, str(N_WRITERS), json.dumps(concurrent_spec(0))],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["exitcodes"] == [0] * N_WRITERS
    failures = [error for _, _, error in outcome["results"] if error]
    assert failures == [], failures
    return [run_id for _, run_id, _ in outcome["results"]]


def assert_nothing_lost(uri: str, run_ids: list[str]) -> None:
    """Every run FINISHED, every metric history complete and equal to a fresh fit of its seed."""
    from nllflow.pipeline.steps import run_core
    from nllflow.tracking.recorder import Tracker

    tracker = Tracker(uri)
    experiment = tracker.client.get_experiment_by_name("concurrent")
    stored = tracker.client.search_runs([experiment.experiment_id], max_results=1000)
    assert sorted(run.info.run_id for run in stored) == sorted(run_ids)
    for seed, run_id in enumerate(run_ids):
        assert tracker.client.get_run(run_id).info.status == "FINISHED"
        trace = run_core(parse_spec(concurrent_spec(seed)))[2].trace
        assert len(trace) == 31
        for key in ("nll", "loc", "scale", "grad_scale"):
            history = tracker.client.get_metric_history(run_id, key)
            assert [m.step for m in history] == list(range(31)), key
            np.testing.assert_allclose([m.value for m in history], trace[key].to_numpy(), rtol=1e-12)


def test_sixteen_processes_write_to_a_fresh_sqlite_store_at_once(tmp_path):
    """Without the lock in nllflow.tracking.open_client, 15 or 16 of the 16 crash here (measured):
    'table experiments already exists', alembic 'expected to match one row'."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert not (tmp_path / "fresh.db").exists()
    assert_nothing_lost(uri, write_concurrently(uri, tmp_path))


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free loopback port with a fresh store; stopped by PID (its process
    group) also when the test or the start fails."""
    port = closed_port()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "w"),
        start_new_session=True,
    )
    try:
        uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not answer /health within 120 s"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:  # a throwaway store: no need to wait out uvicorn's graceful shutdown
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.e2e
def test_sixteen_processes_write_to_an_mlflow_server_at_once(mlflow_server, tmp_path):
    assert_nothing_lost(mlflow_server, write_concurrently(mlflow_server, tmp_path))


# --- crashes ----------------------------------------------------------------------------------------

SLOW_SWEEP = """name: reliability-killed
family: normal
device: cpu
data: {simulate: {params: {loc: 1.0, scale: 2.0}, n: 200, seed: 1}}
init: {loc: 0.0, scale: 1.0}
optimizer: {name: sgd, max_steps: 1000000}
sweep: {lr: [1.0e-7, 2.0e-7]}
"""


def wait_for(condition, what: str, seconds: float = 120.0, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + seconds
    while True:
        found = condition()
        if found:
            return found
        assert process is None or process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.25)


@pytest.mark.timeout(300)
def test_a_sweep_killed_with_sigkill_leaves_no_ghost_run_after_the_next_start(tracker, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL

    spec_file = tmp_path / "killed.yaml"
    spec_file.write_text(SLOW_SWEEP)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "nllflow.flows.cli", "run", str(spec_file)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        experiment = wait_for(
            lambda: tracker.client.get_experiment_by_name("reliability-killed"), "experiment", process=process
        )
        ghost = wait_for(
            lambda: tracker.client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'"),
            "sweep parent run",
            process=process,
        )[0]
        time.sleep(1.0)  # the children are optimising now
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    flow_run_id = ghost.data.tags["prefect.flow_run_id"]
    assert ghost.data.tags["nllflow.pid"] == str(process.pid)
    # what the kill left: a RUNNING parent in MLflow, a Running flow run in Prefect
    assert tracker.client.get_run(ghost.info.run_id).info.status == "RUNNING"
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.type == StateType.RUNNING

    # the next start (a process of its own, as every nllflow command is) closes both; the rerun works
    rerun_process = subprocess.run(
        [sys.executable, "-m", "nllflow.flows.cli", "run", str(spec_file), "--set", "optimizer.max_steps=20", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun_process.returncode == 0, rerun_process.stderr[-2000:]
    rerun = json.loads(rerun_process.stdout.strip().splitlines()[-1])
    closed = tracker.client.get_run(ghost.info.run_id)
    assert closed.info.status == "KILLED"
    assert closed.data.tags["reason"].startswith(f"abandoned: process {process.pid} on {socket.gethostname()} ended")
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    assert state.type == StateType.CRASHED and f"process {process.pid}" in state.message
    assert tracker.client.get_run(rerun["parent_run_id"]).info.status == "FINISHED"
    assert sorted(row["status"] for row in rerun["runs"]) == ["FINISHED", "FINISHED"]
    running = tracker.client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    assert running == []
