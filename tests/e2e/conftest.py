"""The deployment stack as users start it (`python -m nllflow.flows.serve start --auth`), on free
loopback ports in a temporary nllflow home, once for the module, both servers requiring the
credentials it generates; stopped by PID afterwards, also when a test or the start itself fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class Stack:
    home: Path
    env: dict[str, str]  # a client's: the credentials included
    state: dict
    start_output: str
    credentials: dict[str, str]  # the client settings of the generated credentials

    @property
    def prefect_api_url(self) -> str:
        return self.state["prefect_api_url"]

    @property
    def mlflow_uri(self) -> str:
        return self.state["mlflow_tracking_uri"]


def _serve(command: str, env: dict[str, str], timeout: float, *options: str) -> subprocess.CompletedProcess:
    """`python -m nllflow.flows.serve COMMAND` in its own process group, killed with its group on timeout."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nllflow.flows.serve",
            command,
            *(["--prefect-port", "0", "--mlflow-port", "0"] if command == "start" else []),
            *options,
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, output, None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from nllflow.flows.serve import is_running

    home = tmp_path_factory.mktemp("serve-home")
    # nothing of the caller's Prefect or MLflow configuration (or another fixture's) leaks in
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "NLLFLOW_"))}
    env.update(
        NLLFLOW_HOME=str(home),
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_UI_ENABLED="false",
    )
    state_file = home / "serve" / "state.json"
    try:
        started = _serve("start", env, START_TIMEOUT_SECONDS, "--auth")
        assert started.returncode == 0, f"serve start failed:\n{started.stdout[-4000:]}"
        from nllflow.flows.credentials import load

        client = load(home / "serve").client_env()
        yield Stack(home, {**env, **client}, json.loads(state_file.read_text()), started.stdout, client)
    finally:
        recorded = json.loads(state_file.read_text())["processes"] if state_file.is_file() else []
        stopped = _serve("stop", env, 120)
        left = [process for process in recorded if is_running(process)]
        for process in left:  # the last resort: SIGKILL to the process group
            os.killpg(process["pid"], signal.SIGKILL)
    assert stopped.returncode == 0, stopped.stdout
    assert not left, f"still running after serve stop: {[process['name'] for process in left]}"
