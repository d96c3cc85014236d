"""The Prefect server the `nllflow` command reuses (nllflow.flows.server), with real servers in a
temporary nllflow home: a second command uses the first one's server, concurrent starts start one,
a killed server's stale state is replaced, `nllflow server stop` leaves no process behind, and an
idle server stops itself. Every server a test starts is stopped by PID (its process group)
afterwards, also when the test fails."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
GROUNDBEEF = ROOT / "experiments" / "data" / "groundbeef.parquet"
COMMAND_SECONDS = 300


def _group(pgid: int) -> list[int]:
    """The PIDs of the processes in process group `pgid`."""
    listing = subprocess.run(["ps", "-A", "-o", "pid=,pgid="], capture_output=True, text=True).stdout
    return [
        pid for pid, group in (map(int, line.split()) for line in listing.splitlines() if line.strip()) if group == pgid
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): it has ended
    status = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(status) and not status.startswith("Z")


def _state(home: Path) -> dict | None:
    path = home / "server" / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One nllflow home for the module (the Prefect database is created once); every server group
    seen is killed at the end."""
    folder = tmp_path_factory.mktemp("server-home")
    seen: set[int] = set()
    yield folder, seen
    state = _state(folder)
    if state:
        seen.add(state["pid"])
    for pgid in seen:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def env(home):
    folder, seen = home
    outside = ("PREFECT_", "MLFLOW_", "NLLFLOW_SERVER", "NLLFLOW_WARM")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(outside)}
    environment.update(
        NLLFLOW_HOME=str(folder),
        MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    yield environment
    state = _state(folder)
    if state:
        seen.add(state["pid"])


def _nllflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nllflow", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
    )


