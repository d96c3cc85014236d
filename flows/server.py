"""The Prefect server that the `nllflow` command runs its flows on, started once and reused.

Which server a command uses, first found first:
1. `PREFECT_API_URL`, when the environment (or the Prefect settings of this process, such as a
   test harness's) sets one;
2. the stack of `make serve` (`python -m nllflow.flows.serve start`), while its Prefect server answers;
3. the server nllflow started earlier under its home (`$NLLFLOW_HOME/server/`, with a Prefect home of
   its own, so a Prefect profile of the user's is not read);
4. else one is started there, in the background: `prefect server start` on 127.0.0.1 and a free
   port, in a session of its own (detached from the terminal), under a small supervisor process
   that stops it after `NLLFLOW_SERVER_IDLE_MINUTES` (default 30) without a command using it.

A command claims its server first thing (`claim_early`, before it imports torch and checks its
input), so a start overlaps both; a command that ends before its flow (its input refused) stops a
server it started for it, unless another command uses it by then (`release_early`).

Commands that start at once start one server: the start is under an exclusive lock
(`start.lock`). A command holds a shared lock (`use.lock`) while it uses the server, and the
supervisor stops the server only when it can take that lock exclusively and the last use
(`last-used`) is older than the idle time, so a long sweep is never cut off. `state.json` holds the
supervisor's PID (the leader of the server's process group), its port and log; a PID that no longer
runs the supervisor (a killed server) is stale and replaced. `nllflow server status|stop` report
and stop it (`stop`: by PID, the whole process group).

`python -m nllflow.flows.server supervise --port P --idle-minutes M` is the supervisor itself; it
imports neither Prefect nor the numeric stack.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

from nllflow.errors import InputError
from nllflow.flows.runner import WARM_ENV
from nllflow.flows.serve import STOP_SECONDS, end_group, healthy, is_running, running_prefect_api
from nllflow.tracking.store import nllflow_home

HOST = "127.0.0.1"
MARKER = "nllflow.flows.server supervise"
IDLE_ENV = "NLLFLOW_SERVER_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 30.0
STARTUP_SECONDS = 180.0
POLL_SECONDS = 0.1
# how long a refused command tries to find the server it started unused before leaving it running
UNUSED_PROBE_SECONDS = 0.5
# the longest the warm runner's start waits for the command that started the server
RUNNER_WAIT_SECONDS = 30.0
# how often the supervisor looks at the idle time, at most (and a tenth of the idle time, at least)
CHECK_SECONDS = 30.0
# how long `nllflow server stop` waits for figures still being rendered (about a second a fit
# here; a renderer gives up after 10 minutes) before it stops them with the server
RENDER_WAIT_SECONDS = 120.0


def server_dir() -> Path:
    return nllflow_home() / "server"


def figures_lock() -> Path:
    """Shared-locked while a command owes figures (nllflow.tracking.deferred): the warm runner's
    child that renders them is in the server's process group, which a stop ends."""
    return server_dir() / "figures.lock"


def state_file() -> Path:
    return server_dir() / "state.json"


def read_state() -> dict[str, Any] | None:
    """The recorded server (None when there is none); a file half written by a crash counts as none."""
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None


def idle_minutes() -> float:
    text = os.environ.get(IDLE_ENV, "")
    if not text:
        return DEFAULT_IDLE_MINUTES
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise InputError(f"{IDLE_ENV} must be a positive number of minutes, got {text!r}")
    return value


def _process(state: dict[str, Any]) -> dict[str, Any]:
    return {"pid": state["pid"], "marker": MARKER}


def running(state: dict[str, Any] | None) -> bool:
    """The recorded supervisor still runs (its PID runs this module's supervisor, not a stranger)."""
    return state is not None and is_running(_process(state))


def _lock(name: str, mode: int) -> Any:
    """An open lock file under the server folder, locked with `mode` (released when it is closed)."""
    folder = server_dir()
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / name, "a")
    try:
        fcntl.flock(handle, mode)
    except BaseException:
        handle.close()
        raise
    return handle


