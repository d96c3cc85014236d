"""Scale-out, end to end, as the README's recipe builds it: PostgreSQL under the Prefect and MLflow
servers, a server host and two worker hosts (each its own hostname, HOME and environment; a Prefect
worker and a Dask worker on each), sweeps with `deployment` and `dask` fan-out, and faults in the
middle of a sweep: a Dask worker killed, the MLflow server restarted, a worker host killed.

The recipe's commands are read from the README (hosts.recipe_sections) and run as they are, with
its hosts replaced by 127.0.0.1 and its ports by free ones. Results are checked through the
servers' APIs (and PostgreSQL itself) against scipy's log-density at the recorded estimates and
against the threads mode."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hosts import Host, Postgres, free_port, localise, postgres_bin, recipe_sections, semaphores
from scipy import stats

from nllflow.flows.serve import healthy
from nllflow.pipeline.steps import load_data
from nllflow.spec import load_spec
from nllflow.tracking.recorder import KEY_TAG, PARENT_TAG
from nllflow.tracking.store import HOST_TAG

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.dask]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_SECONDS = 300
SWEEP_SECONDS = 420
# what the hosts' environment tunes for a test (not commands of the recipe): workers poll every second
TEST_ENV = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
}
WORKER_HOSTS = ("worker-1", "worker-2")
CLIENT_SETTINGS = "nllflow-client.env"  # the recipe's ~/nllflow-client.env


@dataclass
class Cluster:
    postgres: Postgres
    ports: dict[str, int]
    artifacts: Path
    server: Host
    workers: dict[str, Host]
    client: Host

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def dask_address(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['dask']}"

    @property
    def credentials(self) -> dict[str, str]:
        """The client settings of the credentials that the server host's `serve start --auth` made."""
        from nllflow.flows.credentials import load

        return load(self.server.home / ".local/share/nllflow/serve").client_env()

    def copy_client_settings(self, host: Host) -> None:
        """What the recipe asks of the user for each host: the server host's ~/nllflow-client.env copied."""
        shutil.copy2(self.server.home / CLIENT_SETTINGS, host.home / CLIENT_SETTINGS)

    def run_anywhere(self, script: str, timeout: float = SWEEP_SECONDS) -> subprocess.CompletedProcess:
        """A script on the `client` host with the recipe's `anywhere` settings (the servers' URLs)."""
        exports = localise(recipe_sections()["anywhere"].splitlines()[0], self.ports, self.artifacts)
        done = self.client.run(f"{exports}\n{script}", timeout)
        assert done.returncode == 0, f"{script}\nexited {done.returncode}:\n{done.stdout[-6000:]}"
        return done

    def start_anywhere(self, script: str) -> subprocess.Popen:
        exports = localise(recipe_sections()["anywhere"].splitlines()[0], self.ports, self.artifacts)
        return self.client.start(f"{exports}\n{script}")


@contextmanager
def prefect_client(cluster: Cluster):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings = {
        PREFECT_API_URL: cluster.prefect_api_url,
        PREFECT_API_AUTH_STRING: cluster.credentials["PREFECT_API_AUTH_STRING"],
    }
    with temporary_settings(settings), get_client(sync_client=True) as client:
        yield client


def _wait_for(condition, seconds: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what} did not happen within {seconds:g} s")


def _online_workers(cluster: Cluster) -> set[str]:
    with prefect_client(cluster) as client:
        return {w.name for w in client.read_workers_for_work_pool("nllflow-cpu") if w.status == "ONLINE"}


def _dask_workers(cluster: Cluster) -> dict[str, dict]:
    """The Dask workers the scheduler knows, by name: their address and PID."""
    from distributed import Client

    with Client(cluster.dask_address, timeout=30) as client:
        pids = client.run(os.getpid)
        workers = client.scheduler_info(n_workers=-1)["workers"]
    return {w["name"]: {"name": w["name"], "address": a, "pid": pids[a]} for a, w in workers.items() if a in pids}


