"""Noise power spectra (theory section 11): the robust radial estimate, its refinement, whitening."""
import numpy as np
import pytest

from numbaem.model.noise import (RadialProfile, apply_radial_filter, estimate_noise_spectrum, estimate_psd,
                                 mean_power, tile_periodograms, whitening_filter)
from numbaem.runtime.errors import NumbaemError
from numbaem.sim.simulate import _shaped_noise, pink_psd


def _pink(rng, n=660, sigma2=2.0):
    """Pink noise of pixel variance sigma2 and its true radial spectrum (the simulator's filter)."""
    img = _shaped_noise(rng.normal(0.0, np.sqrt(sigma2), (n, n)), pink_psd)
    f = np.fft.fftfreq(n)
    norm = np.mean(pink_psd(np.hypot(f[:, None], f[None, :])))
    return img, lambda k: sigma2 * pink_psd(k) / norm


def test_white_noise_spectrum_is_flat_at_its_variance(rng):
    """The quantile of exponentials divided by the exponential's own quantile: unbiased.
    Tolerances of about 4 standard errors of a sample quantile: the k = 0 bin holds 3600
    chi^2_1 values (one per tile; SE 6% at q = 0.25), every other bin at least 8 x 3600
    exponentials (SE under 1.2%)."""
    img = rng.normal(0.0, 1.5, (660, 660))
    for q in (0.25, 0.5):
        prof = estimate_psd(img, 11, quantile=q)
        assert prof.values[0] == pytest.approx(1.5 ** 2, rel=0.25)
        np.testing.assert_allclose(prof.values[1:], 1.5 ** 2, rtol=0.05)
    assert mean_power(prof) == pytest.approx(2.25, rel=0.02)


def test_wrong_quantile_correction_would_be_caught(rng):
    """Dividing the median by 1 (not ln 2) is 30% low: the check above would see it."""
    img = rng.normal(0.0, 1.0, (330, 330))
    per = tile_periodograms(img, 11)
    assert np.median(per[:, 1:, 1:]) < 0.75


def test_pink_noise_estimate_and_whitening(rng):
    """The refined estimate follows the true spectrum (within 10% on every bin but k = 0, 15% there:
    the tile's frequency resolution smooths the peak), and whitening by it leaves noise whose own
    spectrum is flat within 6% and whose variance is the pixel variance of the input (3%)."""
    img, true = _pink(rng)
    prof = estimate_noise_spectrum(img, 11)
    ratio = prof.values / true(prof.radius)
    assert abs(ratio[0] - 1) < 0.15 and np.all(np.abs(ratio[1:] - 1) < 0.10), ratio
    white = apply_radial_filter(img, whitening_filter(prof))
    again = estimate_psd(white, 11)
    np.testing.assert_allclose(again.values / mean_power(again), 1.0, atol=0.06)
    assert white.var() == pytest.approx(img.var(), rel=0.03)
    # without the refinement the k = 0 bin is visibly off (the Fejer smoothing of the peak)
    raw = estimate_psd(img, 11)
    assert raw.values[0] / true(0.0) < 0.7


def test_quantile_estimate_is_robust_to_particles(rng):
    """Micrographs with projections (density 0.05, SNR 10 at the patch scale, Method 2): the radial
    mean of the periodogram is biased up by the particles' power by 2.6x at k = 0; the quantile
    estimate by less than 30% (measured 18%, with the noise alone as the reference)."""
    from numbaem.sim.molecule import synthetic_molecule
    from numbaem.sim.simulate import simulate_micrographs
    sim = simulate_micrographs(synthetic_molecule(15, rng=3), 11, micrograph_size=660, method=2, density=0.05,
                               snr=10.0, rng=1, noise_psd="pink")
    img = sim.micrographs[0]
    noise = img - sim.clean_micrographs[0]
    ref = estimate_psd(noise, 11, 0.5).values
    est = estimate_psd(img, 11).values
    per, pn = tile_periodograms(img, 11).mean(axis=0), tile_periodograms(noise, 11).mean(axis=0)
    assert per[0, 0] / pn[0, 0] > 2.0
    assert np.all(est / ref < 1.3), est / ref


def test_apply_radial_filter_is_the_fft_filter(rng):
    img = rng.standard_normal((12, 9))
    prof = RadialProfile(np.array([0.0, 0.3, 0.8]), np.array([2.0, 0.5, 1.0]))
    f0, f1 = np.fft.fftfreq(12)[:, None], np.fft.fftfreq(9)[None, :]
    ref = np.fft.ifft2(np.fft.fft2(img) * prof(np.hypot(f0, f1))).real
    np.testing.assert_allclose(apply_radial_filter(img, prof), ref, atol=1e-13)


def test_bad_profiles_and_tiles():
    with pytest.raises(NumbaemError, match="increasing"):
        RadialProfile(np.array([0.0, 0.0]), np.array([1.0, 1.0]))
    with pytest.raises(NumbaemError, match="odd"):
        estimate_psd(np.zeros((40, 40)), 10)
    with pytest.raises(NumbaemError, match="zero"):
        estimate_psd(np.zeros((40, 40)), 11)
