"""Where runs are recorded: nllflow's home, the MLflow tracking URI, a client on it, and whether a
tracking server answers (checked in one bounded request, before any flow starts)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import socket
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from nllflow.errors import InputError

# the process that created a run (MLflow tags; Prefect tags add a colon): a run still RUNNING after
# that process ended was abandoned
HOST_TAG, PID_TAG = "nllflow.host", "nllflow.pid"
CHECK_TIMEOUT_SECONDS = 5.0


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer (exit code 1 in the CLI: retry when it is up)."""


def nllflow_home() -> Path:
    """Where the embedded tracking store lives: $NLLFLOW_HOME, else ~/.local/share/nllflow."""
    configured = os.environ.get("NLLFLOW_HOME")
    home = Path(configured) if configured else Path.home() / ".local" / "share" / "nllflow"
    return home.expanduser().resolve()


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store in nllflow's home (never a stray ./mlflow.db)."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    home = nllflow_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith("sqlite:"):
        return None
    database = uri.split(":///", 1)[1] if ":///" in uri else ""
    return Path(database).resolve() if database and database != ":memory:" else None


_opened_stores: set[str] = set()
# the SQLAlchemy engines of this process's SQL stores: a forked child (a command's figure renderer)
# must open connections of its own, never use the parent's (SQLAlchemy's rule for fork)
_engines: weakref.WeakSet = weakref.WeakSet()


def _new_connections_in_a_child() -> None:
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_new_connections_in_a_child)


def _remember_engine(client):
    # (MLflow's store is not public API: a client without it has no engine to remember)
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    engine = getattr(store, "engine", None)
    if engine is not None:
        _engines.add(engine)
    return client


def open_client(uri: str):
    """An MlflowClient on `uri`. MLflow creates and migrates a SQLite store's schema when a process
    first opens it, and processes that do so at once crash each other ("table runs already exists"),
    so each process opens a SQLite store the first time under an exclusive lock on a file beside it."""
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    if path is None or uri in _opened_stores:
        return _remember_engine(MlflowClient(uri))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the schema is created and migrated here
    _opened_stores.add(uri)
    return _remember_engine(client)


def _credentials_header() -> dict[str, str]:
    """The HTTP authorisation MLflow's own client would send, from the same settings."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def check_tracking(uri: str | None = None) -> None:
    """Fail fast, in one line, when a tracking server does not answer (TrackingUnavailable) or
    refuses this client's credentials (InputError: a setting to fix). An embedded SQLite store
    always answers. One request with its own timeout: MLflow's defaults (7 retries, 120 s) make an
    unreachable server look like a hang of minutes."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    request = urllib.request.Request(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1", headers=_credentials_header()
    )
    try:
        with urllib.request.urlopen(request, timeout=CHECK_TIMEOUT_SECONDS) as response:
            json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            given = "were refused" if _credentials_header() else "are not set"
            raise InputError(
                f"MLflow tracking server {uri} requires credentials, which {given}: set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (python -m nllflow.flows.serve env --secrets prints them)"
            ) from None
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} answered HTTP {error.code}; is it an MLflow server?"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is not reachable ({reason}); start it or point "
            "MLFLOW_TRACKING_URI at a running one"
        ) from None


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def owner_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def ui_command(uri: str | None = None, experiment_id: str | None = None) -> str:
    """How to look at the runs: the MLflow UI, opened on the runs list ("Model training" view)."""
    uri = uri or tracking_uri()
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning" if experiment_id else ""
    if uri.startswith("http"):
        return f"open {uri.rstrip('/')}/{page} in a browser"
    return (
        f".venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, "
        f"then open http://127.0.0.1:5000/{page}"
    )