def _start_worker_host(cluster: Cluster, host: Host) -> None:
    cluster.copy_client_settings(host)
    done = host.run(localise(recipe_sections()["each worker host"], cluster.ports, cluster.artifacts), 60)
    assert done.returncode == 0, done.stdout
    _wait_for(lambda: f"nllflow-cpu-{host.name}" in _online_workers(cluster), 90, f"the worker of {host.name}")
    _wait_for(lambda: host.name in _dask_workers(cluster), 90, f"the Dask worker of {host.name}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The recipe's database, server host and two worker hosts, started with the README's commands."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create UTS namespaces here (the simulated hosts need their own hostnames)")
    root = tmp_path_factory.mktemp("hosts")
    postgres = Postgres(bin_dir)
    ports = {"postgres": postgres.port, "prefect": free_port(), "mlflow": free_port(), "dask": free_port()}
    server = Host("server", root, TEST_ENV)
    workers = {name: Host(name, root, TEST_ENV) for name in WORKER_HOSTS}
    cluster = Cluster(postgres, ports, root / "srv", server, workers, Host("client", root, TEST_ENV))
    sections = recipe_sections()
    seen_semaphores: set[Path] = set()
    begun = time.monotonic()
    try:
        postgres.start()
        postgres.run_as_postgres(localise(sections["database host"], ports, cluster.artifacts))
        started = server.run(localise(sections["server host"], ports, cluster.artifacts), START_SECONDS)
        assert started.returncode == 0, f"the server host's commands failed:\n{started.stdout[-6000:]}"
        assert (server.home / CLIENT_SETTINGS).stat().st_mode & 0o777 == 0o600
        cluster.copy_client_settings(cluster.client)
        for host in workers.values():
            _start_worker_host(cluster, host)
        print(f"the recipe's database, server host and two worker hosts started in {time.monotonic() - begun:.0f} s")
        assert _online_workers(cluster) >= {f"nllflow-cpu-{name}" for name in ("server", *WORKER_HOSTS)}
        yield cluster
    finally:
        for host in (cluster.client, *workers.values(), server):
            seen_semaphores |= semaphores(list(host.processes("dask")))
        for host in (cluster.client, *workers.values()):
            host.stop()
        server.run(".venv/bin/python -m nllflow.flows.serve stop", 120)  # the README's way; then by PID
        server.stop()
        postgres.stop()
        for leaked in seen_semaphores:  # what killed Dask processes left in /dev/shm
            leaked.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def mlflow(cluster):
    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as patch:  # MLflow's client reads its credentials from the environment
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            patch.setenv(name, cluster.credentials[name])
        yield MlflowClient(cluster.mlflow_uri)


def sweep_parent(mlflow, experiment: str, fan_out: str):
    """The latest sweep parent of `experiment` with this fan-out, and its children by name."""
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    parents = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.sweep = 'true' and params.`sweep.fan_out` = '{json.dumps(fan_out)}'",
        order_by=["attributes.start_time DESC"],
    )
    assert parents, f"no {fan_out} sweep in {experiment}"
    return parents[0], sweep_children(mlflow, parents[0])


def sweep_children(mlflow, parent) -> dict:
    """Every active child of `parent`, by name; each configuration must appear once."""
    children = mlflow.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'", max_results=5000
    )
    names = [child.info.run_name for child in children]
    assert len(names) == len(set(names)), f"a configuration recorded twice: {sorted(names)}"
    assert len({child.data.tags[KEY_TAG] for child in children}) == len(children)
    return {child.info.run_name: child for child in children}


def sweep_table(mlflow, parent, folder: Path) -> pd.DataFrame:
    return pd.read_parquet(mlflow.download_artifacts(parent.info.run_id, "sweep.parquet", str(folder)))


