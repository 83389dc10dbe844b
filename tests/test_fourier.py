"""Centred DFT conventions and value-preserving Fourier-crop downsampling."""
import numpy as np
import pytest

from numbaem.runtime.errors import NumbaemError
from numbaem.runtime.fourier import (
    centered_fft,
    centered_ifft,
    downsample,
    downsample_image,
    frequency_grid,
)

# float64 FFTs of arrays with O(1) entries at these sizes: round-off ~1e-15; 1e-12
# leaves room for the n^d sums.
ATOL = 1e-12


def _positions(n):
    """Sample positions n - n//2 of an axis of length n (theory section 2)."""
    return np.arange(n) - n // 2


def _cosine(shape, k, phase, period):
    """cos(2 pi sum_a k_a x_a / period + phase) on the centred grid of ``shape``.

    ``period`` is measured in samples of that grid, so the same continuous function
    sampled at a coarser step ``N / M`` has ``period`` scaled by ``M / N``.
    """
    x = np.meshgrid(*[_positions(n) for n in shape], indexing="ij")
    arg = sum(ka * xa / pa for ka, xa, pa in zip(k, x, period))
    return np.cos(2 * np.pi * arg + phase)


def test_centered_fft_matches_the_definition(rng):
    # X[k] = sum_n x[n] exp(-2 pi i (k - R)(n - R) / L), for odd and even L.
    for L in (5, 6):
        x = rng.standard_normal(L) + 1j * rng.standard_normal(L)
        t = _positions(L)
        dft = np.exp(-2j * np.pi * np.outer(t, t) / L) @ x
        np.testing.assert_allclose(centered_fft(x), dft, atol=ATOL)


def test_centered_fft_of_centred_delta_is_flat():
    x = np.zeros((7, 7, 7))
    x[3, 3, 3] = 1.0
    np.testing.assert_allclose(centered_fft(x), np.ones((7, 7, 7)), atol=ATOL)


def test_centered_round_trip_and_axes(rng):
    x = rng.standard_normal((6, 7, 5))
    np.testing.assert_allclose(centered_ifft(centered_fft(x)), x, atol=ATOL)
    X = centered_fft(x, axes=(1, 2))
    np.testing.assert_allclose(X[2], centered_fft(x[2]), atol=ATOL)
    np.testing.assert_allclose(centered_ifft(X, axes=(1, 2)).real, x, atol=ATOL)
    with pytest.raises(NumbaemError, match="axes"):
        centered_fft(x, axes=(0, 3))


def test_frequency_grid_values():
    k0, k1 = frequency_grid(5, 2)
    assert k0.shape == (5, 5)
    np.testing.assert_allclose(k0[:, 0], [-0.4, -0.2, 0.0, 0.2, 0.4])
    np.testing.assert_allclose(k1[0, :], [-0.4, -0.2, 0.0, 0.2, 0.4])
    assert np.all(k0 == k0[:, :1])
    (k,) = frequency_grid(4, 1)
    np.testing.assert_allclose(k, [-0.5, -0.25, 0.0, 0.25])
    sparse = frequency_grid(3, 3, sparse=True)
    assert [a.shape for a in sparse] == [(3, 1, 1), (1, 3, 1), (1, 1, 3)]
    with pytest.raises(NumbaemError, match="L=0"):
        frequency_grid(0, 2)


def test_frequency_grid_matches_centered_fft_of_a_plane_wave():
    # exp(2 pi i k.x) with k on the grid puts all its weight at that frequency index.
    L = 7
    k = frequency_grid(L, 2)
    x = np.meshgrid(_positions(L), _positions(L), indexing="ij")
    wave = np.exp(2j * np.pi * (k[0][5, 1] * x[0] + k[1][5, 1] * x[1]))
    X = centered_fft(wave)
    assert np.unravel_index(np.argmax(np.abs(X)), X.shape) == (5, 1)
    assert abs(X[5, 1]) == pytest.approx(L**2)


@pytest.mark.parametrize("n, m", [(21, 11), (20, 11), (21, 10), (20, 10), (12, 12), (9, 1)])
def test_downsample_preserves_band_limited_cosines(n, m):
    # A cosine below the coarse grid's Nyquist, sampled on both grids (coarse step
    # n / m fine samples, origin at index n//2 on both), is preserved exactly.
    k = (1, -2) if m >= 5 else (0, 0)
    fine = _cosine((n, n), k, 0.3, (n, n))
    coarse = _cosine((m, m), k, 0.3, (m, m))
    got = downsample(fine, m)
    assert got.shape == (m, m) and got.dtype == np.float64
    np.testing.assert_allclose(got, coarse, atol=ATOL)


