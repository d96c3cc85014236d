"""Fixtures shared by the test modules: a seeded generator, the real data sets, and real Prefect (one
session-scoped test harness, started only by the tests that ask for it) with real MLflow (a SQLite
store in a temporary directory). Family fixture tables live in family_table.py."""

from __future__ import annotations

import os
from pathlib import Path

# `make test` runs two test processes on the machine's cores (pytest-xdist): one intra-op thread
# each, for them and the processes they start. torch's OpenMP threads wait for each other at every
# operation, and on a machine busier than its cores small operations get many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# torch's first call in a process is slow: no per-example deadline, and a fixed example budget
settings.register_profile("nllflow", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
# a longer search on demand: pytest --hypothesis-profile=thorough
settings.register_profile("thorough", parent=settings.get_profile("nllflow"), max_examples=2000)
settings.load_profile("nllflow")

# the repository's sibling `shared/` folder (CI checks it out at the same relative place)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded NumPy generator per test: the one source of randomness for test data."""
    return np.random.default_rng(20250130)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets in ../shared/data; the test is skipped where they are not checked out."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tracking_home(tmp_path_factory):
    """nllflow's home and MLflow store for the session, set before any flow runs."""
    home = tmp_path_factory.mktemp("nllflow-home")
    saved = {k: os.environ.get(k) for k in ("NLLFLOW_HOME", "MLFLOW_TRACKING_URI", "NLLFLOW_WARM")}
    os.environ["NLLFLOW_HOME"] = str(home)
    # a background server that a flow outside the harness starts here needs no warm runner (its
    # imports would load the 2 cores that the end-to-end tests time out on); test_server tests it
    os.environ["NLLFLOW_WARM"] = "0"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    yield home
    # a flow run outside the harness (the API's, the CLI's) started nllflow's background server
    # (and its warm runner) in this home: stopped by PID, its whole process group
    from nllflow.flows.server import stop

    stop()
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
    from nllflow.tracking.recorder import Tracker

    return Tracker()