def assert_fitted(mlflow, spec, children: dict, folder: Path, check_traces: bool = True, lost=()) -> None:
    """Each child is its configuration's fit (every configuration but those `lost`): FINISHED, its
    recorded NLL scipy's at its recorded estimates on the configuration's training data, its metric
    history complete (no gap)."""
    train = load_data(spec.configurations()[0]).train.values
    assert sorted(children) == sorted(c.label() for c in spec.configurations() if c.label() not in lost)
    for name, child in children.items():
        assert child.info.status == "FINISHED", (name, child.data.tags.get("reason"))
        metrics = child.data.metrics
        expected = -stats.gamma.logpdf(
            train, metrics["estimate.concentration"], scale=1 / metrics["estimate.rate"]
        ).sum()
        assert metrics["nll"] == pytest.approx(expected, rel=1e-10)
        if check_traces:
            history = mlflow.get_metric_history(child.info.run_id, "nll")
            assert [m.step for m in history] == list(range(int(metrics["steps"]) + 1))
            trace = pd.read_parquet(mlflow.download_artifacts(child.info.run_id, "trace.parquet", str(folder / name)))
            np.testing.assert_array_equal([m.value for m in history], trace["nll"])


def recipe_command(line_start: str) -> str:
    """The command of the recipe's `anywhere` section that starts with `line_start` (with its
    continuation lines)."""
    text = recipe_sections()["anywhere"].replace("\\\n", " ")
    return next(line for line in text.splitlines() if line.startswith(line_start))


def recipe_spec(command: str):
    """The spec a recipe's `nllflow run SPEC --set ...` command runs."""
    import shlex

    words = shlex.split(command)
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    return load_spec(PROJECT_ROOT / words[2], overrides)


@pytest.fixture(scope="module")
def recipe_sweeps(cluster):
    """The recipe's `anywhere` section: the deployment sweep, then the Dask sweep."""
    started = time.monotonic()
    section = recipe_sections()["anywhere"]
    cluster.run_anywhere(localise("\n".join(section.splitlines()[1:]), cluster.ports, cluster.artifacts))
    print(f"the recipe's two sweeps took {time.monotonic() - started:.0f} s")


def _psql(cluster: Cluster, database: str, query: str) -> list[str]:
    done = cluster.postgres.run_as_postgres(f"psql -d {database} -tA -v ON_ERROR_STOP=1 -c {json.dumps(query)}")
    return done.stdout.split()


def test_a_deployment_sweep_lands_on_two_worker_hosts_and_records_through_the_server(
    cluster, mlflow, recipe_sweeps, tmp_path
):
    spec = recipe_spec(
        recipe_command(".venv/bin/nllflow run experiments/gamma_lr_sweep.yaml --set sweep.fan_out=deployment")
    )
    assert len(spec.configurations()) == 8
    parent, children = sweep_parent(mlflow, spec.name, "deployment")
    assert parent.info.status == "FINISHED"
    assert_fitted(mlflow, spec, children, tmp_path)
    # the children ran as flow runs of fit/fit on the workers of at least two hosts
    hosts = {child.data.tags[HOST_TAG] for child in children.values()}
    assert len(hosts) >= 2 and hosts <= {"server", *WORKER_HOSTS}, hosts
    with prefect_client(cluster) as client:
        fit = client.read_deployment_by_name("fit/fit")
        for child in children.values():
            flow_run = client.read_flow_run(child.data.tags["prefect.flow_run_id"])
            assert flow_run.deployment_id == fit.id and flow_run.state.is_completed()
            assert f"nllflow.host:{child.data.tags[HOST_TAG]}" in flow_run.tags
    # artifacts went through the MLflow server into its artifacts destination, not to the workers' disks
    for child in children.values():
        assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
        stored = cluster.artifacts / "mlartifacts" / child.info.artifact_uri.removeprefix("mlflow-artifacts:/")
        assert (stored / "trace.parquet").is_file() and (stored / "plots" / "qq.png").is_file()
    for name in WORKER_HOSTS:
        assert not list(cluster.workers[name].home.rglob("mlflow.db")) and not list(
            cluster.workers[name].home.rglob("trace.parquet")
        )
    table = sweep_table(mlflow, parent, tmp_path)
    assert sorted(table["run_name"]) == sorted(children) and set(table["status"]) == {"FINISHED"}
    # both servers keep their records in PostgreSQL
    assert set(_psql(cluster, "mlflow", "select run_uuid from runs")) >= {c.info.run_id for c in children.values()}
    flow_runs = set(_psql(cluster, "prefect", "select id from flow_run"))
    assert {child.data.tags["prefect.flow_run_id"] for child in children.values()} <= flow_runs


