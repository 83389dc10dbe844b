"""Shared fixtures."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI runs (numbaem.threads); before any kernel

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    """A seeded generator: every test that needs random data takes this."""
    return np.random.default_rng(1234)
