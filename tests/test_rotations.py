"""Rotations and Wigner D (theory section 8)."""
import math

import numpy as np
import pytest
from scipy import special
from scipy.spatial.transform import Rotation

from numbaem.runtime.errors import NumbaemError
from numbaem.model.rotations import (covering_radius, euler_zyz, geodesic_distance, random_rotations, rotation_grid,
                               wigner_D, wigner_d)

import naive


def test_small_d_matches_factorial_sum():
    lmax = 8
    for beta in (0.0, 0.3, 1.7, math.pi):
        d = wigner_d(lmax, beta)
        for l in range(lmax + 1):
            for N in range(-l, l + 1):
                for m in range(-l, l + 1):
                    assert abs(d[l, lmax + N, lmax + m] - naive.wigner_small_d(l, N, m, beta)) < 1e-13
    assert abs(wigner_d(1, 0.4)[1, 2, 1] + math.sin(0.4) / math.sqrt(2)) < 1e-15  # d^1_{1,0}


@pytest.mark.parametrize("lmax", [20, 32])
def test_wigner_D_unitary_and_group_law(rng, lmax):
    R = random_rotations(2, rng)
    D = wigner_D(lmax, np.stack([R[0], R[1], R[0] @ R[1]]))
    for l in range(lmax + 1):
        sl = slice(lmax - l, lmax + l + 1)
        A, B, C = D[0, l][sl, sl], D[1, l][sl, sl], D[2, l][sl, sl]
        np.testing.assert_allclose(A @ A.conj().T, np.eye(2 * l + 1), atol=1e-12)
        np.testing.assert_allclose(C, A @ B, atol=1e-12)


def test_wigner_D_rotates_spherical_harmonics(rng):
    """Y_l^m(w^T r) = sum_N D^l_{N,m}(w) Y_l^N(r)."""
    w = random_rotations(1, rng)[0]
    lmax = 5
    D = wigner_D(lmax, w[None])[0]
    r = rng.standard_normal((7, 3))
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    rr = r @ w  # rows w^T r
    ang = lambda v: (np.arccos(v[:, 2]), np.arctan2(v[:, 1], v[:, 0]))  # noqa: E731
    for l in range(lmax + 1):
        for m in range(-l, l + 1):
            lhs = special.sph_harm_y(l, m, *ang(rr))
            rhs = sum(D[l, lmax + N, lmax + m] * special.sph_harm_y(l, N, *ang(r)) for N in range(-l, l + 1))
            np.testing.assert_allclose(lhs, rhs, atol=1e-12)


def test_euler_matches_scipy_and_edge_cases(rng):
    R = random_rotations(50, rng)
    np.testing.assert_allclose(euler_zyz(R), Rotation.from_matrix(R).as_euler("ZYZ"), atol=1e-12)
    for beta in (0.0, math.pi):
        w = Rotation.from_euler("ZYZ", [0.7, beta, 0.2]).as_matrix()
        a = euler_zyz(w[None])[0]
        np.testing.assert_allclose(Rotation.from_euler("ZYZ", a).as_matrix(), w, atol=1e-12)


def test_random_rotations_are_haar(rng):
    R = random_rotations(20000, rng)
    np.testing.assert_allclose(np.einsum("kij,kil->kjl", R, R), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    assert np.all(np.linalg.det(R) > 0)
    # Haar: the rotation angle has density (1 - cos t)/pi, mean pi/2 + 2/pi
    t = geodesic_distance(R, np.eye(3))
    assert abs(t.mean() - (math.pi / 2 + 2 / math.pi)) < 4 * t.std() / math.sqrt(len(t))
    # seeded
    assert np.array_equal(random_rotations(3, np.random.default_rng(5)), random_rotations(3, np.random.default_rng(5)))


def test_grid_deterministic_and_covering_radius_shrinks():
    g = rotation_grid(300)
    assert np.array_equal(g, rotation_grid(300))
    radii = [covering_radius(rotation_grid(K), n_probe=4000, refine=8) for K in (100, 800)]
    # a near-uniform grid covers SO(3) with radius ~ K^(-1/3): 8x the points, about half the radius
    assert 0.35 < radii[1] / radii[0] < 0.65
    with pytest.raises(NumbaemError, match="positive whole"):
        rotation_grid(0)
