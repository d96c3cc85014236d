"""End to end on real servers: the deployments of prefect.yaml on a Prefect server with a process
worker, recording into an MLflow tracking server over HTTP, both requiring the credentials that
`serve start --auth` generated. Runs are started the way users start them (`prefect deployment
run`); everything is checked through the servers' APIs, and the fits against a recomputation from
the regenerated data. The last tests check what the credentials protect."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from nllflow.pipeline.steps import load_data
from nllflow.spec import SpecFile, load_spec, parse_spec
from nllflow.tracking.recorder import PARENT_TAG

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_SECONDS = 240


def gamma_sweep(name: str, optimizer: dict, rates: list[float]) -> dict:
    return {
        "name": name,
        "family": "gamma",
        "data": {"simulate": {"params": {"concentration": 2.5, "rate": 1.5}, "n": 400, "seed": 3}},
        "init": {"concentration": 0.8, "rate": 2.0},
        "optimizer": optimizer,
        "sweep": {"lr": rates, "fan_out": "deployment", "deployment": "fit/fit", "timeout_seconds": 200},
        "device": "auto",
    }


def prefect_deployment_run(stack, name: str, spec: dict, completes: bool = True) -> str:
    """`prefect deployment run NAME --params ... --watch`; the flow run's id once it is Completed
    (or, `completes` False, once it has ended)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "deployment",
            "run",
            name,
            "--params",
            json.dumps({"spec": spec}),
            "--watch",
            "--watch-timeout",
            str(RUN_TIMEOUT_SECONDS),
        ],
        cwd=PROJECT_ROOT,
        env={**stack.env, "PREFECT_API_URL": stack.prefect_api_url},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS + 60,
    )
    assert (done.returncode == 0) is completes, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)


