"""The warm runner: one process beside nllflow's background Prefect server that has imported the
flows (Prefect, MLflow, torch, scipy, matplotlib: several seconds a command, most of its time)
once, and forks a child per `nllflow fit|run|compare|predict`.

The command connects to its Unix socket (`$NLLFLOW_HOME/server/runner.sock`, mode 0600; a peer of
another user is refused), hands over its argv, working directory, environment and its standard
input, output and error (the file descriptors themselves), and waits for the exit status; Ctrl-C
and SIGTERM are passed on to the child. The child runs the same `nllflow.flows.cli` code as a
command in its own process would, in the command's directory and environment.

A command is served only by a runner with its own fingerprint: the same interpreter, the same
nllflow sources (their modification times) and the same environment where libraries read it at
import (PREFECT_*, but PREFECT_API_URL, which the command resolves itself, and a server's
PREFECT_SERVER_*; MLFLOW_*, NLLFLOW_*,
thread and matplotlib settings, HOME, TMPDIR). Any other command, or any command with
`NLLFLOW_WARM=0`, runs in its own process as before. The runner is started by the server's
supervisor once the server answers, lives in its process group (`nllflow server stop` and the idle
stop end it) and exits when the supervisor is gone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

WARM_ENV = "NLLFLOW_WARM"
COMMANDS = frozenset({"fit", "run", "compare", "predict"})
_ENV_PREFIXES = ("PREFECT_", "MLFLOW_", "NLLFLOW_", "OMP_", "MKL_", "OPENBLAS_", "TORCH", "CUDA", "MPL", "PYTHON")
_ENV_NAMES = ("HOME", "TMPDIR")
# the server a command uses, which it resolves itself, and the settings of a Prefect server (not a client's)
_NOT_READ_AT_IMPORT = ("PREFECT_API_URL", "PREFECT_SERVER_")
# Linux's limit for a Unix socket's path (108 bytes with the terminating NUL)
_MAX_SOCKET_PATH = 107
# what the modules a command needs import, done once in the runner
_WARM_MODULES = (
    "nllflow.api",
    "nllflow.report",
    "nllflow.flows.fit",
    "nllflow.flows.sweep",
    "nllflow.flows.compare",
    "nllflow.tracking.recorder",
    "nllflow.tracking.models",
    "nllflow.evaluation.plots",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.artifact.local_artifact_repo",
    "scipy.stats",
    # the first torch.optim optimiser of a process imports torch._dynamo (over a second)
    "torch._dynamo",
)


def socket_path() -> Path:
    from nllflow.flows.server import server_dir

    return server_dir() / "runner.sock"


def state_path() -> Path:
    from nllflow.flows.server import server_dir

    return server_dir() / "runner.json"


def _source_stamp() -> int:
    """The newest modification time of nllflow's sources: an edited checkout gets a new runner."""
    import nllflow
    import nllflow.flows

    newest = 0
    for root in {*nllflow.__path__, *nllflow.flows.__path__}:
        for path in Path(root).rglob("*.py"):
            newest = max(newest, path.stat().st_mtime_ns)
    return newest


def fingerprint(environ: dict[str, str]) -> str:
    """What a runner and a command must share (see the module's docstring)."""
    read_at_import = sorted(
        (name, value)
        for name, value in environ.items()
        if (name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES) and not name.startswith(_NOT_READ_AT_IMPORT)
    )
    text = json.dumps([sys.executable, _source_stamp(), read_at_import])
    return hashlib.sha256(text.encode()).hexdigest()


def _send(connection: socket.socket, message: dict[str, Any]) -> None:
    connection.sendall(json.dumps(message).encode() + b"\n")


def _lines(connection: socket.socket):
    """The newline-terminated JSON messages of `connection` until it closes."""
    buffer = b""
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


# --- the command's side ----------------------------------------------------------------------------