def test_b_dask_sweep_on_the_worker_hosts_equals_the_threads_mode(cluster, mlflow, recipe_sweeps, tmp_path):
    command = recipe_command(".venv/bin/nllflow run experiments/gamma_lr_sweep.yaml --set sweep.fan_out=dask")
    spec = recipe_spec(command)
    parent, on_dask = sweep_parent(mlflow, spec.name, "dask")
    assert parent.info.status == "FINISHED"
    assert_fitted(mlflow, spec, on_dask, tmp_path / "dask")
    # the fits ran on the Dask workers of the worker hosts, not in the sweep's process
    assert {child.data.tags[HOST_TAG] for child in on_dask.values()} <= set(WORKER_HOSTS)

    threads = re.sub(r"--set sweep\.fan_out=dask --set sweep\.dask_address=\S+", "--set sweep.fan_out=threads", command)
    assert threads != command
    cluster.run_anywhere(threads)
    _, in_threads = sweep_parent(mlflow, spec.name, "threads")
    assert {child.data.tags[HOST_TAG] for child in in_threads.values()} == {"client"}
    assert sorted(in_threads) == sorted(on_dask)
    for name, child in on_dask.items():
        twin = in_threads[name]
        for metric in ("nll", "steps", "aic", "estimate.concentration", "estimate.rate", "se_concentration"):
            assert child.data.metrics[metric] == twin.data.metrics[metric], (name, metric)
        traces = [
            pd.read_parquet(mlflow.download_artifacts(run.info.run_id, "trace.parquet", str(tmp_path / mode / name)))
            for mode, run in (("d", child), ("t", twin))
        ]
        pd.testing.assert_frame_equal(*(trace.drop(columns="time") for trace in traces))