@contextmanager
def prefect_client(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings = {
        PREFECT_API_URL: stack.prefect_api_url,
        PREFECT_API_AUTH_STRING: stack.credentials["PREFECT_API_AUTH_STRING"],
    }
    with temporary_settings(settings), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def mlflow(stack):
    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as patch:  # MLflow's client reads its credentials from the environment
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            patch.setenv(name, stack.credentials[name])
        yield MlflowClient(stack.mlflow_uri)


def sweep_runs(mlflow, experiment: str, flow_run_id: str):
    """The parent run the sweep flow run created, and its children."""
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    parents = mlflow.search_runs([experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(parents) == 1
    parent = parents[0]
    children = mlflow.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    return parent, {child.info.run_name: child for child in children}


def download_table(mlflow, run_id: str, path: str, folder: Path) -> pd.DataFrame:
    return pd.read_parquet(mlflow.download_artifacts(run_id, path, str(folder)))


def test_sweep_fans_out_to_the_fit_deployment_and_records_on_the_mlflow_server(stack, mlflow, tmp_path):
    spec = gamma_sweep("e2e-gamma-adam", {"name": "adam", "max_steps": 50}, [0.02, 0.1])
    flow_run_id = prefect_deployment_run(stack, "sweep/lr-sweep", spec)

    parent, children = sweep_runs(mlflow, spec["name"], flow_run_id)
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["sweep.fan_out"]) == "deployment"
    assert json.loads(parent.data.params["sweep.lr"]) == [0.02, 0.1]
    assert set(children) == {"gamma adam lr=0.02", "gamma adam lr=0.1"}

    train = load_data(parse_spec({**spec, "sweep": None})).train.values
    with prefect_client(stack) as client:
        fit_deployment = client.read_deployment_by_name("fit/fit")
        for name, child in children.items():
            # each fit was a flow run of the fit deployment, linked to the sweep's flow run
            child_flow_run = client.read_flow_run(child.data.tags["prefect.flow_run_id"])
            assert child_flow_run.deployment_id == fit_deployment.id
            assert child_flow_run.state.is_completed()
            assert str(client.read_task_run(child_flow_run.parent_task_run_id).flow_run_id) == flow_run_id
            assert child_flow_run.job_variables["env"]["MLFLOW_TRACKING_URI"] == stack.mlflow_uri

            assert child.info.status == "FINISHED"
            params = child.data.params
            assert (params["family"], params["optimizer"], params["device"]) == ("gamma", "adam", "cpu")
            assert float(params["lr"]) == float(name.split("lr=")[1])
            # artifacts went through the server to its artifacts destination
            assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
            stored = stack.home / "serve" / "mlartifacts" / child.info.artifact_uri.removeprefix("mlflow-artifacts:/")
            assert (stored / "trace.parquet").is_file()

            trace = download_table(mlflow, child.info.run_id, "trace.parquet", tmp_path / name)
            steps = int(child.data.metrics["steps"])
            assert steps == 50 and len(trace) == steps + 1
            history = mlflow.get_metric_history(child.info.run_id, "nll")
            assert [m.step for m in history] == trace["step"].tolist()
            np.testing.assert_allclose([m.value for m in history], trace["nll"])
            # the worker fitted the spec's data: its logged NLL is scipy's at its logged parameters
            last = trace.iloc[-1]
            expected = -stats.gamma.logpdf(train, last["concentration"], scale=1 / last["rate"]).sum()
            assert last["nll"] == pytest.approx(expected, rel=1e-10)
            fit_table = download_table(mlflow, child.info.run_id, "fit.parquet", tmp_path / name)
            assert set(fit_table["parameter"]) == {"concentration", "rate"}

    table = download_table(mlflow, parent.info.run_id, "sweep.parquet", tmp_path)
    assert sorted(table["run_name"]) == sorted(children) and set(table["status"]) == {"FINISHED"}
    by_nll = {child.info.run_id: child.data.metrics["nll"] for child in children.values()}
    assert parent.data.tags["best_run"] == min(by_nll, key=by_nll.get)


def test_a_divergent_child_is_listed_as_failed_and_the_sweep_completes(stack, mlflow, tmp_path):
    spec = gamma_sweep("e2e-gamma-sgd", {"name": "sgd", "max_steps": 40}, [0.01, 1e6])
    flow_run_id = prefect_deployment_run(stack, "sweep/lr-sweep", spec)  # Completed, or it raises

    parent, children = sweep_runs(mlflow, spec["name"], flow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["failed"] == 1
    table = download_table(mlflow, parent.info.run_id, "sweep.parquet", tmp_path).set_index("run_name")
    assert table.loc["gamma sgd lr=0.01", "status"] == "FINISHED"
    assert table.loc["gamma sgd lr=1e+06", "status"] == "FAILED"
    assert table.loc["gamma sgd lr=1e+06", "reason"].startswith("diverged")

    diverged = children["gamma sgd lr=1e+06"]
    assert diverged.info.status == "FAILED" and diverged.data.tags["reason"].startswith("diverged")
    with prefect_client(stack) as client:
        assert client.read_flow_run(diverged.data.tags["prefect.flow_run_id"]).state.is_failed()
    # 1e6 × the gradient overshoots to where the log-likelihood is no longer finite: its trace
    # stops at the last finite step
    trace = download_table(mlflow, diverged.info.run_id, "trace.parquet", tmp_path)
    assert len(trace) < 41 and np.isfinite(trace["nll"]).all()


def test_deployments_carry_pools_job_variables_and_schedules_from_prefect_yaml(stack):
    config = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    declared = {d["name"]: d for d in config["deployments"]}
    flows = {"flows/fit.py:fit": "fit", "flows/sweep.py:sweep": "sweep"}
    with prefect_client(stack) as client:
        for name, declaration in declared.items():
            deployment = client.read_deployment_by_name(f"{flows[declaration['entrypoint']]}/{name}")
            pool = declaration["work_pool"]
            assert deployment.work_pool_name == pool["name"]
            assert client.read_work_pool(pool["name"]).type == "process"
            env = deployment.job_variables["env"]
            assert env["MLFLOW_TRACKING_URI"] == stack.mlflow_uri  # templated from the deploy-time env
            assert env["CUDA_VISIBLE_DEVICES"] == pool["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"]

        scheduled = client.read_deployment_by_name("sweep/lr-sweep-scheduled")
        schedules = {s.slug: s for s in scheduled.schedules}
        assert schedules and set(schedules) == {s["slug"] for s in declared["lr-sweep-scheduled"]["schedules"]}
        for entry in declared["lr-sweep-scheduled"]["schedules"]:
            schedule = schedules[entry["slug"]]
            assert schedule.active
            assert (schedule.schedule.cron, schedule.schedule.timezone) == (entry["cron"], entry["timezone"])
            assert schedule.parameters == entry["parameters"]
            # what the scheduler will submit names a spec of experiments/: a valid sweep that fans out to
            # the fit deployment, the same as the file says but for the overrides
            reference = SpecFile.model_validate(schedule.parameters["spec"])
            spec = reference.load()
            assert spec.sweep.fan_out == "deployment" and len(spec.configurations()) == len(spec.sweep.lr) > 1
            assert spec == load_spec(PROJECT_ROOT / reference.file).model_copy(
                update={"sweep": spec.sweep, "device": spec.device}
            )
        rates = {json.dumps(SpecFile.model_validate(s.parameters["spec"]).load().sweep.lr) for s in schedules.values()}
        assert len(rates) == len(schedules)  # each schedule its own learning rates


def test_a_child_still_pending_at_the_timeout_is_cancelled_and_listed_as_failed(stack, mlflow, tmp_path):
    spec = gamma_sweep("e2e-gamma-timeout", {"name": "adam", "max_steps": 50}, [0.05])
    spec["sweep"]["timeout_seconds"] = 0.5  # far less than a worker needs to start a flow run
    import torch

    if not torch.cuda.is_available():
        # the GPU pool's fit deployment: the stack starts its worker only where CUDA is, so the
        # child is still Scheduled at the timeout (the CPU pool's worker took it
        # within 0.5 s in some runs: a Pending child, set Cancelling, which its worker then missed)
        spec["sweep"]["deployment"] = "fit/fit-gpu"
    flow_run_id = prefect_deployment_run(stack, "sweep/lr-sweep", spec)

    parent, children = sweep_runs(mlflow, spec["name"], flow_run_id)
    assert parent.info.status == "FINISHED" and not children
    row = download_table(mlflow, parent.info.run_id, "sweep.parquet", tmp_path).iloc[0]
    assert (row["run_name"], row["status"]) == ("gamma adam lr=0.05", "FAILED")
    assert "did not finish within 0.5 s" in row["reason"]
    child_id = re.search(r"flow run ([0-9a-f-]{36})", row["reason"]).group(1)
    with prefect_client(stack) as client:
        child = client.read_flow_run(child_id)
        deadline = time.monotonic() + 60
        while not child.state.is_final() and time.monotonic() < deadline:
            time.sleep(0.5)
            child = client.read_flow_run(child_id)
    assert child.state.is_cancelled()


GROUNDBEEF = PROJECT_ROOT / "experiments" / "data" / "groundbeef.parquet"
MLFLOW_AUTH = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _answer(url: str, auth: tuple[str, str] | None = None) -> int:
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _nllflow_fit(stack, data: Path, experiment: str, **settings: str) -> subprocess.CompletedProcess:
    """`nllflow fit` as a client host runs it: the servers' URLs and only the credentials given."""
    env = {k: v for k, v in stack.env.items() if k not in stack.credentials}
    env.update(PREFECT_API_URL=stack.prefect_api_url, MLFLOW_TRACKING_URI=stack.mlflow_uri, **settings)
    command = [sys.executable, "-m", "nllflow", "fit", "--data", str(data), "--column", "serving"]
    command += ["--family", "gamma", "--experiment", experiment, "--json"]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_without_credentials_both_servers_answer_401_and_the_command_names_the_setting(stack, mlflow):
    prefect_user, _, prefect_password = stack.credentials["PREFECT_API_AUTH_STRING"].partition(":")
    mlflow_auth = (stack.credentials["MLFLOW_TRACKING_USERNAME"], stack.credentials["MLFLOW_TRACKING_PASSWORD"])
    version = f"{stack.prefect_api_url}/admin/version"
    search = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _answer(version) == 401 and _answer(version, (prefect_user, "wrong")) == 401
    assert _answer(version, (prefect_user, prefect_password)) == 200
    assert _answer(search) == 401 and _answer(search, (mlflow_auth[0], "wrong")) == 401
    assert _answer(search, mlflow_auth) == 200
    # health answers anyone: what `serve start` and a load balancer poll
    assert _answer(f"{stack.prefect_api_url}/health") == _answer(f"{stack.mlflow_uri}/health") == 200

    refused = {
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD": {},
        "PREFECT_API_AUTH_STRING is not set": {k: stack.credentials[k] for k in MLFLOW_AUTH},
        "PREFECT_API_AUTH_STRING was refused": {
            **{k: stack.credentials[k] for k in MLFLOW_AUTH},
            "PREFECT_API_AUTH_STRING": f"{prefect_user}:wrong",
        },
    }
    for setting, given in refused.items():
        done = _nllflow_fit(stack, GROUNDBEEF, "e2e-refused", **given)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.startswith("nllflow: error: ") and setting in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert mlflow.get_experiment_by_name("e2e-refused") is None  # nothing recorded

    done = _nllflow_fit(stack, GROUNDBEEF, "e2e-authenticated", **stack.credentials)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    serving = pd.read_parquet(GROUNDBEEF)["serving"].to_numpy()
    shape, _, scale = stats.gamma.fit(serving, floc=0)
    assert summary["nll"] <= -stats.gamma.logpdf(serving, shape, scale=scale).sum() + 1e-6
    assert mlflow.get_run(summary["run_id"]).info.status == "FINISHED"


def test_the_secrets_are_shown_once_and_never_recorded(stack, mlflow, tmp_path):
    secrets = [
        stack.credentials["PREFECT_API_AUTH_STRING"].partition(":")[2],
        stack.credentials["MLFLOW_TRACKING_PASSWORD"],
        json.loads((stack.home / "serve" / "credentials.json").read_text())["flask_secret_key"],
    ]
    assert all(secret in stack.start_output for secret in secrets[:2])  # `start` printed them, once
    env = subprocess.run(
        [sys.executable, "-m", "nllflow.flows.serve", "env"], env=stack.env, capture_output=True, text=True, timeout=60
    ).stdout
    assert "PREFECT_API_AUTH_STRING and MLFLOW_TRACKING_PASSWORD" in env
    assert not any(secret in env for secret in secrets)
    shown = subprocess.run(
        [sys.executable, "-m", "nllflow.flows.serve", "env", "--secrets"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert all(secret in shown for secret in secrets[:2])

    # every run of every experiment the module recorded: params, tags and text artifacts
    recorded = []
    for experiment in mlflow.search_experiments():
        for run in mlflow.search_runs([experiment.experiment_id]):
            recorded += [json.dumps(run.data.params), json.dumps(run.data.tags)]
            folder = Path(mlflow.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
            recorded += [f.read_text() for f in folder.rglob("*") if f.suffix in (".yaml", ".json", ".md", ".txt")]
    assert len(recorded) > 20
    # the servers' and workers' logs, and what Prefect stores of deployments and flow runs
    recorded += [log.read_text(errors="replace") for log in (stack.home / "serve" / "logs").glob("*.log")]
    with prefect_client(stack) as client:
        recorded += [d.model_dump_json() for d in client.read_deployments()]
        recorded += [r.model_dump_json() for r in client.read_flow_runs()]
    for text in recorded:
        assert not any(secret in text for secret in secrets)


def test_a_deployment_run_reads_no_file_outside_the_worker_s_allow_list(stack, mlflow, tmp_path):
    outside = tmp_path / "outside.csv"  # the worker's allow-list: its working directory and nllflow's home
    outside.write_text("serving\n1.0\n2.0\n3.0\n")
    attempts = {
        "e2e-outside-path": {"path": str(outside)},
        # starts inside the working directory, leads out
        "e2e-outside-dotdot": {"path": f"{PROJECT_ROOT}/{'../' * len(PROJECT_ROOT.parts)}{outside.relative_to('/')}"},
    }
    for name, data in attempts.items():
        spec = {"name": name, "family": "gamma", "data": {"column": "serving", **data}, "device": "cpu"}
        flow_run_id = prefect_deployment_run(stack, "fit/fit", spec, completes=False)
        with prefect_client(stack) as client:
            state = client.read_flow_run(flow_run_id).state
        assert state.is_failed()
        assert "may be read only below" in state.message and str(outside) in state.message
        assert "NLLFLOW_DATA_DIRS" in state.message and "\n" not in state.message.strip()
        assert mlflow.get_experiment_by_name(name) is None  # refused before anything was recorded
