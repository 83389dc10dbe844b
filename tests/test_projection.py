"""The projection operator (theory sections 3 and 9)."""
import numpy as np
import pytest

from numbaem.model.basis import FBBasis
from numbaem.runtime.fourier import centered_ifft
from numbaem.model.projection import phi_images, projection_matrices, project
from numbaem.model.rotations import random_rotations
from numbaem.runtime.threads import use_threads

import naive


@pytest.mark.parametrize("L,lmax", [(7, 4), (11, 6), (15, 8)])
def test_projection_matches_direct_quadrature(rng, L, lmax):
    """Section 9 asks for 1e-6; the Hankel route reaches round-off (measured 1.2e-15, 5.7e-15,
    9.1e-15 at L = 7, 11, 15), so assert 1e-13: the margin covers the accumulation of
    round-off over the ~M (up to 132) columns and the quadrature of the twin, whose own
    error is below 1e-15 at these node counts; a wrong sign or axis gives O(1)."""
    b = FBBasis(L, lmax)
    theta = rng.standard_normal(b.M)
    rots = random_rotations(2, rng)
    A = projection_matrices(b, rots)
    for k in range(2):
        d = naive.direct_projection(theta, b, rots[k])
        p = (A[k] @ theta).reshape(L, L)
        assert np.linalg.norm(p - d) / np.linalg.norm(d) < 1e-13
        assert np.abs(d.imag).max() < 1e-12 * np.abs(d).max()  # A_w U is real


@pytest.mark.parametrize("L,lmax", [(7, 4), (11, 6), (15, 8)])
def test_consistency_with_fourier_rotated_volume(rng, L, lmax):
    """Section 9: the volume rotated in Fourier space, summed along axis 2, is the
    L-periodisation of p_w: relative error 0.05-0.09 (pass below 0.15); a transposed image fails."""
    b = FBBasis(L, lmax)
    theta = rng.standard_normal(b.M)
    w = random_rotations(1, rng)[0]
    k, flat = b.grid_frequencies
    F = np.zeros(L ** 3, complex)
    F[flat] = b.evaluate_fourier_real(k @ w) @ theta
    summed = centered_ifft(F.reshape(L, L, L)).real.sum(axis=2)
    p = project(theta, b, w[None])[0]
    err = np.linalg.norm(summed - p) / np.linalg.norm(p)
    assert err < 0.15
    assert np.linalg.norm(summed - p.T) / np.linalg.norm(p) > 0.5


def test_phi_quadrature_converged():
    b = FBBasis(7, 4)
    np.testing.assert_allclose(phi_images(b, n_quad=3 * 7 + 40), phi_images(b), atol=1e-13)


def test_in_plane_rotation_is_a_phase(rng):
    """A_{Rz(alpha) w}: each Phi_{l,s,N} times e^{-i N alpha}, i.e. the image turns by +alpha."""
    b = FBBasis(9, 4)
    theta = rng.standard_normal(b.M)
    w = random_rotations(1, rng)[0]
    # a quarter turn (alpha = pi/2) maps the pixel grid onto itself
    Rz = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    p0, p1 = project(theta, b, np.stack([w, Rz @ w]))
    # image turned by +90 degrees: value at x comes from Rz(-a) x
    np.testing.assert_allclose(p1, np.rot90(p0, k=1), atol=1e-12 * np.abs(p0).max())


def test_kernel_threads_identical(rng):
    b = FBBasis(11, 6)
    rots = random_rotations(9, rng)
    with use_threads(1):
        A1 = projection_matrices(b, rots)
    with use_threads(2):
        A2 = projection_matrices(b, rots)
    assert np.array_equal(A1, A2)


def test_kernel_against_numpy_twin(rng):
    """The numba assembly against a NumPy evaluation of sum_N D^l_{N,m} Phi_{l,s,N}, then U."""
    from numbaem.model.rotations import wigner_D
    b = FBBasis(7, 3)
    rots = random_rotations(3, rng)
    A = projection_matrices(b, rots)
    phi = phi_images(b)
    D = wigner_D(b.lmax, rots)
    lm = b.lmax
    for k in range(3):
        Ac = np.zeros((49, b.M), complex)
        for i, (l, s) in enumerate(b.ls_pairs):
            for m in range(-l, l + 1):
                col = b.offsets[l] + (m + l) * b.S[l] + s - 1
                Ac[:, col] = sum(D[k, l, lm + N, lm + m] * phi[i, lm + N] for N in range(-l, l + 1))
        np.testing.assert_allclose(A[k], b.complex_columns_to_real(Ac), atol=1e-13)


@pytest.mark.parametrize("threads", [1, 2])
def test_filter_images_equals_the_matrix_product(rng, threads):
    """The E-step's BLAS-free filter (``out[k] = Psi x[k]``) equals numpy's product to
    round-off on 1 and 2 threads; a transposed filter (the easy mistake) does not."""
    from numbaem.model.projection import filter_images
    P = 121
    x = rng.standard_normal((37, P))
    filt = rng.standard_normal((P, P))
    out = np.empty_like(x)
    with use_threads(threads):
        filter_images(x, np.ascontiguousarray(filt.T), out)
    ref = x @ filt.T
    assert np.abs(out - ref).max() < 1e-12 * np.abs(ref).max()
    wrong = x @ filt
    assert np.abs(out - wrong).max() > 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("L, lmax", [(7, 4), (11, 6)])
def test_steered_projections_equal_the_operator(rng, L, lmax):
    """Hopf-grid projections by in-plane phases (one set of images per viewing direction)
    equal A_w theta built per rotation, to round-off, on every level used."""
    from numbaem.model import hopf
    from numbaem.model.projection import project_hopf
    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M)
    for level in (0, 1, 2):
        idx = rng.choice(hopf.size(level), size=min(200, hopf.size(level)), replace=False)
        got = project_hopf(theta, basis, level, idx)
        ref = project(theta, basis, hopf.rotations(level, idx))
        assert np.abs(got - ref).max() < 1e-13 * np.abs(ref).max()