def _touch_last_used() -> None:
    path = server_dir() / "last-used"
    path.touch()
    os.utime(path)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


# the supervisors this process started, by PID: reaped here when this process stops one
_spawned: dict[int, subprocess.Popen] = {}


def _spawn() -> dict[str, Any]:
    """Start the supervisor (and through it the Prefect server) in a session of its own; its state."""
    folder = server_dir()
    port = _free_port()
    log = folder / "server.log"
    minutes = idle_minutes()
    command = [sys.executable, "-m", "nllflow.flows.server", "supervise", "--port", str(port)]
    command += ["--idle-minutes", repr(minutes)]
    with log.open("a") as sink:
        process = subprocess.Popen(
            command,
            env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _spawned[process.pid] = process
    state = {
        "pid": process.pid,
        "port": port,
        "api_url": f"http://{HOST}:{port}/api",
        "log": str(log),
        "idle_minutes": minutes,
        "started_at": time.time(),
        "prefect_home": str(folder / "prefect"),
    }
    temporary = state_file().with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2))
    temporary.replace(state_file())
    return state


def _stop_group(state: dict[str, Any]) -> None:
    child = _spawned.pop(state["pid"], None)
    own = child is not None and child.poll() is None
    if own:
        # this process's own child: reaped here (else it stays a zombie that still "runs"), then
        # the rest of its group, such as a Prefect server it had started
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    if own or running(state):
        end_group(state["pid"], "the nllflow Prefect server")


def _forget(state: dict[str, Any]) -> None:
    """Remove the state file if it still names `state`'s process."""
    current = read_state()
    if current is not None and current.get("pid") == state.get("pid"):
        state_file().unlink(missing_ok=True)


class Lease:
    """The server a command runs its flows on (`url`; `origin`: environment, serve or nllflow).
    For nllflow's own server it holds the shared use lock until it is closed, so the server is not
    stopped for idleness under a running command. As a context manager: waits until the server
    answers, points Prefect at it (environment and, where Prefect is imported, its settings) and
    records the use when it ends."""

    def __init__(
        self, url: str, origin: str, state: dict[str, Any] | None = None, lock: Any = None, spawned: bool = False
    ):
        self.url, self.origin, self.state, self._lock, self.spawned = url, origin, state, lock, spawned
        self._stack = ExitStack()

    def wait(self) -> None:
        """Until the server answers; a supervisor that exits first is the failure, with its log. A
        server nllflow did not start is asked once whether it takes this client's credentials."""
        if self.state is None:
            check_access(self.url)
            return
        deadline = time.monotonic() + STARTUP_SECONDS
        health = self.url.removesuffix("/api") + "/api/health"
        while not healthy(health):
            if not running(self.state):
                raise RuntimeError(f"the Prefect server exited while starting; see its log {self.state['log']}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Prefect server did not answer within {STARTUP_SECONDS:g} s; see {self.state['log']}"
                )
            time.sleep(POLL_SECONDS)

    def __enter__(self) -> Lease:
        try:
            self.wait()
            os.environ["PREFECT_API_URL"] = self.url
            _ours.add(self.url)
            if "prefect" in sys.modules:
                from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

                updates: dict[Any, Any] = {PREFECT_API_URL: self.url}
                if not any(name in os.environ for name in _HEARTBEAT_SETTINGS):
                    # a flow joins its heartbeat thread at its end, which sleeps in whole seconds: up
                    # to a second after every flow and child flow. A command's flows need none (no
                    # automation watches them; a worker's deployments set their own frequency)
                    updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
                self._stack.enter_context(temporary_settings(updates))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            _touch_last_used()
            self._lock.close()
            self._lock = None


_HEARTBEAT_SETTINGS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")
# the URLs of nllflow's own servers that this process pointed PREFECT_API_URL at: not the user's
_ours: set[str] = set()


def _configured_url() -> str | None:
    """PREFECT_API_URL as the user (or a harness in this process) set it, not as nllflow did."""
    url = os.environ.get("PREFECT_API_URL") or None
    if url is None and "prefect" in sys.modules:
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
    return None if url is None or url in _ours else url


