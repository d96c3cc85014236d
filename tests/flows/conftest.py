"""Real Prefect (one session-scoped test harness) and real MLflow (a SQLite store in a temporary
directory) for the flow and CLI tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tracking_home(tmp_path_factory):
    """nllflow's home and MLflow store for the session, set before any flow runs."""
    home = tmp_path_factory.mktemp("nllflow-home")
    saved = {k: os.environ.get(k) for k in ("NLLFLOW_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["NLLFLOW_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def prefect_harness(tracking_home):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tracker(prefect_harness):
    from tasks.recording import Tracker

    return Tracker()
