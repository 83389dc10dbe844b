"""Shared fixtures."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    """A seeded generator: every test that needs random data takes this."""
    return np.random.default_rng(1234)