def _auth_string() -> str | None:
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or None
    if auth is None and "prefect" in sys.modules:
        from prefect.settings import get_current_settings

        secret = get_current_settings().api.auth_string
        auth = secret.get_secret_value() if secret is not None else None
    return auth


def check_access(url: str) -> None:
    """One request that needs authorisation (`/admin/version`, as Prefect's client asks first):
    InputError, in one line naming the setting, when the server refuses this client. An unreachable
    server is left to Prefect's own error."""
    request = urllib.request.Request(url.rstrip("/") + "/admin/version")
    auth = _auth_string()
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10):
            return
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            given = "was refused" if auth else "is not set"
            raise InputError(
                f"Prefect server {url} requires credentials: PREFECT_API_AUTH_STRING {given} "
                "(python -m nllflow.flows.serve env --secrets prints it on the server's host)"
            ) from None
    except (urllib.error.URLError, OSError):
        return


# the lease a command took before its imports (claim_early), until claim_server hands it over
_early: Lease | None = None


def claim_early() -> None:
    """Claim the server first thing in a command that runs flows, so that a server it has to start
    starts while the command imports torch and checks its input (two seconds here) instead of
    after; `claim_server` hands the lease over, and `release_early` undoes it for a command that
    ends before its flow."""
    global _early
    if _early is None:
        _early = claim_server()


def release_early() -> None:
    """A command that claimed early and ends without a flow (its input refused, interrupted):
    the lease is let go, and a server it started for nothing is stopped again unless another
    command uses it by now."""
    global _early
    lease, _early = _early, None
    if lease is not None:
        _let_go(lease)


def _let_go(lease: Lease) -> None:
    """Close `lease`; a server it started is stopped unless another command uses it by now (the
    supervisor's own probe of the use lock takes an instant, a command holds it for its run)."""
    lease.close()
    if not lease.spawned:
        return
    with _lock("start.lock", fcntl.LOCK_EX), open(server_dir() / "use.lock", "a") as handle:
        if _unused_within(handle, UNUSED_PROBE_SECONDS):
            _stop_group(lease.state)
            _forget(lease.state)