def load_spec_file(folder: Path, name: str, rates: list[float], **extra) -> Path:
    raw = {
        "name": name,
        "family": "gamma",
        "data": {"simulate": {"params": {"concentration": 2.5, "rate": 1.5}, "n": 300, "seed": 11}},
        "init": {"concentration": 0.8, "rate": 2.0},
        "optimizer": {"name": "adam", "max_steps": 30},
        "sweep": {"lr": rates, "fan_out": "dask"},
        "device": "cpu",
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.timeout(900)
def test_c_two_hundred_configurations_through_the_dask_cluster(cluster, mlflow, tmp_path):
    rates = [float(f"{lr:.6g}") for lr in np.geomspace(1e-3, 0.3, 200)]
    path = load_spec_file(tmp_path, "load-200", rates, record_plots=False)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["simulate"]["n"], raw["optimizer"]["max_steps"] = 200, 20
    path.write_text(yaml.safe_dump(raw))
    started = time.monotonic()
    cluster.run_anywhere(f".venv/bin/nllflow run {path} --set sweep.dask_address={cluster.dask_address}")
    seconds = time.monotonic() - started
    print(f"200 configurations through the Dask fan-out: {seconds:.1f} s, {200 / seconds:.2f} configurations/s")
    spec = load_spec(path)
    parent, children = sweep_parent(mlflow, spec.name, "dask")
    assert parent.info.status == "FINISHED" and len(children) == 200
    assert_fitted(mlflow, spec, children, tmp_path, check_traces=False)
    assert {child.data.tags[HOST_TAG] for child in children.values()} == set(WORKER_HOSTS)
    table = sweep_table(mlflow, parent, tmp_path)
    assert len(table) == 200 and set(table["status"]) == {"FINISHED"} and table["run_id"].is_unique
    assert set(table["run_id"]) == {child.info.run_id for child in children.values()}
    assert parent.data.metrics["configurations"] == 200 and parent.data.metrics["failed"] == 0


def _recording_child(mlflow, experiment: str):
    """A child run of `experiment` still RUNNING: a configuration being recorded right now."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow.search_runs(
        [found.experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{PARENT_TAG}` != ''"
    )
    return runs[0] if runs else None


def test_d_a_dask_worker_killed_mid_sweep_is_rescheduled_and_each_configuration_recorded_once(
    cluster, mlflow, tmp_path
):
    rates = [float(f"{lr:.4g}") for lr in np.geomspace(0.005, 0.3, 12)]
    path = load_spec_file(tmp_path, "dask-worker-killed", rates)
    spec = load_spec(path)
    before = _dask_workers(cluster)
    sweep = cluster.start_anywhere(f".venv/bin/nllflow run {path} --set sweep.dask_address={cluster.dask_address}")
    try:
        # the Dask worker process that is recording a configuration this moment (its host and PID tags)
        child = _wait_for(lambda: _recording_child(mlflow, spec.name), 180, "a child being recorded", 0.1)
        victim = before[child.data.tags[HOST_TAG]]
        assert int(child.data.tags["nllflow.pid"]) == victim["pid"]
        os.kill(victim["pid"], signal.SIGKILL)
        output, _ = sweep.communicate(timeout=SWEEP_SECONDS)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
    assert sweep.returncode == 0, output[-6000:]
    # the nanny replaced the killed process, and Dask ran its tasks again
    replaced = _wait_for(lambda: _dask_workers(cluster).get(victim["name"]), 60, "the replacement worker")
    assert replaced["pid"] != victim["pid"]
    parent, children = sweep_parent(mlflow, spec.name, "dask")
    assert parent.info.status == "FINISHED"
    assert_fitted(mlflow, spec, children, tmp_path)
    assert children[child.info.run_name].info.run_id == child.info.run_id  # completed, not recorded anew
    table = sweep_table(mlflow, parent, tmp_path)
    assert len(table) == 12 and set(table["status"]) == {"FINISHED"}


def _children_now(mlflow, experiment: str) -> list:
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    return mlflow.search_runs([found.experiment_id], filter_string=f"tags.`{PARENT_TAG}` != ''", max_results=1000)


def _environment(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(pair.decode().split("=", 1) for pair in pairs if b"=" in pair)


def test_e_the_mlflow_server_restarted_mid_sweep_leaves_every_child_recorded_once(cluster, mlflow, tmp_path):
    rates = [float(f"{lr:.4g}") for lr in np.geomspace(0.005, 0.3, 12)]
    path = load_spec_file(tmp_path, "mlflow-restarted", rates)
    spec = load_spec(path)
    state = json.loads((cluster.server.home / ".local/share/nllflow/serve/state.json").read_text())
    server = next(process for process in state["processes"] if process["name"] == "mlflow-server")
    environment = _environment(server["pid"])
    sweep = cluster.start_anywhere(f".venv/bin/nllflow run {path} --set sweep.dask_address={cluster.dask_address}")
    restarted = None
    try:
        # some children recorded, the others still to come: stop the server (as serve stop does: SIGTERM
        # to its process group), and start the same command on the same store and port again
        recorded = _wait_for(
            lambda: [c for c in _children_now(mlflow, spec.name) if c.info.status == "FINISHED"], 240, "a child", 0.1
        )
        os.killpg(server["pid"], signal.SIGTERM)
        _wait_for(lambda: not cluster.server.processes("mlflow server"), 30, "the MLflow server's exit", 0.1)
        down_at = time.monotonic()
        time.sleep(2)
        with open(tmp_path / "mlflow-restarted.log", "w") as log:
            restarted = subprocess.Popen(
                server["command"],
                cwd=PROJECT_ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for(lambda: healthy(f"{cluster.mlflow_uri}/health"), 120, "the restarted MLflow server", 0.2)
        outage = time.monotonic() - down_at
        output, _ = sweep.communicate(timeout=SWEEP_SECONDS)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
    assert restarted is not None and restarted.poll() is None
    print(f"MLflow server down for {outage:.1f} s with {len(recorded)} of 12 children recorded")
    assert sweep.returncode == 0, output[-6000:]
    assert len(recorded) < 12
    parent, children = sweep_parent(mlflow, spec.name, "dask")
    assert parent.info.status == "FINISHED"
    assert_fitted(mlflow, spec, children, tmp_path)  # no duplicate (sweep_children), no gap
    table = sweep_table(mlflow, parent, tmp_path)
    assert len(table) == 12 and set(table["status"]) == {"FINISHED"}
    assert not [c for c in _children_now(mlflow, spec.name) if c.info.status == "RUNNING"]


def _fit_runs(cluster: Cluster, experiment: str) -> list:
    """The flow runs of fit/fit that a sweep of `experiment` submitted."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with prefect_client(cluster) as client:
        fit = client.read_deployment_by_name("fit/fit")
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[fit.id])), limit=200
        )
    return [run for run in runs if run.parameters["spec"]["name"] == experiment]