@pytest.mark.parametrize("n, m", [(11, 6), (12, 8)])
def test_downsample_keeps_the_coarse_nyquist_cosine(n, m):
    # At even m the coarse Nyquist frequency m/2 is kept (both signs folded together).
    fine = _cosine((n, n, n), (m // 2, 0, 1), 0.4, (n, n, n))
    coarse = _cosine((m, m, m), (m // 2, 0, 1), 0.4, (m, m, m))
    np.testing.assert_allclose(downsample(fine, m), coarse, atol=ATOL)


def test_downsample_volume_cosine_and_constant():
    fine = 2.5 + _cosine((15, 15, 15), (1, 0, -2), 1.0, (15, 15, 15))
    coarse = 2.5 + _cosine((9, 9, 9), (1, 0, -2), 1.0, (9, 9, 9))
    np.testing.assert_allclose(downsample(fine, 9), coarse, atol=ATOL)
    np.testing.assert_allclose(downsample(np.full((8, 8, 8), -3.0), 5), -3.0, atol=ATOL)


def test_downsample_same_size_is_identity_and_mean_preserved(rng):
    for n in (7, 8):
        x = rng.standard_normal((n, n, n))
        np.testing.assert_allclose(downsample(x, n), x, atol=ATOL)
        for m in (3, 4, n - 1):
            assert downsample(x, m).mean() == pytest.approx(x.mean(), abs=ATOL)


def test_downsample_real_in_real_out_complex_in_complex_out(rng):
    x = rng.standard_normal((10, 10))
    for m in range(1, 11):
        assert np.isrealobj(downsample(x, m))
    z = x + 1j * rng.standard_normal((10, 10))
    got = downsample(z, 6)
    assert np.iscomplexobj(got)
    np.testing.assert_allclose(got.real, downsample(z.real, 6), atol=ATOL)
    np.testing.assert_allclose(got.imag, downsample(z.imag, 6), atol=ATOL)


def test_downsample_image_non_square():
    fine = _cosine((24, 33), (2, -3), 0.7, (24, 33))
    coarse = _cosine((12, 11), (2, -3), 0.7, (12, 11))
    got = downsample_image(fine, (12, 11))
    assert got.shape == (12, 11)
    np.testing.assert_allclose(got, coarse, atol=ATOL)


def test_downsample_image_agrees_with_downsample_on_squares(rng):
    x = rng.standard_normal((13, 13))
    np.testing.assert_allclose(downsample_image(x, (8, 8)), downsample(x, 8), atol=ATOL)


def test_downsample_validation():
    with pytest.raises(NumbaemError, match="L_new=12 is larger than the input side 11"):
        downsample(np.zeros((11, 11)), 12)
    with pytest.raises(NumbaemError, match="L_new=0"):
        downsample(np.zeros((11, 11)), 0)
    with pytest.raises(NumbaemError, match="downsample_image"):
        downsample(np.zeros((11, 12)), 5)
    with pytest.raises(NumbaemError, match="shape"):
        downsample(np.zeros(11), 5)
    with pytest.raises(NumbaemError, match="NaN"):
        downsample(np.full((5, 5), np.nan), 3)
    with pytest.raises(NumbaemError, match="larger than the image shape"):
        downsample_image(np.zeros((10, 20)), (11, 5))
    with pytest.raises(NumbaemError, match="two entries"):
        downsample_image(np.zeros((10, 20)), (5,))


@pytest.mark.parametrize("N, M", [((63, 60), (21, 20)), ((60, 63), (20, 21)), ((64, 64), (64, 21)),
                                  ((61, 66), (61, 66)), ((30, 33), (12, 10))])
def test_real_image_crop_matches_generic_twin(rng, N, M):
    """downsample_image's fast real path against the generic n-D Fourier crop."""
    from numbaem.runtime.fourier import _crop_real_image, _fourier_crop
    x = rng.standard_normal(N)
    got = _crop_real_image(x, M, workers=1)
    np.testing.assert_allclose(got, _fourier_crop(x, M).real, atol=1e-13)
    np.testing.assert_array_equal(downsample_image(x, M), got)
