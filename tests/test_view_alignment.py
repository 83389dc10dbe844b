"""Viewing directions through an alignment, reflected or not (numbaem.analysis.align).

Brute force: an estimate that is a rotated, or a rotated and mirrored (``x -> -x``), copy
of a reference is projected at known rotations; the reference's rotation that gives the
same image is found by searching the whole sphere of viewing directions and the in-plane
angle (then refined by least squares), comparing images numerically. Its viewing
direction must be the one :func:`estimate_directions` / :func:`reference_rotations` give,
and the obvious wrong maps (the antipode, ``w^T`` for ``w``, the mirrored direction) must
not reproduce the image.
"""
import numpy as np
import pytest
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from numbaem.analysis.align import (align, align_to_reference, estimate_directions, reference_rotations,
                                    rotate_coefficients)
from numbaem.model.basis import FBBasis, expand, synthesize
from numbaem.model.projection import project
from numbaem.model.rotations import random_rotations
from numbaem.sim.projectors import project_real_space
from numbaem.sim.views import rotations_viewing

MIRROR_X = np.diag([-1.0, 1.0, 1.0])


def _fibonacci_sphere(n):
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = np.pi * (1 + 5 ** 0.5) * i
    s = np.sqrt(1 - z * z)
    return np.stack([s * np.cos(phi), s * np.sin(phi), z], axis=1)


def _search_grid(n_dirs=600, n_psi=60):
    """Rotations covering SO(3): every direction of a Fibonacci sphere (spacing about 8.3
    degrees at 600) times every in-plane angle (6 degrees at 60)."""
    v = np.repeat(_fibonacci_sphere(n_dirs), n_psi, axis=0)
    psi = np.tile(2 * np.pi * np.arange(n_psi) / n_psi, n_dirs)
    return rotations_viewing(v, psi)


def _images(theta, basis, rots, chunk=1000):
    return np.concatenate([project(theta, basis, rots[i:i + chunk]).reshape(-1, basis.L ** 2)
                           for i in range(0, len(rots), chunk)])


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _best_over_psi(img, theta, basis, v, n_psi=720):
    """Smallest relative misfit of ``img`` by the projections of ``theta`` seen along ``v``
    (any in-plane angle, 0.5 degree steps)."""
    rots = rotations_viewing(np.tile(v, (n_psi, 1)), 2 * np.pi * np.arange(n_psi) / n_psi)
    ims = _images(theta, basis, rots)
    return float(np.min(np.linalg.norm(ims - img.ravel(), axis=1)) / np.linalg.norm(img))


def _find_rotation(img, theta, basis, grid, grid_images):
    """The rotation whose projection of ``theta`` matches ``img`` best: the best of the
    grid, refined by least squares on SO(3) (rotation vector about it)."""
    k = int(np.argmin(np.linalg.norm(grid_images - img.ravel(), axis=1)))
    start = grid[k]

    def resid(x):
        rot = Rotation.from_rotvec(x).as_matrix() @ start
        return project(theta, basis, rot[None])[0].ravel() - img.ravel()

    fit = least_squares(resid, np.zeros(3), xtol=1e-14, ftol=1e-14, gtol=1e-14)
    rot = Rotation.from_rotvec(fit.x).as_matrix() @ start
    return rot, _rel(project(theta, basis, rot[None])[0], img)


def _angle(a, b):
    return float(np.arccos(np.clip(np.dot(a, b), -1.0, 1.0)))


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(20261201)
    basis = FBBasis(9, FBBasis.max_lmax(9))
    ref = rng.standard_normal(basis.M)
    grid = _search_grid()
    return rng, basis, ref, grid, _images(ref, basis, grid)


@pytest.mark.parametrize("mirrored", [False, True])
def test_estimate_directions_match_the_projections_brute_force(setup, mirrored):
    rng, basis, ref, grid, grid_images = setup
    R0 = random_rotations(1, rng)[0]
    est = rotate_coefficients(ref, basis, R0)
    if mirrored:            # the estimate is the mirror image x -> -x of a rotated reference, made on voxels
        est = expand(synthesize(est, basis)[::-1], basis)
    pair = align(est, ref, basis)
    assert pair.reflected is mirrored and pair.correlation > 1 - 1e-9
    w = pair.rotation
    for Q in random_rotations(4, rng):
        img = project(est, basis, Q[None])[0]
        v_est = Q[2]                                           # Q^T e_z
        # the mapped rotation reproduces the image exactly
        Qr = reference_rotations(Q, w, pair.reflected)
        assert _rel(project(ref, basis, Qr[None])[0], img) < 1e-9
        # a search over all of SO(3), with no formula, finds a rotation of the reference
        # that reproduces the image; its viewing direction is w v, which estimate_directions inverts
        found, misfit = _find_rotation(img, ref, basis, grid, grid_images)
        assert misfit < 1e-7
        v_ref = found[2]
        assert _angle(v_ref, w @ v_est) < 1e-5
        assert _angle(estimate_directions(v_ref[None], w, pair.reflected)[0], v_est) < 1e-5
        # the wrong maps do not reproduce the image at any in-plane angle
        right = _best_over_psi(img, ref, basis, w @ v_est)
        assert right < 0.02                                    # the 0.5 degree step of psi
        for wrong in (-(w @ v_est), w.T @ v_est, MIRROR_X @ (w @ v_est), v_est):
            if _angle(wrong, w @ v_est) > 0.3:
                assert _best_over_psi(img, ref, basis, wrong) > 10 * right + 0.1


def test_simulated_particles_are_seen_along_the_mapped_directions(setup):
    """The chain the example measures: particles of a voxel map projected by the simulator's
    real-space projector (rotation W, direction W^T e_z), an estimate that is the mirror image of a
    rotated copy, aligned by align_to_reference as compare_to_truth does; the rotation of
    the estimate whose Fourier-Bessel projection best matches each particle (searched over
    SO(3)) is seen along estimate_directions(W^T e_z)."""
    rng, basis, _, grid, _ = setup
    n = basis.L
    c = np.arange(n) - n // 2
    X, Y, Z = np.meshgrid(c, c, c, indexing="ij")
    truth = np.zeros((n, n, n))       # smooth, asymmetric blobs (near the basis's band limit)
    for a, b, d, amp in [(2, 0.5, 0, 1.0), (-1, 1.5, 0.5, 0.7), (0, -1.5, -1, 0.5), (0.5, 0, 1.5, 0.8)]:
        truth += amp * np.exp(-((X - a) ** 2 + (Y - b) ** 2 + (Z - d) ** 2) / (2 * 1.3 ** 2))
    R0 = random_rotations(1, rng)[0]
    est = expand(synthesize(rotate_coefficients(expand(truth, basis), basis, R0), basis)[::-1], basis)
    pair = align_to_reference(est, basis, truth)
    assert pair.reflected and pair.correlation > 0.99
    est_images = _images(est, basis, grid)
    for W in random_rotations(4, rng):
        particle = project_real_space(truth, W[None], oversample=2)[0]
        Q, misfit = _find_rotation(particle, est, basis, grid, est_images)
        assert misfit < 0.2         # measured 0.12-0.13: the basis's band limit and ball against the spline map
        v_mapped = estimate_directions(W[2][None], pair.rotation, pair.reflected)[0]
        assert _angle(Q[2], v_mapped) < np.radians(10)          # measured 2.7-5.8 degrees
        for wrong in (-v_mapped, pair.rotation @ W[2], MIRROR_X @ v_mapped, W[2]):
            if _angle(wrong, v_mapped) > np.radians(40):
                assert _angle(Q[2], wrong) > np.radians(30)