def _running_on(cluster: Cluster, experiment: str, host: str) -> dict[str, str]:
    """The fits of the sweep that run on `host` now (their body started: they sent a heartbeat),
    by flow run id: their configuration."""
    return {
        str(run.id): run.parameters["spec"]["run_name"]
        for run in _fit_runs(cluster, experiment)
        if run.state.is_running() and f"nllflow.host:{host}" in run.tags
    }


def test_f_a_worker_host_killed_mid_sweep_leaves_failed_children_and_nothing_running(cluster, mlflow, tmp_path):
    raw = yaml.safe_load(load_spec_file(tmp_path, "host-killed", []).read_text())
    raw["data"]["simulate"]["n"] = 5000
    raw["optimizer"]["max_steps"] = 400
    raw["sweep"] = {"lr": [0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.3], "fan_out": "deployment"}
    raw["sweep"]["timeout_seconds"] = 300
    path = tmp_path / "host-killed.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    victim = cluster.workers["worker-2"]
    slots = len(os.sched_getaffinity(0))  # the recipe's --limit "$(nproc)"
    sweep = cluster.start_anywhere(f".venv/bin/nllflow run {path}")
    try:
        # worker-2 runs as many fits as it may (so it is taking no other), each past its first heartbeat
        def full() -> dict[str, str]:
            running = _running_on(cluster, spec.name, victim.name)
            if len(running) < slots:
                return {}
            time.sleep(1.0)
            again = _running_on(cluster, spec.name, victim.name)
            return running if again == running else {}

        killed = _wait_for(full, 240, f"{slots} fits running on {victim.name}", 0.2)
        victim.kill()  # the host dies: its worker, the flow runs it started, its Dask worker
        killed_at = time.monotonic()
        output, _ = sweep.communicate(timeout=SWEEP_SECONDS)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
    print(f"the sweep finished {time.monotonic() - killed_at:.0f} s after {victim.name} was killed")
    assert sweep.returncode == 0, output[-6000:]
    parent, children = sweep_parent(mlflow, spec.name, "deployment")
    assert parent.info.status == "FINISHED"
    table = sweep_table(mlflow, parent, tmp_path).set_index("run_name")
    assert sorted(table.index) == sorted(c.label() for c in spec.configurations())
    lost = set(killed.values())
    for name, row in table.iterrows():
        if name in lost:
            assert row["status"] == "FAILED" and "crashed" in row["reason"] and "no heartbeat" in row["reason"], row
            if name in children:  # a partial run it left is closed with the reason
                assert children[name].info.status == "FAILED"
                assert mlflow.get_run(children[name].info.run_id).data.tags["reason"] == row["reason"]
        else:
            assert row["status"] == "FINISHED", (name, row["reason"])
    finished = {name: child for name, child in children.items() if name not in lost}
    assert_fitted(mlflow, spec, finished, tmp_path, check_traces=False, lost=lost)
    with prefect_client(cluster) as client:
        for flow_run_id in killed:
            state = client.read_flow_run(flow_run_id).state
            assert state.is_crashed() and "no heartbeat" in state.message

    def nothing_running() -> None:
        assert all(run.state.is_final() for run in _fit_runs(cluster, spec.name))
        assert not [c for c in _children_now(mlflow, spec.name) if c.info.status == "RUNNING"]

    nothing_running()
    _start_worker_host(cluster, victim)  # the host's next start, with the recipe's commands
    nothing_running()