def _unused_within(handle: Any, seconds: float) -> bool:
    """Whether the lock file `handle` (the use lock, the figures lock) could be taken exclusively
    (no process holds it shared) within `seconds`; it stays taken until `handle` is closed."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_SECONDS)


def claim_server() -> Lease:
    """The server to use (see the module's docstring), started in the background when there is
    none; it may still be starting: the Lease waits for it when entered, so the caller's imports
    overlap the start."""
    global _early
    for pid, child in list(_spawned.items()):
        if child.poll() is not None:  # a supervisor that stopped itself: reaped
            del _spawned[pid]
    if _early is not None:
        lease, _early = _early, None
        configured = _configured_url()
        if configured and lease.origin != "environment":
            # Prefect, imported since, reads a server from the user's profile: that one, not ours
            _let_go(lease)
            return Lease(configured, "environment")
        return lease
    configured = _configured_url()
    if configured:
        return Lease(configured, "environment")
    served = running_prefect_api()
    if served:
        return Lease(served, "serve")
    use = _lock("use.lock", fcntl.LOCK_SH)
    try:
        with _lock("start.lock", fcntl.LOCK_EX):
            state = read_state()
            if state is not None and not running(state):
                _forget(state)  # a stale file: the server was killed or crashed
                state = None
            if state is not None and not healthy(f"{state['api_url']}/health"):
                if time.time() - state["started_at"] > STARTUP_SECONDS:  # hung: replace it
                    _stop_group(state)
                    _forget(state)
                    state = None
            spawned = state is None
            if spawned:
                state = _spawn()
            _touch_last_used()
    except BaseException:
        use.close()
        raise
    return Lease(state["api_url"], "nllflow", state, use, spawned)


def stop() -> dict[str, Any] | None:
    """Stop nllflow's own server by PID (its whole process group); the state it had, None when
    none was running. Under the start lock, so no command starts one meanwhile."""
    with _lock("start.lock", fcntl.LOCK_EX):
        state = read_state()
        if state is None:
            return None
        was_running = running(state)
        with open(figures_lock(), "a") as figures:
            _unused_within(figures, RENDER_WAIT_SECONDS)
            _stop_group(state)
        _forget(state)
    return state if was_running else None


def status_lines() -> tuple[list[str], bool]:
    """What `nllflow server status` prints, and whether a server is in use."""
    configured = _configured_url()
    served = running_prefect_api()
    state = read_state()
    own = state is not None and running(state)
    lines = []
    if configured:
        lines.append(f"PREFECT_API_URL is set: commands use {configured}")
    elif served:
        lines.append(f"the make-serve stack runs: commands use {served}")
    if own:
        answering = "answering" if healthy(f"{state['api_url']}/health") else "not answering (starting?)"
        last = server_dir() / "last-used"
        idle = time.time() - (last.stat().st_mtime if last.exists() else state["started_at"])
        lines += [
            f"nllflow's Prefect server: {state['api_url']} (pid {state['pid']}, {answering})",
            f"  idle for {idle / 60:.1f} min; stops itself after {state['idle_minutes']:g} min idle",
            f"  log {state['log']}; Prefect home {state['prefect_home']}",
            "  stop it with: nllflow server stop",
        ]
    else:
        if state is not None:
            _forget(state)
        lines.append("nllflow's Prefect server is not running (the next nllflow fit/run/compare starts one)")
    return lines, bool(configured or served or own)


# --- the supervisor ------------------------------------------------------------------------------


def supervise(port: int, minutes: float) -> int:
    """Run `prefect server start` (in this process group) and stop it once it has been idle for
    `minutes`: no command holds the use lock and the last use is older than that. Exits with the
    server, removing the state file if it still names this process."""
    folder = server_dir()
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    command += ["--no-ui", "--no-scheduler", "--no-late-runs", "--analytics-off"]
    server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    me = {"pid": os.getpid()}
    runner: list[subprocess.Popen] = []

    def finish(*_: object) -> None:
        for process in [*runner, server]:
            process.terminate()
        for process in [*runner, server]:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _forget(me)
        sys.exit(0)

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    check = min(CHECK_SECONDS, max(0.5, minutes * 6))
    print(f"supervisor {os.getpid()}: Prefect server on port {port}, stops after {minutes:g} min idle", flush=True)
    if os.environ.get(WARM_ENV, "1") != "0":
        # after the server answers and the command that started it is done with it: the runner's
        # imports (seconds of CPU) would slow the start and the first command, which wait for them
        health = f"http://{HOST}:{port}/api/health"
        while server.poll() is None and not healthy(health):
            time.sleep(POLL_SECONDS)
        with open(folder / "use.lock", "a") as handle:  # (or a long sweep: 30 s at most)
            _unused_within(handle, RUNNER_WAIT_SECONDS)
        runner.append(
            subprocess.Popen([sys.executable, "-m", "nllflow.flows.runner"], env=os.environ, stdin=subprocess.DEVNULL)
        )
    while server.poll() is None:
        time.sleep(check)
        last = folder / "last-used"
        if last.exists() and time.time() - last.stat().st_mtime < minutes * 60:
            continue
        handle, figures = open(folder / "use.lock", "a"), open(figures_lock(), "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(figures, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a command is using the server, or its figures are being rendered
            handle.close()
            figures.close()
            continue
        with handle, figures:
            if not last.exists() or time.time() - last.stat().st_mtime >= minutes * 60:
                print(f"supervisor {os.getpid()}: idle for {minutes:g} min, stopping", flush=True)
                finish()
    print(f"supervisor {os.getpid()}: the Prefect server exited with code {server.returncode}", flush=True)
    for process in runner:
        process.terminate()
    _forget(me)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nllflow.flows.server", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("supervise", help="run the server and stop it when idle (started by nllflow)")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--idle-minutes", type=float, default=DEFAULT_IDLE_MINUTES)
    args = parser.parse_args(argv)
    return supervise(args.port, args.idle_minutes)


if __name__ == "__main__":
    sys.exit(main())
