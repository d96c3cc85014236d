"""End to end on real servers: the deployments of prefect.yaml on a Prefect server with a process
worker, recording into an MLflow tracking server over HTTP. Runs are started the way users start
them (`prefect deployment run`); everything is checked through the servers' APIs, and the fits
against a recomputation from the regenerated data."""

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

from tasks.experiment import load_data
from tasks.recording import PARENT_TAG
from tasks.spec import parse_spec

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


def prefect_deployment_run(stack, name: str, spec: dict) -> str:
    """`prefect deployment run NAME --params ... --watch`; the flow run's id once it is Completed."""
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", name, "--params", json.dumps({"spec": spec}),
         "--watch", "--watch-timeout", str(RUN_TIMEOUT_SECONDS)],
        cwd=PROJECT_ROOT, env={**stack.env, "PREFECT_API_URL": stack.prefect_api_url},
        capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS + 60,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)


@contextmanager
def prefect_client(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.prefect_api_url}), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def mlflow(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(stack.mlflow_uri)


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
            # what the scheduler will submit is a valid sweep that fans out to the fit deployment
            spec = parse_spec(schedule.parameters["spec"])
            assert spec.sweep.fan_out == "deployment" and len(spec.configurations()) == len(spec.sweep.lr) > 1
        rates = {json.dumps(s.parameters["spec"]["sweep"]["lr"]) for s in schedules.values()}
        assert len(rates) == len(schedules)  # each schedule its own learning rates


def test_a_child_still_pending_at_the_timeout_is_cancelled_and_listed_as_failed(stack, mlflow, tmp_path):
    spec = gamma_sweep("e2e-gamma-timeout", {"name": "adam", "max_steps": 50}, [0.05])
    spec["sweep"]["timeout_seconds"] = 0.5  # far less than a worker needs to start a flow run
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
