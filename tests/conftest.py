"""Core fixtures shared by the test modules. Family fixture tables live in family_table.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

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
