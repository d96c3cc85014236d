"""`python -m nllflow.flows.serve env|status` answer without the numeric stack: printing where the
servers are imports neither torch, scipy, MLflow nor Prefect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", ["env", "status"])
def test_serve_reports_without_importing_the_numeric_stack(tmp_path, command):
    probe = (
        "import json, sys\n"
        "from nllflow.flows import serve\n"
        f"code = serve.main([{command!r}])\n"
        "print(json.dumps({'code': code, 'loaded': [m for m in ('torch', 'scipy', 'mlflow', 'prefect')"
        " if m in sys.modules]}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={"NLLFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 1, "loaded": []}, done.stderr
    assert "not running" in done.stderr


@pytest.mark.parametrize("host", ["10.1.2.3", "0.0.0.0", "::", "nllflow-server.example"])
def test_serving_beyond_loopback_without_credentials_is_refused_before_anything_starts(tmp_path, host):
    done = subprocess.run(
        [sys.executable, "-m", "nllflow.flows.serve", "start", "--host", host],
        capture_output=True,
        text=True,
        timeout=120,
        env={"NLLFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"serve: error: refusing to serve on {host} without authentication")
    assert "--auth" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "serve").exists()  # no state, no log: nothing was started


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("192.168.1.1", False),
        ("example.org", False),
    ],
)
def test_loopback_means_this_machine_only(host, loopback):
    from nllflow.flows.credentials import is_loopback

    assert is_loopback(host) is loopback


def test_credentials_are_generated_once_and_readable_by_their_owner_only(tmp_path):
    from nllflow.flows.credentials import load_or_create, mlflow_server_env

    first, created = load_or_create(tmp_path / "serve")
    again, created_again = load_or_create(tmp_path / "serve")
    assert (created, created_again) == (True, False) and again == first
    assert (tmp_path / "serve" / "credentials.json").stat().st_mode & 0o777 == 0o600
    user, _, password = first.prefect_auth_string.partition(":")
    assert user == "nllflow" and len(password) >= 24 and len(first.mlflow_password) >= 24
    env = mlflow_server_env(first, tmp_path / "serve")
    config = (tmp_path / "serve" / "mlflow-auth.ini").read_text()
    assert (tmp_path / "serve" / "mlflow-auth.ini").stat().st_mode & 0o777 == 0o600
    assert "default_permission = NO_PERMISSIONS" in config and first.mlflow_password not in config
    assert f"sqlite:///{tmp_path / 'serve' / 'mlflow-auth.db'}" in config  # absolute: any working directory
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "serve" / "mlflow-auth.ini")