def _fit(env: dict[str, str]) -> dict:
    done = _nllflow(env, "fit", "--data", str(GROUNDBEEF), "--column", "serving", "--family", "gamma", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(
        f"{api_url}/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_a_second_command_uses_the_first_commands_server(env, home):
    folder, seen = home
    first = _fit(env)
    state = _state(folder)
    assert state is not None and _alive(state["pid"])
    seen.add(state["pid"])
    second = _fit(env)
    assert _state(folder)["pid"] == state["pid"]
    # the server's own records: both commands' flow runs are on it
    fits = [run for run in _flow_runs(state["api_url"]) if run["name"] == "nllflow-fit"]
    assert len(fits) == 2 and all(run["state_type"] == "COMPLETED" for run in fits)
    assert first["run_id"] != second["run_id"]
    assert first["params"] == pytest.approx(second["params"], rel=1e-12)
    status = _nllflow(env, "server", "status")
    assert status.returncode == 0 and state["api_url"] in status.stdout and str(state["pid"]) in status.stdout


def _runner_children(home: Path) -> int:
    """How many commands the warm runner has forked a child for (its log lines)."""
    log = home / "server" / "server.log"
    return sum(": child " in line for line in log.read_text().splitlines()) if log.exists() else 0


def _wait_for_runner(home: Path) -> dict:
    path = home / "server" / "runner.json"
    deadline = time.monotonic() + COMMAND_SECONDS
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert path.exists(), (home / "server" / "server.log").read_text()[-3000:]
    return json.loads(path.read_text())


def _run_status(database: Path, run_id: str) -> str | None:
    with sqlite3.connect(database) as connection:
        row = connection.execute("select status from runs where run_uuid = ?", (run_id,)).fetchone()
    return None if row is None else row[0]


def test_the_warm_runner_serves_commands_of_its_own_environment_only(env, home, tmp_path):
    folder, seen = home
    _fit(env)  # the server (and with it the runner) runs
    seen.add(_state(folder)["pid"])
    runner = _wait_for_runner(folder)
    assert _alive(runner["pid"]) and runner["pid"] in _group(_state(folder)["pid"])
    served = _runner_children(folder)
    result = _fit(env)
    assert _runner_children(folder) == served + 1
    # the same answer as a process of its own: scipy's closed-form gamma MLE, recorded in this store
    x = pd.read_parquet(GROUNDBEEF)["serving"].to_numpy()
    shape, _, scale = stats.gamma.fit(x, floc=0)
    assert result["params"]["concentration"] == pytest.approx(shape, rel=1e-6)
    assert result["params"]["rate"] == pytest.approx(1 / scale, rel=1e-6)
    assert _run_status(folder / "mlflow.db", result["run_id"]) == "FINISHED"
    # bad input through the runner: its one line on the command's stderr, exit 2
    refused = _nllflow(env, "fit", "--data", "missing.csv", "--column", "x", "--family", "gamma")
    assert refused.returncode == 2 and refused.stderr.startswith("nllflow: error:") and "missing.csv" in refused.stderr
    assert _runner_children(folder) == served + 2
    # another store is another environment: the command runs in its own process and records there
    other = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"}
    elsewhere = _fit(other)
    assert _runner_children(folder) == served + 2
    assert _run_status(tmp_path / "other.db", elsewhere["run_id"]) == "FINISHED"
    assert _run_status(folder / "mlflow.db", elsewhere["run_id"]) is None
    # and NLLFLOW_WARM=0 runs a command in its own process
    _fit({**env, "NLLFLOW_WARM": "0"})
    assert _runner_children(folder) == served + 2


def test_ctrl_c_reaches_the_warm_runners_child(env, home):
    folder, seen = home
    _fit(env)
    seen.add(_state(folder)["pid"])
    _wait_for_runner(folder)
    served = _runner_children(folder)
    command = [sys.executable, "-m", "nllflow", "run", str(ROOT / "experiments" / "gamma_lr_sweep.yaml")]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _runner_children(folder) == served and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _runner_children(folder) == served + 1
        log = (folder / "server" / "server.log").read_text().splitlines()
        child = int([line for line in log if ": child " in line][-1].split(": child ")[1].split(":")[0])
        time.sleep(1.5)  # into the sweep (it takes tens of seconds)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "nllflow: interrupted" in stderr
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child)


def _processes_of(home: Path) -> list[int]:
    """The live processes whose environment names `home` as NLLFLOW_HOME (a supervisor, its server)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if f"NLLFLOW_HOME={home}".encode() in variables and _alive(int(environ.parent.name)):
            pids.append(int(environ.parent.name))
    return pids


def test_a_refused_command_leaves_no_server_behind(env, tmp_path):
    """The command claims its server before it checks its input (the start overlaps its imports):
    refused, it stops the server it started again."""
    fresh = {**env, "NLLFLOW_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    refused = _nllflow(fresh, "fit", "--data", str(GROUNDBEEF), "--column", "serving", "--family", "nope")
    assert refused.returncode == 2 and "unknown family 'nope'" in refused.stderr
    assert (tmp_path / "server" / "server.log").exists()  # it did start one
    assert _state(tmp_path) is None
    deadline = time.monotonic() + 30  # (a process that got SIGTERM may take a moment to end)
    while _processes_of(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_of(tmp_path) == []
    assert not (tmp_path / "m.db").exists()


def test_a_command_in_its_own_process_exits_and_its_figures_follow(env, home):
    """NLLFLOW_WARM=0: the command prints its answer and exits; a child it forked renders and logs
    the run's five figures and removes the pending tag."""
    from mlflow import MlflowClient

    from nllflow.tracking.recorder import PLOTS_PENDING_TAG

    folder, seen = home
    result = _fit({**env, "NLLFLOW_WARM": "0"})
    seen.add(_state(folder)["pid"])
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + 120
    while PLOTS_PENDING_TAG in client.get_run(result["run_id"]).data.tags and time.monotonic() < deadline:
        time.sleep(0.2)
    run = client.get_run(result["run_id"])
    assert PLOTS_PENDING_TAG not in run.data.tags and run.info.status == "FINISHED"
    plots = {Path(a.path).name for a in client.list_artifacts(result["run_id"], "plots")}
    assert plots == {"loss.png", "density.png", "cdf.png", "pp.png", "qq.png"}
    local = Path(client.download_artifacts(result["run_id"], "plots/qq.png", str(folder / "downloaded")))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (folder / "plots.log").exists()  # no failure recorded


def test_server_stop_waits_for_the_figures_the_warm_runner_renders(env, home):
    """Through the warm runner a fit's figures are rendered by the runner's child after the answer,
    in the server's process group; `nllflow server stop` right after the answer ends that group,
    but only once the figures are logged and the pending tag is gone."""
    from mlflow import MlflowClient

    from nllflow.tracking.recorder import PLOTS_PENDING_TAG

    folder, seen = home
    _fit(env)
    seen.add(_state(folder)["pid"])
    _wait_for_runner(folder)
    served = _runner_children(folder)
    result = _fit(env)
    assert _runner_children(folder) == served + 1  # its figures were rendered in the runner's child
    stopped = _nllflow(env, "server", "stop")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(result["run_id"])
    assert PLOTS_PENDING_TAG not in run.data.tags and run.info.status == "FINISHED"
    plots = {
        Path(a.path).name for a in MlflowClient(env["MLFLOW_TRACKING_URI"]).list_artifacts(result["run_id"], "plots")
    }
    assert plots == {"loss.png", "density.png", "cdf.png", "pp.png", "qq.png"}


def test_a_stale_state_file_is_replaced(env, home):
    folder, seen = home
    claim = (
        "from nllflow.flows.server import claim_server\n"
        "with claim_server() as lease:\n"
        "    print(lease.url, lease.state['pid'])\n"
    )
    done = subprocess.run([sys.executable, "-c", claim], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    old = _state(folder)
    seen.add(old["pid"])
    os.killpg(old["pid"], signal.SIGKILL)  # the server dies without cleaning up
    deadline = time.monotonic() + 30
    while _group(old["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _state(folder) == old  # the state file stayed behind
    result = _fit(env)
    new = _state(folder)
    seen.add(new["pid"])
    assert new["pid"] != old["pid"] and _alive(new["pid"])
    assert any(run["name"] == "nllflow-fit" for run in _flow_runs(new["api_url"]))
    assert result["converged"]


def test_concurrent_commands_start_one_server_and_stop_leaves_no_process(env, home):
    folder, seen = home
    assert _nllflow(env, "server", "stop").returncode == 0
    assert _state(folder) is None
    claim = (
        "from nllflow.flows.server import claim_server\n"
        "with claim_server() as lease:\n"
        "    print(lease.state['pid'], lease.url)\n"
    )
    starts = [
        subprocess.Popen([sys.executable, "-c", claim], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outputs = [start.communicate(timeout=300)[0].split() for start in starts]
    assert all(start.returncode == 0 for start in starts)
    pids = {int(pid) for pid, _ in outputs}
    seen.update(pids)
    assert len(pids) == 1 and len({url for _, url in outputs}) == 1
    (pid,) = pids
    members = _group(pid)
    assert len(members) >= 2  # the supervisor and the Prefect server
    stopped = _nllflow(env, "server", "stop")
    assert stopped.returncode == 0 and str(pid) in stopped.stdout
    assert not any(_alive(member) for member in members)
    assert not [member for member in _group(pid) if _alive(member)]  # the warm runner too
    assert _state(folder) is None
    assert _nllflow(env, "server", "status").returncode == 1


def test_an_idle_server_stops_itself_and_prefect_api_url_is_used_as_given(env, home):
    folder, seen = home
    idle = {**env, "NLLFLOW_SERVER_IDLE_MINUTES": "0.05"}  # 3 s
    claim = (
        "from nllflow.flows.server import claim_server\n"
        "with claim_server() as lease:\n"
        "    print(lease.origin, lease.state['pid'], lease.url)\n"
    )
    done = subprocess.run([sys.executable, "-c", claim], env=idle, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    origin, pid, url = done.stdout.split()
    seen.add(int(pid))
    members = _group(int(pid))
    # with PREFECT_API_URL set, that server is used and nllflow starts none of its own
    given = subprocess.run(
        [sys.executable, "-c", claim.replace("lease.state['pid']", "lease.state")],
        env={**idle, "PREFECT_API_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert given.stdout.split() == ["environment", "None", url]
    deadline = time.monotonic() + 120
    while any(_alive(member) for member in members) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert origin == "nllflow" and not any(_alive(member) for member in members)
    assert _state(folder) is None
