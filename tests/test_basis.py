"""Fourier-Bessel basis (theory section 2)."""
import math

import numpy as np
import pytest
from scipy import integrate, special

from numbaem.model.basis import FBBasis, expand, fourier_grid, resize_theta, synthesize
from numbaem.runtime.errors import NumbaemError


def test_nyquist_counts_test_vectors():
    b = FBBasis(7, 4)
    assert b.S == (2, 2, 2, 1, 1) and b.M == 34
    b = FBBasis(11, 6)
    assert b.S == (4, 4, 4, 3, 3, 2, 2) and b.M == 132
    assert FBBasis(11, 10).M == 219  # the paper's L = 11, lmax = 10


def test_tie_excluded():
    """u_{0,R} = pi R equals 2 pi c R exactly and must not count."""
    for L in (7, 11, 15):
        assert FBBasis(L, 0).S[0] == L // 2 - 1 + 0  # zeros pi, 2 pi, ... below pi R: R - 1


def test_radial_normalisation():
    b = FBBasis(11, 3)
    for i, (l, s) in enumerate(b.ls_pairs):
        val, _ = integrate.quad(lambda k: b.radial(np.array([k]))[i, 0] ** 2 * k * k, 0, 0.5, limit=200)
        assert abs(val - 1) < 1e-10
    # zero beyond c and at the zeros
    assert np.all(b.radial(np.array([0.6, 0.7])) == 0)


def test_U_is_unitary_and_real_volume(rng):
    b = FBBasis(7, 4)
    c1, w1, c2, w2 = b.U_map
    U = np.zeros((b.M, b.M), complex)
    for r in range(b.M):
        U[c1[r], r] += w1[r]
        U[c2[r], r] += w2[r]
    np.testing.assert_allclose(U.conj().T @ U, np.eye(b.M), atol=1e-15)
    theta = rng.standard_normal(b.M)
    x = b.to_complex(theta)
    np.testing.assert_allclose(x, U @ theta, atol=1e-15)
    np.testing.assert_allclose(b.to_real(x), theta, atol=1e-15)
    # reality condition x[l,-m,s] = (-1)^(l+m) conj(x[l,m,s])
    for l in range(b.lmax + 1):
        for m in range(-l, l + 1):
            for s in range(b.S[l]):
                i = b.offsets[l] + (m + l) * b.S[l] + s
                j = b.offsets[l] + (-m + l) * b.S[l] + s
                assert abs(x[j] - (-1) ** (l + m) * np.conj(x[i])) < 1e-15
    # hence F is Hermitian on the grid and the synthesised volume real
    F = fourier_grid(theta, b)
    np.testing.assert_allclose(F[::-1, ::-1, ::-1], np.conj(F), atol=1e-14)


@pytest.mark.parametrize("L,lmax", [(7, 4), (11, 6), (9, 5)])
def test_expand_synthesize_round_trip(rng, L, lmax):
    b = FBBasis(L, lmax)
    theta = rng.standard_normal(b.M)
    vol = synthesize(theta, b)
    th2 = expand(vol, b)
    np.testing.assert_allclose(th2, theta, atol=1e-13 * np.abs(theta).max())
    np.testing.assert_allclose(synthesize(th2, b), vol, atol=1e-13 * np.abs(vol).max())


def test_synthesis_matches_definition(rng):
    """f = fftshift(ifftn(ifftshift(F_grid))).real with F evaluated by scipy's Y_l^m directly."""
    b = FBBasis(7, 2)
    theta = rng.standard_normal(b.M)
    x = b.to_complex(theta)
    L, R = 7, 3
    f = (np.arange(L) - R) / L
    F = np.zeros((L, L, L), complex)
    for i0 in range(L):
        for i1 in range(L):
            for i2 in range(L):
                k = np.array([f[i0], f[i1], f[i2]])
                kap = np.linalg.norm(k)
                if kap > 0.5:
                    continue
                pol = math.acos(k[2] / kap) if kap > 0 else 0.0
                az = math.atan2(k[1], k[0])
                rad = b.radial(np.array([kap]))[:, 0]
                val = 0
                for idx, (l, s) in enumerate(b.ls_pairs):
                    for m in range(-l, l + 1):
                        val += x[b.offsets[l] + (m + l) * b.S[l] + s - 1] * rad[idx] * special.sph_harm_y(l, m, pol, az)
                F[i0, i1, i2] = val
    ref = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(F))).real
    np.testing.assert_allclose(synthesize(theta, b), ref, atol=1e-14)


def test_resize_theta_prefix(rng):
    b2, b4 = FBBasis(9, 2), FBBasis(9, 4)
    t = rng.standard_normal(b4.M)
    assert np.array_equal(resize_theta(t, b4, b2), t[:b2.M])


@pytest.mark.parametrize("L,match", [(8, "even"), (1, "too small"), (7.5, "whole")])
def test_bad_L(L, match):
    with pytest.raises(NumbaemError, match=match):
        FBBasis(L, 1)


def test_bad_lmax_and_volume(rng):
    with pytest.raises(NumbaemError, match="lmax <= 5"):
        FBBasis(7, 6)
    b = FBBasis(7, 2)
    with pytest.raises(NumbaemError, match="downsample"):
        expand(np.zeros((9, 9, 9)), b)
    v = np.zeros((7, 7, 7))
    v[1, 2, 3] = np.inf
    with pytest.raises(NumbaemError, match="NaN or infinite"):
        expand(v, b)
