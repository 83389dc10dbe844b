"""The hierarchical Hopf grid (numbaem.model.hopf): HEALPix x in-plane, tree order, covering radii."""
import math

import numpy as np
import pytest

from numbaem.model import hopf
from numbaem.model.rotations import covering_radius, geodesic_distance, wigner_D
from numbaem.runtime.errors import NumbaemError


def ring_scheme_centres(nside):
    """HEALPix pixel centres in the ring scheme, straight from Gorski et al. (2005), eqs. 4-9."""
    out = []
    for i in range(1, 4 * nside):
        if i < nside:
            z, n, shift = 1 - i * i / (3 * nside * nside), 4 * i, 0.5
        elif i <= 3 * nside:
            z, n, shift = 4 / 3 - 2 * i / (3 * nside), 4 * nside, 0.5 * ((i - nside + 1) % 2)
        else:
            k = 4 * nside - i
            z, n, shift = k * k / (3 * nside * nside) - 1, 4 * k, 0.5
        out += [(math.acos(z), (j + shift) * 2 * math.pi / n) for j in range(n)]
    return np.array(out)


def unit_vectors(theta, phi):
    return np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=1)


@pytest.mark.parametrize("nside", [1, 2, 4, 8])
def test_nested_centres_are_the_ring_centres(nside):
    th, ph = hopf.healpix_nested_angles(nside, np.arange(12 * nside * nside))
    a = unit_vectors(th, ph)
    ring = ring_scheme_centres(nside)
    b = unit_vectors(ring[:, 0], ring[:, 1])
    dots = a @ b.T
    assert len(a) == len(b) == 12 * nside * nside
    np.testing.assert_allclose(dots.max(axis=1), 1.0, atol=1e-14)       # every nested centre is a ring centre
    assert len(np.unique(dots.argmax(axis=1))) == len(a)                # and no two are the same one


def test_tree_order_children_and_parents():
    for level in range(3):
        K = hopf.size(level)
        idx = np.arange(K)
        pix, psi = hopf.tree_to_cells(level, idx)
        assert np.array_equal(hopf.cells_to_tree(level, pix, psi), idx)
        assert len(set(zip(pix.tolist(), psi.tolist()))) == K
        ch = hopf.children(idx)
        assert np.array_equal(ch.ravel(), np.arange(hopf.size(level + 1)))   # the children tile the next level
        assert np.array_equal(hopf.parent(ch), np.repeat(idx[:, None], 8, axis=1))
        cpix, cpsi = hopf.tree_to_cells(level + 1, ch.ravel())
        # nested HEALPix: the children of pixel p are 4p .. 4p + 3; in-plane: 2i, 2i + 1
        assert np.array_equal(cpix // 4, np.repeat(pix, 8)) and np.array_equal(cpsi // 2, np.repeat(psi, 8))
    assert hopf.size(0) == 72 and hopf.size(3) == 72 * 512


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_children_lie_near_their_parent(level):
    """Every child is closer to its parent than 0.75 of the parent level's step (measured
    0.48, 0.61, 0.67, 0.70): the coarse-to-fine search relies on a parent standing for
    its children. Without the per-face fibre coordinate, polar children lie up to 1.75
    steps away (29.5 degrees at level 1)."""
    K = hopf.size(level)
    sel = np.arange(K) if K <= 5000 else np.random.default_rng(level).choice(K, 5000, replace=False)
    Rp = hopf.rotations(level, sel)
    Rc = hopf.rotations(level + 1, hopf.children(sel).ravel()).reshape(len(sel), 8, 3, 3)
    d = np.degrees(geodesic_distance(Rp[:, None], Rc))
    assert d.max() < 0.75 * hopf.level_step(level)


def test_rotations_are_proper_and_match_euler_angles():
    from scipy.spatial.transform import Rotation
    R = hopf.rotations(1)
    np.testing.assert_allclose(np.einsum("kij,kil->kjl", R, R), np.broadcast_to(np.eye(3), R.shape), atol=1e-14)
    assert np.all(np.linalg.det(R) > 0)
    a = hopf.euler_angles(1)
    np.testing.assert_allclose(Rotation.from_euler("ZYZ", a).as_matrix(), R, atol=1e-14)


def test_covering_radius_halves_per_level():
    """Covering radius (theory section 8) below one step per level and halving: measured
    56.3, 27.9, 13.9, 6.95 degrees at levels 0-3 (steps 60, 30, 15, 7.5)."""
    radii = [math.degrees(covering_radius(hopf.rotations(r), n_probe=6000, refine=6)) for r in range(3)]
    for r, rad in enumerate(radii):
        assert rad < hopf.level_step(r)
    assert 0.45 < radii[2] / radii[1] < 0.55 and 0.4 < radii[1] / radii[0] < 0.6


def test_grid_integrates_wigner_matrices_like_haar():
    """Equal-volume cells: the grid mean of D^l(w) (whose Haar mean is 0 for l >= 1)
    is small and falls with the level."""
    err = []
    for level in (1, 2):
        D = wigner_D(4, hopf.rotations(level))
        err.append(max(np.abs(D[:, l].mean(axis=0)).max() for l in range(1, 5)))
    assert err[0] < 0.05 and err[1] < err[0] / 2


def test_neighbours_match_brute_force(rng):
    idx = rng.choice(hopf.size(1), 5, replace=False)
    got = hopf.neighbours(1, idx, 40.0)
    d = np.degrees(geodesic_distance(hopf.rotations(1)[:, None], hopf.rotations(1, idx)[None]))
    assert np.array_equal(got, np.nonzero(d.min(axis=1) <= 40.0)[0])
    assert set(idx) <= set(got)


def test_levels_and_steps():
    assert [hopf.level_step(r) for r in range(4)] == [60.0, 30.0, 15.0, 7.5]
    assert hopf.level_for_step(7.5) == 3 and hopf.level_for_step(8) == 3 and hopf.level_for_step(100) == 0
    for bad in (-1, 1.5, hopf.MAX_LEVEL + 1):
        with pytest.raises(NumbaemError, match="level"):
            hopf.size(bad)
    with pytest.raises(NumbaemError, match="finer"):
        hopf.level_for_step(0.1)
