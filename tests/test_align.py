"""Rotation and reflection of coefficients, and alignment on coefficients (MODEL section 8)."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from numbaem.analysis.align import (
    AlignResult,
    _generators,
    align,
    align_volumes,
    reflect_coefficients,
    rotate_coefficients,
)
from numbaem.model.basis import FBBasis, synthesize
from numbaem.runtime.errors import NumbaemError
from numbaem.model.rotations import random_rotations, wigner_D

# Coefficient maps are exact: 1e-12 relative leaves room for the Wigner-D round-off.
TOL = 1e-12


def _angle(r1, r2):
    """Geodesic angle between two rotations, accurate near 0 (unlike arccos of the trace)."""
    return Rotation.from_matrix(r1.T @ r2).magnitude()


@pytest.fixture(scope="module")
def basis11():
    return FBBasis(11, 6)


@pytest.mark.parametrize("L, lmax", [(7, 4), (11, 6)])
def test_rotation_matches_direct_fourier_evaluation(rng, L, lmax):
    # The rotated volume f(w^T r) has transform F(w^T k); evaluate F straight from the
    # basis at the rotated grid frequencies w^T k (rows: k @ w), no Wigner D.
    basis = FBBasis(L, lmax)
    k, _ = basis.grid_frequencies
    for rot in random_rotations(3, rng):
        theta = rng.standard_normal(basis.M)
        direct = basis.evaluate_fourier_real(k @ rot) @ theta
        via_D = basis.evaluate_fourier_real(k) @ rotate_coefficients(theta, basis, rot)
        np.testing.assert_allclose(via_D, direct, atol=TOL * np.abs(direct).max())


def test_reflection_matches_direct_fourier_evaluation(rng, basis11):
    k, _ = basis11.grid_frequencies
    theta = rng.standard_normal(basis11.M)
    direct = basis11.evaluate_fourier_real(-k) @ theta
    via = basis11.evaluate_fourier_real(k) @ reflect_coefficients(theta, basis11)
    np.testing.assert_allclose(via, direct, atol=TOL * np.abs(direct).max())
    np.testing.assert_array_equal(reflect_coefficients(reflect_coefficients(theta, basis11), basis11), theta)


def test_rotation_group_law_and_isometry(rng, basis11):
    theta = rng.standard_normal(basis11.M)
    R1, R2 = random_rotations(2, rng)
    twice = rotate_coefficients(rotate_coefficients(theta, basis11, R1), basis11, R2)
    once = rotate_coefficients(theta, basis11, R2 @ R1)
    np.testing.assert_allclose(twice, once, atol=TOL * np.linalg.norm(theta))
    np.testing.assert_allclose(np.linalg.norm(once), np.linalg.norm(theta), rtol=TOL)
    np.testing.assert_allclose(rotate_coefficients(theta, basis11, np.eye(3)), theta, atol=TOL)
    # reflection commutes with rotation
    np.testing.assert_allclose(
        reflect_coefficients(rotate_coefficients(theta, basis11, R1), basis11),
        rotate_coefficients(reflect_coefficients(theta, basis11), basis11, R1), atol=TOL * np.linalg.norm(theta))


def test_generators_match_finite_differences():
    # Central differences with step h: error ~ h^2 l^3 / 6, about 1e-8 at l = 6, h = 1e-5.
    lmax = 6
    G = _generators(lmax)
    h = 1e-5
    for a in range(3):
        e = np.zeros(3)
        e[a] = h
        Dp = wigner_D(lmax, Rotation.from_rotvec(e).as_matrix()[None])[0]
        Dm = wigner_D(lmax, Rotation.from_rotvec(-e).as_matrix()[None])[0]
        np.testing.assert_allclose((Dp - Dm) / (2 * h), G[a], atol=1e-7)


@pytest.mark.parametrize("reflected", [False, True])
def test_align_recovers_rotation_and_reflection(rng, basis11, reflected):
    # Newton on SO(3) converges to round-off, so much tighter than the 1e-6 / 1e-4 asked.
    theta = rng.standard_normal(basis11.M)
    rot = random_rotations(1, rng)[0]
    source = reflect_coefficients(theta, basis11) if reflected else theta
    ref = rotate_coefficients(source, basis11, rot)
    res = align(theta, ref, basis11)
    assert isinstance(res, AlignResult)
    assert res.reflected is reflected
    assert _angle(res.rotation, rot) < 1e-9
    assert np.linalg.norm(res.theta_aligned - ref) / np.linalg.norm(ref) < 1e-9
    assert res.correlation == pytest.approx(1.0, abs=1e-12)


def test_align_with_itself_is_identity(rng, basis11):
    theta = rng.standard_normal(basis11.M)
    res = align(theta, theta, basis11, rng=rng)  # a randomly turned coarse grid
    assert not res.reflected
    assert _angle(res.rotation, np.eye(3)) < 1e-9
    np.testing.assert_allclose(res.theta_aligned, theta, atol=1e-9 * np.linalg.norm(theta))


def test_align_with_noise_finds_nearby_rotation(rng, basis11):
    # 20% relative noise on the estimate: the maximiser moves by a few hundredths of a radian.
    theta = rng.standard_normal(basis11.M)
    rot = random_rotations(1, rng)[0]
    ref = rotate_coefficients(theta, basis11, rot)
    noisy = theta + 0.2 * rng.standard_normal(basis11.M)
    res = align(noisy, ref, basis11, n_coarse=2000)
    assert not res.reflected
    assert _angle(res.rotation, rot) < 0.05
    assert 0.9 < res.correlation < 1.0


def test_align_volumes(rng, basis11):
    theta = rng.standard_normal(basis11.M)
    rot = random_rotations(1, rng)[0]
    est = synthesize(theta, basis11)
    ref = synthesize(rotate_coefficients(reflect_coefficients(theta, basis11), basis11, rot), basis11)
    vol, res = align_volumes(est, ref, lmax=6)
    assert res.reflected and _angle(res.rotation, rot) < 1e-9
    np.testing.assert_allclose(vol, ref, atol=1e-9 * np.abs(ref).max())


def test_highest_l_and_default_lmax(rng):
    for L in (7, 11):
        top = FBBasis.max_lmax(L)
        FBBasis(L, top)
        with pytest.raises(NumbaemError, match="too high"):
            FBBasis(L, top + 1)
    basis = FBBasis(7, 5)
    theta = rng.standard_normal(basis.M)
    vol = synthesize(theta, basis)
    out, res = align_volumes(vol, vol, n_coarse=500)  # default lmax: 5 for L = 7
    assert res.theta_aligned.shape == (basis.M,)
    np.testing.assert_allclose(out, vol, atol=1e-9 * np.abs(vol).max())


def test_bad_input(rng, basis11):
    theta = rng.standard_normal(basis11.M)
    with pytest.raises(NumbaemError, match="rot is not a rotation"):
        rotate_coefficients(theta, basis11, np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(NumbaemError, match="rot has shape"):
        rotate_coefficients(theta, basis11, np.eye(2))
    with pytest.raises(NumbaemError, match="theta has shape"):
        rotate_coefficients(theta[:-1], basis11, np.eye(3))
    with pytest.raises(NumbaemError, match="FBBasis"):
        reflect_coefficients(theta, "basis")
    with pytest.raises(NumbaemError, match="n_coarse"):
        align(theta, theta, basis11, n_coarse=0)
    with pytest.raises(NumbaemError, match="zero"):
        align(theta, np.zeros_like(theta), basis11)
    with pytest.raises(NumbaemError, match="rng"):
        align(theta, theta, basis11, rng=3)
    with pytest.raises(NumbaemError, match="even"):
        align_volumes(np.zeros((6, 6, 6)), np.zeros((6, 6, 6)))
    with pytest.raises(NumbaemError, match="ref_vol has shape"):
        align_volumes(np.zeros((7, 7, 7)), np.zeros((9, 9, 9)))
    with pytest.raises(NumbaemError, match="lmax=6 is too high"):
        align_volumes(np.ones((7, 7, 7)), np.ones((7, 7, 7)), lmax=6)