def delegate(argv: Sequence[str]) -> int | None:
    """Run the command `argv` in the warm runner: its exit status, or None when no runner serves it
    (none running, another fingerprint, NLLFLOW_WARM=0, a command that does not need one)."""
    if os.environ.get(WARM_ENV, "1") == "0" or not argv or argv[0] not in COMMANDS:
        return None
    try:
        state = json.loads(state_path().read_text())
        path = socket_path()
        if state.get("fingerprint") != fingerprint(dict(os.environ)) or len(str(path)) > _MAX_SOCKET_PATH:
            return None
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(5)
        connection.connect(str(path))
    except (OSError, ValueError):
        return None
    with connection:
        request = {"argv": list(argv), "argv0": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ)}
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            payload = json.dumps(request).encode() + b"\n"
            socket.send_fds(connection, [payload], [0, 1, 2])
            connection.settimeout(None)
            messages = _lines(connection)
            first = next(messages, None)
        except (OSError, ValueError):
            return None
        if first is None or "declined" in first:
            return None
        child = first["pid"]
        forwarded: list[int] = []

        def forward(signum: int, _frame: object) -> None:
            forwarded.append(signum)
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        try:
            for message in messages:
                if "exit" in message:
                    return int(message["exit"])
        except (OSError, ValueError):
            pass
    if forwarded:  # the child ended by the signal passed on to it: the status a shell reports for that
        return 128 + forwarded[-1]
    print(f"nllflow: failed: the warm runner's process {child} ended without an exit status", file=sys.stderr)
    return 1


# --- the runner's side -----------------------------------------------------------------------------


def _peer_uid(connection: socket.socket) -> int:
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid


def _serve_one(connection: socket.socket, own_fingerprint: str) -> int:
    """In the forked child: take over the command's streams, directory and environment and run it."""
    if _peer_uid(connection) != os.getuid():
        return 2
    payload, fds, _flags, _address = socket.recv_fds(connection, 1 << 20, 3)
    while not payload.endswith(b"\n"):
        chunk = connection.recv(1 << 20)
        if not chunk:
            return 2
        payload += chunk
    request = json.loads(payload)
    if len(fds) != 3 or fingerprint(request["env"]) != own_fingerprint:
        _send(connection, {"declined": "another fingerprint"})
        return 0
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["argv0"], *request["argv"]]
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    import numpy

    numpy.random.seed()  # a process of its own would start from fresh entropy
    print(f"runner {os.getppid()}: child {os.getpid()}: nllflow {' '.join(request['argv'][:1])}", file=_log)
    _log.flush()
    _send(connection, {"pid": os.getpid()})
    from nllflow.flows.cli import plots_after_the_answer, run_in_process

    # the command has its answer and exit status before the figures are rendered (in this child,
    # its streams handed back; a failure goes to the server's log)
    with plots_after_the_answer(_log):
        try:
            code = run_in_process(request["argv"])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        _send(connection, {"exit": code})
        _release_streams(connection)
    return code


def _release_streams(connection: socket.socket) -> None:
    """Let go of the command's terminal and socket: the command has exited, this child goes on."""
    connection.close()
    streams_to_devnull()


def streams_to_devnull() -> None:
    """Standard input, output and error on /dev/null: a process that outlives its command holds no
    terminal or pipe that a caller reads to its end."""
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.close(null)


# the runner's own log (the server's log): the child's stderr is the command's
_log = sys.stderr


def serve(path: Path, state: Path) -> int:
    """Import what commands need, listen on `path`, fork a child per connection; exits when the
    supervisor that started it is gone."""
    import importlib

    own = fingerprint(dict(os.environ))  # (before the imports, some of which set variables)
    import matplotlib

    matplotlib.use("Agg")
    for module in _WARM_MODULES:
        importlib.import_module(module)
    global _log
    _log = os.fdopen(os.dup(2), "w")
    supervisor = os.getppid()
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_mask)
    listener.listen(16)
    listener.settimeout(5)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    temporary = state.with_suffix(".tmp")
    temporary.write_text(json.dumps({"pid": os.getpid(), "fingerprint": own, "socket": str(path)}))
    temporary.replace(state)
    print(f"runner {os.getpid()}: ready on {path}", file=_log, flush=True)
    try:
        while os.getppid() == supervisor:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            if os.fork() == 0:
                code = 1
                try:
                    listener.close()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    code = _serve_one(connection, own)
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            connection.close()
    finally:
        try:
            ours = json.loads(state.read_text()).get("pid") == os.getpid()
        except (OSError, ValueError):
            ours = False
        if ours:
            state.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nllflow.flows.runner", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return serve(socket_path(), state_path())


if __name__ == "__main__":
    sys.exit(main())
