"""FSC, resolution, relative error (MODEL section 9), and the numbaem fsc command."""
import math

import numpy as np
import pytest

from numbaem.runtime.errors import NumbaemError
from numbaem.analysis.fsc import fsc, relative_error, resolution, resolution_angstrom, shell_indices

# float64 FFTs of O(1) volumes at these sizes: round-off ~1e-15 relative per shell.
TOL = 1e-12


def _fsc_by_definition(v1, v2):
    """FSC straight from the DFT sum and loops over voxels (no fftshift, no bincount)."""
    L = v1.shape[0]
    R = L // 2
    t = np.arange(L) - R
    E = np.exp(-2j * np.pi * np.outer(t, t) / L)  # E[k, n]: frequency k - R, position n - R
    F1 = np.einsum("ai,bj,ck,ijk->abc", E, E, E, v1)
    F2 = np.einsum("ai,bj,ck,ijk->abc", E, E, E, v2)
    num = np.zeros(R + 1)
    e1 = np.zeros(R + 1)
    e2 = np.zeros(R + 1)
    for a in range(L):
        for b in range(L):
            for c in range(L):
                i = int(round(math.sqrt(t[a] ** 2 + t[b] ** 2 + t[c] ** 2)))
                if i <= R:
                    num[i] += (F1[a, b, c] * np.conj(F2[a, b, c])).real
                    e1[i] += abs(F1[a, b, c]) ** 2
                    e2[i] += abs(F2[a, b, c]) ** 2
    return num / np.sqrt(e1 * e2)


def test_shell_indices_counts():
    s = shell_indices(7)
    assert s.shape == (7, 7, 7)
    assert s[3, 3, 3] == 0
    counts = np.bincount(s.ravel())
    # shell 1: |n| in {1, sqrt2}: 6 + 12 voxels; shell 2: {sqrt3, 2, sqrt5, sqrt6}: 8 + 6 + 24 + 24.
    assert counts[0] == 1 and counts[1] == 18 and counts[2] == 62
    assert counts.sum() == 7 ** 3


def test_fsc_matches_definition(rng):
    for L in (5, 6):
        v1 = rng.standard_normal((L, L, L))
        v2 = v1 + rng.standard_normal((L, L, L))
        freq, curve = fsc(v1, v2)
        np.testing.assert_allclose(freq, np.arange(L // 2 + 1) / L)
        np.testing.assert_allclose(curve, _fsc_by_definition(v1, v2), atol=TOL)


def test_fsc_with_itself_and_scaled_copy_is_one(rng):
    v = rng.standard_normal((11, 11, 11))
    freq, curve = fsc(v, v)
    assert freq.shape == curve.shape == (6,)
    np.testing.assert_allclose(curve, 1.0, atol=TOL)
    np.testing.assert_allclose(fsc(v, 2.5 * v)[1], 1.0, atol=TOL)
    np.testing.assert_allclose(fsc(-v, v)[1], -1.0, atol=TOL)
    # scale invariance against a different volume too
    w = rng.standard_normal((11, 11, 11))
    np.testing.assert_allclose(fsc(v, 3.0 * w)[1], fsc(0.1 * v, w)[1], atol=TOL)


def test_fsc_of_independent_noise_is_near_zero(rng):
    # For independent white noise each shell's FSC has mean 0 and standard deviation
    # 1/sqrt(n_i) (n_i voxels; Hermitian symmetry pairs them, each pair contributes a
    # product of variance 2 over an energy of 2 n_i). Allow 4 standard deviations per shell.
    L = 31
    v1 = rng.standard_normal((L, L, L))
    v2 = rng.standard_normal((L, L, L))
    _, curve = fsc(v1, v2)
    n = np.bincount(shell_indices(L).ravel())[: L // 2 + 1]
    assert np.all(np.abs(curve[1:]) < 4 / np.sqrt(n[1:]))
    # and pooled over shells 1..R the normalised squares average to about 1
    chi = np.mean(n[1:] * curve[1:] ** 2)
    assert 0.4 < chi < 2.0


def test_fsc_zero_shells_are_nan(rng):
    v = rng.standard_normal((7, 7, 7))
    _, curve = fsc(v, np.zeros_like(v))
    assert np.all(np.isnan(curve))
    with pytest.raises(NumbaemError, match="NaN in every shell"):
        resolution(np.arange(4) / 7, curve)


def test_fsc_bad_input(rng):
    v = rng.standard_normal((7, 7, 7))
    with pytest.raises(NumbaemError, match="vol2 has shape"):
        fsc(v, v[:5, :5, :5])
    with pytest.raises(NumbaemError, match="vol1 has shape"):
        fsc(v[0], v)
    bad = v.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(NumbaemError, match="vol2 has NaN"):
        fsc(v, bad)
    with pytest.raises(NumbaemError, match="complex"):
        fsc(v + 0j, v)


def test_resolution_on_hand_made_curves():
    freq = np.arange(6) / 11
    # first crossing between shell 2 (0.7) and shell 3 (0.3): halfway
    assert resolution(freq, [1, 0.9, 0.7, 0.3, 0.2, 0.6]) == pytest.approx(2.5 / 11, abs=1e-15)
    # never below: the last shell
    assert resolution(freq, [1, 0.9, 0.8, 0.7, 0.6, 0.55]) == pytest.approx(5 / 11)
    # below at the first shell: its frequency
    assert resolution(freq, [0.2, 0.9, 0.8, 0.7, 0.6, 0.55]) == 0.0
    # exactly at the threshold is not below
    assert resolution(freq, [1, 0.5, 0.3, 0.3, 0.2, 0.1]) == pytest.approx(1 / 11)
    # another threshold
    assert resolution(freq, [1, 0.9, 0.7, 0.3, 0.2, 0.1], threshold=0.143) == pytest.approx(
        (4 + (0.2 - 0.143) / 0.1) / 11)
    # NaN shells carry no information and are skipped
    assert resolution(freq, [np.nan, 1, 0.8, np.nan, 0.2, 0.1]) == pytest.approx(3 / 11)
    with pytest.raises(NumbaemError, match="curve has shape"):
        resolution(freq, [1, 0.5])
    with pytest.raises(NumbaemError, match="threshold"):
        resolution(freq, np.ones(6), threshold="half")


def test_resolution_angstrom():
    assert resolution_angstrom(0.25, 2.0) == pytest.approx(8.0)
    assert resolution_angstrom(0.0, 2.0) == math.inf
    with pytest.raises(NumbaemError, match="pixel_size"):
        resolution_angstrom(0.25, 0.0)
    with pytest.raises(NumbaemError, match="freq_res"):
        resolution_angstrom(-0.1, 1.0)


def test_relative_error(rng):
    t = rng.standard_normal((7, 7, 7))
    assert relative_error(t, t) == 0.0
    assert relative_error(1.1 * t, t) == pytest.approx(0.1)
    assert relative_error(np.zeros_like(t), t) == pytest.approx(1.0)
    with pytest.raises(NumbaemError, match="truth is zero"):
        relative_error(t, np.zeros_like(t))
    with pytest.raises(NumbaemError, match="shape"):
        relative_error(t, t[0])
