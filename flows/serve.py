"""The deployment stack on one host: `python -m nllflow.flows.serve start|stop|status|env`.

`start` brings up, bound to 127.0.0.1 unless --host says otherwise (any other address only with
--auth: credentials for both servers, see `nllflow.flows.credentials`):
- a Prefect server (SQLite in nllflow's home; PREFECT_API_DATABASE_CONNECTION_URL in the
  environment selects PostgreSQL instead),
- an MLflow tracking server (SQLite in nllflow's home, or --backend-store-uri) that proxies
  artifact uploads and downloads to --artifacts-destination,
- the work pools of prefect.yaml, its deployments (`prefect deploy --all`, the command users run),
  a worker for the CPU pool (running at most one flow run per core) and, where CUDA is available,
  one for the GPU pool,
- an automation that marks Crashed a flow run that stopped sending heartbeats (its process or its
  host died: a worker cannot report that, and Prefect's server does not notice it by itself).

Every process is started in its own process group (so `stop` ends its children too); PIDs, ports
and log files are kept in <nllflow home>/serve/state.json. `stop` ends them by PID, after checking
that each PID still runs the command that was started, so a stale file never kills a stranger.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import yaml

from nllflow.errors import InputError
from nllflow.flows import credentials
from nllflow.tracking.store import nllflow_home

PROJECT_ROOT = Path.cwd()

PREFECT_FILE = PROJECT_ROOT / "prefect.yaml"
STARTUP_SECONDS = 180.0
STOP_SECONDS = 10.0
# A worker that polls every 10 s (Prefect's default) adds up to 10 s before each fan-out child
# starts; the local server answers a poll in milliseconds.
WORKER_QUERY_SECONDS = "2"
# prefect.yaml's pools make every flow run send a heartbeat every 30 s (Prefect's minimum); one that
# misses two is taken for dead
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
SILENT_SECONDS = 70.0
SILENT_RUNS_AUTOMATION = "nllflow: crash silent flow runs"


def state_dir() -> Path:
    return nllflow_home() / "serve"


def state_file() -> Path:
    return state_dir() / "state.json"


def read_state() -> dict[str, Any] | None:
    path = state_file()
    return json.loads(path.read_text()) if path.is_file() else None


def _write_state(state: dict[str, Any]) -> None:
    state_file().write_text(json.dumps(state, indent=2))


def work_pools() -> dict[str, str]:
    """The pools prefect.yaml defines, by role (`cpu`, `gpu`): their names."""
    config = yaml.safe_load(PREFECT_FILE.read_text())
    return {role: pool["name"] for role, pool in config["definitions"]["work_pools"].items()}


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _claim_port(host: str, port: int, option: str) -> int:
    """`port`, or a free one when it is 0; a port already taken is the user's to resolve."""
    if port == 0:
        return _free_port(host)
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise InputError(f"port {port} on {host} is in use; pass {option} with a free port (0 picks one)") from None
    return port


def _command_line(pid: int) -> str | None:
    """What `pid` runs now (None when nothing does); `ps` works on Linux and macOS alike."""
    shown = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    return shown.stdout.strip() if shown.returncode == 0 and shown.stdout.strip() else None


def is_running(process: dict[str, Any]) -> bool:
    command = _command_line(process["pid"])
    return command is not None and process["marker"] in command


def _launch(
    state: dict[str, Any], name: str, arguments: list[str], marker: str, env: dict[str, str]
) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start `arguments` in a new process group with its output in a log file, and record it in
    the state file at once, so a failure later in `start` still leaves it stoppable."""
    log = state_dir() / "logs" / f"{name}.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            arguments,
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    entry = {"name": name, "pid": process.pid, "marker": marker, "log": str(log), "command": arguments}
    state["processes"].append(entry)
    _write_state(state)
    return process, entry


def _log_tail(path: str, lines: int = 15) -> str:
    text = Path(path).read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _check_alive(process: subprocess.Popen, entry: dict[str, Any]) -> None:
    """A process that exits while `start` waits for it is the failure to report, with its log."""
    if process.poll() is not None:
        raise RuntimeError(
            f"{entry['name']} exited with code {process.returncode}; "
            f"its log {entry['log']} ends:\n{_log_tail(entry['log'])}"
        )


def _wait_healthy(process: subprocess.Popen, entry: dict[str, Any], url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        _check_alive(process, entry)
        if healthy(url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{entry['name']} did not answer {url} within {STARTUP_SECONDS:g} s; see {entry['log']}")


def _credentials(state: dict[str, Any]) -> credentials.Credentials | None:
    return credentials.load(state_dir()) if state.get("auth") else None


def _client_env(state: dict[str, Any]) -> dict[str, str]:
    given = _credentials(state)
    return given.client_env() if given is not None else {}


def _prefect_settings(state: dict[str, Any]):
    """Prefect's settings for this process's own requests to the stack's server."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates: dict[Any, Any] = {PREFECT_API_URL: state["prefect_api_url"]}
    auth = _client_env(state).get("PREFECT_API_AUTH_STRING")
    if auth:
        updates[PREFECT_API_AUTH_STRING] = auth
    return temporary_settings(updates)


