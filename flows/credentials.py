"""Credentials of the deployment stack (`serve start --auth`): one file under nllflow's home, mode
0600, generated on the first authenticated start and reused afterwards.

The Prefect server gets an auth string (PREFECT_SERVER_API_AUTH_STRING; clients send it as
PREFECT_API_AUTH_STRING), the MLflow server runs its basic-auth app with one admin user (clients
send MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) and no permission for anyone else.
Secrets travel only in environment variables of processes and this file: never in arguments (which
`ps` shows), job variables (which Prefect stores and shows), MLflow params or logs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

MLFLOW_USER = "nllflow"
SECRET_SETTINGS = ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD")
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class Credentials:
    prefect_auth_string: str  # user:password, as Prefect's basic auth takes it
    mlflow_username: str
    mlflow_password: str
    flask_secret_key: str  # signs the MLflow auth app's forms (CSRF), the same in every server worker

    def client_env(self) -> dict[str, str]:
        """What a client (the CLI, a worker, a flow run) needs in its environment."""
        return {
            "PREFECT_API_AUTH_STRING": self.prefect_auth_string,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_username,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
        }


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to any address
        return False


def _write_private(path: Path, text: str) -> None:
    """`text` into `path`, readable by its owner only from its first byte on."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as sink:
        sink.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def load(folder: Path) -> Credentials | None:
    path = folder / "credentials.json"
    return Credentials(**json.loads(path.read_text())) if path.is_file() else None


def load_or_create(folder: Path) -> tuple[Credentials, bool]:
    """The stack's credentials in `folder`, created when there are none (True: just created). New
    credentials also start a new MLflow user store: the admin password is set only when MLflow
    creates its admin user."""
    current = load(folder)
    if current is not None:
        return current, False
    created = Credentials(
        prefect_auth_string=f"nllflow:{secrets.token_urlsafe(24)}",
        mlflow_username=MLFLOW_USER,
        mlflow_password=secrets.token_urlsafe(24),
        flask_secret_key=secrets.token_urlsafe(32),
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mlflow-auth.db").unlink(missing_ok=True)
    _write_private(folder / "credentials.json", json.dumps(asdict(created), indent=2))
    return created, True


def mlflow_server_env(credentials: Credentials, folder: Path) -> dict[str, str]:
    """The environment of `mlflow server --app-name basic-auth`: its configuration file (written
    here: users in a SQLite file of `folder`, no permission unless granted) and its secrets."""
    config = folder / "mlflow-auth.ini"
    _write_private(
        config,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{(folder / 'mlflow-auth.db').resolve()}\n"
        f"admin_username = {credentials.mlflow_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # a checked password is trusted for a minute: else every request of a fit's recording
        # pays a PBKDF2 hash (one user, whose password nllflow never changes under a server)
        "auth_cache_ttl_seconds = 60\n",
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.mlflow_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials.flask_secret_key,
    }


def prefect_server_env(credentials: Credentials) -> dict[str, str]:
    return {"PREFECT_SERVER_API_AUTH_STRING": credentials.prefect_auth_string}
