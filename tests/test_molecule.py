"""The seeded synthetic molecule and its homologs."""
import numpy as np
import pytest

from numbaem.runtime.errors import NumbaemError
from numbaem.runtime.fourier import downsample
from numbaem.sim.molecule import synthetic_molecule

L = 41


def _corr(a, b):
    """Pearson correlation of two volumes."""
    a = a - a.mean()
    b = b - b.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def _radius(L):
    """Distance of each voxel from the origin at index L//2."""
    x = np.arange(L) - L // 2
    return np.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)


@pytest.fixture(scope="module")
def truth():
    return synthetic_molecule(L, rng=0)


def test_shape_range_and_determinism(truth):
    assert truth.shape == (L, L, L) and truth.dtype == np.float64
    assert truth.max() == pytest.approx(1.0)
    assert truth.min() >= 0.0
    np.testing.assert_array_equal(synthetic_molecule(L, rng=0), truth)


def test_seeds_differ(truth):
    other = synthetic_molecule(L, rng=1)
    assert _corr(truth, other) < 0.8


def test_support_inside_the_ball():
    r = _radius(L)
    for seed in range(4):
        vol = synthetic_molecule(L, rng=seed)
        assert vol[r > 0.45 * L].max() < 1e-3
        # ... and the molecule is not a speck: it fills a good part of radius 0.3 L.
        assert np.count_nonzero(vol > 0.1) > 1000


def test_asymmetric():
    for seed in range(4):
        vol = synthetic_molecule(L, rng=seed)
        flipped = vol[::-1, ::-1, ::-1]  # point reflection through index L//2
        assert _corr(vol, flipped) < 0.9
        for axis in range(3):
            assert _corr(vol, np.flip(vol, axis=axis)) < 0.9


def test_homolog_is_near_but_not_equal(truth):
    for seed in (1, 2, 3):
        homolog = synthetic_molecule(L, rng=seed, homolog_of=0)
        assert 0.8 < _corr(truth, homolog) < 0.99
    a = synthetic_molecule(L, rng=1, homolog_of=0)
    np.testing.assert_array_equal(a, synthetic_molecule(L, rng=1, homolog_of=0))
    assert _corr(a, synthetic_molecule(L, rng=2, homolog_of=0)) < 0.99
    # The homolog's seed is the perturbation's seed, not another molecule.
    assert _corr(a, synthetic_molecule(L, rng=1)) < 0.8


def test_homolog_strength_orders_the_distance(truth):
    corrs = [
        _corr(truth, synthetic_molecule(L, rng=1, homolog_of=0, homolog_strength=s))
        for s in (0.0, 0.1, 0.3)
    ]
    assert corrs[0] == pytest.approx(1.0, abs=1e-12)
    assert corrs[0] > corrs[1] > corrs[2]


def test_same_molecule_at_two_sizes():
    # Everything is drawn in units of L, so a larger grid samples the same density.
    fine = synthetic_molecule(61, rng=0)
    coarse = synthetic_molecule(31, rng=0)
    assert _corr(downsample(fine, 31), coarse) > 0.999


def test_validation():
    with pytest.raises(NumbaemError, match="L=40 is even; numbaem works with odd sizes, use L=41"):
        synthetic_molecule(40)
    with pytest.raises(NumbaemError, match="L=3"):
        synthetic_molecule(3)
    with pytest.raises(NumbaemError, match="L=41.0"):
        synthetic_molecule(41.0)
    with pytest.raises(NumbaemError, match="rng=-1"):
        synthetic_molecule(11, rng=-1)
    with pytest.raises(NumbaemError, match="n_atoms=0"):
        synthetic_molecule(11, n_atoms=0)
    with pytest.raises(NumbaemError, match="homolog_strength=-0.1"):
        synthetic_molecule(11, homolog_of=0, homolog_strength=-0.1)