def _base_env(state: dict[str, Any]) -> dict[str, str]:
    """What every process of the stack sees: the two servers' URLs (and the clients' credentials,
    with --auth) and, unless PREFECT_HOME is set, a Prefect home of its own (so a Prefect profile of
    the user's, e.g. one pointing at Prefect Cloud, is not consulted)."""
    env = {**os.environ, **_client_env(state)}
    env["PREFECT_API_URL"] = state["prefect_api_url"]
    env["MLFLOW_TRACKING_URI"] = state["mlflow_tracking_uri"]
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS)
    return env


def _create_pools(state: dict[str, Any], pools: Sequence[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with _prefect_settings(state), get_client(sync_client=True) as client:
        for name in pools:
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=template), overwrite=True
            )


def _crash_silent_runs(state: dict[str, Any]) -> None:
    """The automation that crashes silent flow runs (Prefect's recipe for "zombie" runs): a flow run
    of the deployments sends a heartbeat every HEARTBEAT_SECONDS (PREFECT_FLOWS_HEARTBEAT_FREQUENCY in
    prefect.yaml's pools); once it has sent one, SILENT_SECONDS without another, and without a final
    state, make it Crashed. Created, or brought up to date, on every start (a PostgreSQL database
    keeps it between starts)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    final = {f"prefect.flow-run.{name}" for name in ("Completed", "Failed", "Cancelled", "Crashed")}
    automation = AutomationCore(
        name=SILENT_RUNS_AUTOMATION,
        description=f"a flow run that sent heartbeats, then none for {SILENT_SECONDS:g} s, died with its process",
        trigger=EventTrigger(
            after={HEARTBEAT_EVENT},
            expect={HEARTBEAT_EVENT, *final},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=SILENT_SECONDS,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {SILENT_SECONDS:g} s: the flow run's process or its host died",
            )
        ],
    )
    with _prefect_settings(state), get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(SILENT_RUNS_AUTOMATION)
        if existing:
            client.update_automation(existing[0].id, automation)
        else:
            client.create_automation(automation)


def _wait_for_workers(
    state: dict[str, Any], workers: dict[str, tuple[str, subprocess.Popen, dict[str, Any]]], deadline: float
) -> None:
    """Until each worker (name → its pool, process and state entry) has reported to the server: then
    a run submitted right after `start` returns is picked up."""
    from prefect.client.orchestration import get_client

    with _prefect_settings(state), get_client(sync_client=True) as client:
        waiting = dict(workers)
        while waiting and time.monotonic() < deadline:
            for name, (pool, process, entry) in list(waiting.items()):
                _check_alive(process, entry)
                if any(w.name == name and w.status == "ONLINE" for w in client.read_workers_for_work_pool(pool)):
                    waiting.pop(name)
            if waiting:
                time.sleep(0.5)
    if waiting:
        raise RuntimeError(f"worker(s) {', '.join(waiting)} did not come online; see {state_dir() / 'logs'}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def start(
    host: str = "127.0.0.1",
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    mlflow_workers: int = 2,
    auth: bool = False,
) -> dict[str, Any]:
    """Start the stack; on any failure stop what was started and re-raise. `auth`: both servers
    require the credentials of `nllflow.flows.credentials` (generated on the first such start);
    without it only a loopback `host` is allowed. The state's `new_credentials` is True when they
    were generated now."""
    if not auth and not credentials.is_loopback(host):
        raise InputError(
            f"refusing to serve on {host} without authentication (anyone who reaches it could read every run and "
            f"start flow runs): pass --auth (credentials generated under {state_dir()}, mode 0600) or --host 127.0.0.1"
        )
    current = read_state()
    if current is not None and any(is_running(p) for p in current["processes"]):
        raise InputError(
            f"already running (state in {state_file()}); stop it first: python -m nllflow.flows.serve stop"
        )
    folder = state_dir()
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    prefect_port = _claim_port(host, prefect_port, "--prefect-port")
    mlflow_port = _claim_port(host, mlflow_port, "--mlflow-port")
    pools = work_pools()
    given, new_credentials = credentials.load_or_create(folder) if auth else (None, False)
    state: dict[str, Any] = {
        "host": host,
        "auth": auth,
        "prefect_port": prefect_port,
        "mlflow_port": mlflow_port,
        "prefect_api_url": f"http://{host}:{prefect_port}/api",
        "prefect_ui_url": f"http://{host}:{prefect_port}",
        "mlflow_tracking_uri": f"http://{host}:{mlflow_port}",
        "processes": [],
    }
    _write_state(state)
    env = _base_env(state)
    python = sys.executable
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        mlflow_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}
        mlflow_app = []
        if given is not None:
            server_env.update(credentials.prefect_server_env(given))
            mlflow_env.update(credentials.mlflow_server_env(given, folder))
            mlflow_app = ["--app-name", "basic-auth"]
        prefect_server, prefect_entry = _launch(
            state,
            "prefect-server",
            [python, "-m", "prefect", "server", "start", "--host", host, "--port", str(prefect_port)],
            "prefect server start",
            server_env,
        )
        mlflow_server, mlflow_entry = _launch(
            state,
            "mlflow-server",
            [
                python,
                "-m",
                "mlflow",
                "server",
                "--host",
                host,
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination",
                artifacts_destination or str(folder / "mlartifacts"),
                "--workers",
                str(mlflow_workers),
                *mlflow_app,
            ],
            "mlflow server",
            mlflow_env,
        )
        _wait_healthy(prefect_server, prefect_entry, f"{state['prefect_api_url']}/health", deadline)
        _wait_healthy(mlflow_server, mlflow_entry, f"{state['mlflow_tracking_uri']}/health", deadline)
        _create_pools(state, list(pools.values()))
        _crash_silent_runs(state)
        deploy_log = folder / "logs" / "deploy.log"
        with deploy_log.open("w") as sink:
            deployed = subprocess.run(
                [python, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                cwd=PROJECT_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=STARTUP_SECONDS,
            )
        if deployed.returncode != 0:
            raise RuntimeError(f"prefect deploy --all failed; its log {deploy_log} ends:\n{_log_tail(str(deploy_log))}")
        roles = ["cpu"] + (["gpu"] if "gpu" in pools and _cuda_available() else [])
        workers = {}
        for role in roles:
            name = f"{pools[role]}-{socket.gethostname()}"
            command = [python, "-m", "prefect", "worker", "start", "--pool", pools[role], "--name", name]
            if role == "cpu":  # a flow run per core; the rest wait for this or another host's worker
                command += ["--limit", str(os.cpu_count() or 1)]
            workers[name] = (pools[role], *_launch(state, name, command, "prefect worker start", env))
        _wait_for_workers(state, workers, time.monotonic() + STARTUP_SECONDS)
    except BaseException:
        stop()
        raise
    return {**state, "new_credentials": new_credentials}


def _child_groups(pid: int) -> list[int]:
    """The process groups that children of `pid` lead (a worker starts each flow run in a session of
    its own, so ending the worker's group does not reach them)."""
    listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,pgid="], capture_output=True, text=True).stdout
    rows = [[int(field) for field in line.split()] for line in listing.splitlines() if line.strip()]
    return [child for child, parent, group in rows if parent == pid and group == child]


def end_group(pgid: int, name: str) -> None:
    """SIGTERM to the process group (a backgrounded Prefect worker ignores SIGINT), SIGKILL after
    STOP_SECONDS."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    print(f"{name} (process group {pgid}) ignored SIGTERM for {STOP_SECONDS:g} s: killing it", file=sys.stderr)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop() -> list[str]:
    """Stop every recorded process, workers first, and then whatever flow runs a worker left behind;
    returns the names of those that were running."""
    state = read_state()
    if state is None:
        return []
    stopped = []
    for process in reversed(state["processes"]):
        if is_running(process):
            # a worker given the chance cancels its flow runs itself; the rest are ended here
            children = _child_groups(process["pid"])
            end_group(process["pid"], process["name"])
            for group in children:
                end_group(group, f"a child of {process['name']}")
            stopped.append(process["name"])
    state_file().unlink(missing_ok=True)
    return stopped


def running_prefect_api() -> str | None:
    """The Prefect API of the stack `start` brought up, while its server runs and answers (None
    otherwise): the `nllflow` command reuses it."""
    state = read_state()
    server = next((p for p in (state or {}).get("processes", []) if p["name"] == "prefect-server"), None)
    if server is None or not is_running(server) or not healthy(f"{state['prefect_api_url']}/health"):
        return None
    return state["prefect_api_url"]


def env_lines(state: dict[str, Any], secrets: bool = False) -> list[str]:
    """The client settings as export lines; with --auth the user name, and the secrets only when
    asked for (else a line saying how to get them)."""
    lines = [
        f"export PREFECT_API_URL={state['prefect_api_url']}",
        f"export MLFLOW_TRACKING_URI={state['mlflow_tracking_uri']}",
    ]
    client = _client_env(state)
    if not client:
        return lines
    lines.append(f"export MLFLOW_TRACKING_USERNAME={shlex.quote(client['MLFLOW_TRACKING_USERNAME'])}")
    if secrets:
        lines += [f"export {name}={shlex.quote(client[name])}" for name in credentials.SECRET_SETTINGS]
    else:
        lines.append(f"# and {' and '.join(credentials.SECRET_SETTINGS)}: python -m nllflow.flows.serve env --secrets")
    return lines


def _print_status(state: dict[str, Any]) -> None:
    health = {
        "prefect-server": f"{state['prefect_api_url']}/health",
        "mlflow-server": f"{state['mlflow_tracking_uri']}/health",
    }
    for process in state["processes"]:
        running = is_running(process)
        verdict = "running" if running else "not running"
        if running and process["name"] in health and not healthy(health[process["name"]]):
            verdict = "running, not answering"
        print(f"{process['name']:32s} pid {process['pid']:<8d} {verdict:24s} log {process['log']}")
    print(f"Prefect UI  {state['prefect_ui_url']}")
    print(f"MLflow UI   {state['mlflow_tracking_uri']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nllflow.flows.serve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    begin = commands.add_parser("start", help="start the servers, create the pools, deploy, start the worker(s)")
    begin.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind and advertise (another host's workers need a reachable one)",
    )
    begin.add_argument("--prefect-port", type=int, default=4200, help="0 picks a free port")
    begin.add_argument("--mlflow-port", type=int, default=5000, help="0 picks a free port")
    begin.add_argument(
        "--backend-store-uri",
        help="MLflow's store (default: SQLite in nllflow's home), e.g. postgresql://user:password@db/mlflow",
    )
    begin.add_argument(
        "--artifacts-destination",
        help="where MLflow's server keeps artifacts (default: a folder in nllflow's home), e.g. s3://bucket/nllflow",
    )
    begin.add_argument("--mlflow-workers", type=int, default=2)
    begin.add_argument(
        "--auth",
        action="store_true",
        help="require credentials on both servers (generated once under nllflow's home, mode 0600); "
        "needed for any --host but loopback",
    )
    commands.add_parser("stop", help="stop everything `start` started, by PID")
    commands.add_parser("status", help="what runs, where, and its log file")
    client = commands.add_parser(
        "env", help='export lines for the clients: eval "$(python -m nllflow.flows.serve env)"'
    )
    client.add_argument(
        "--secrets", action="store_true", help="with the stack's credentials (--auth), not only their names"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "start":
            state = start(
                args.host,
                args.prefect_port,
                args.mlflow_port,
                args.backend_store_uri,
                args.artifacts_destination,
                args.mlflow_workers,
                args.auth,
            )
            _print_status(state)
            if state["new_credentials"]:
                print(
                    f"credentials generated in {state_dir() / 'credentials.json'} (mode 0600), shown this once; "
                    "clients on other hosts need these settings:",
                    *env_lines(state, secrets=True),
                    sep="\n  ",
                )
            else:
                print("point your shell at them:", *env_lines(state), sep="\n  ")
            print("stop with: make stop (or python -m nllflow.flows.serve stop)")
            return 0
        if args.command == "stop":
            stopped = stop()
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
            return 0
        state = read_state()
        if state is None:
            print("not running (start with: make serve)", file=sys.stderr)
            return 1
        if args.command == "status":
            _print_status(state)
        else:
            print("\n".join(env_lines(state, args.secrets)))
        return 0
    except InputError as error:
        print(f"serve: error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"serve: failed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
