"""Noise power spectra: a robust radial estimate and the whitening filter (theory section 11).

If a micrograph's noise is stationary with power spectrum ``S(k)`` (per pixel: white
noise of variance ``sigma^2`` has ``S = sigma^2``), filtering the whole micrograph by
``w(k) = sqrt(S_bar / S(k))`` makes its noise white with variance ``S_bar``, and its
particles are filtered by ``w`` too, which joins the model's ``Psi`` (:mod:`numbaem.model.ctf`).
``S_bar``, the mean of ``S`` over the frequency square ``[-1/2, 1/2]^2`` (the noise's
pixel variance), keeps the whitened micrograph in the data's units, so a noise variance
given for the raw pixels keeps its meaning.

Estimate (:func:`estimate_psd`). The periodogram ``|DFT(y)|^2 / n`` of a tile of
stationary noise is, at every frequency off the axes' zero, an exponential variable of
mean ``S(k)``; at ``k = 0`` it is ``S(0) chi^2_1``. The particles add their own power to
the tiles they touch, so the radial *average* of the periodogram is biased upwards by
the particles (most of all at low frequencies, where a particle's power lies). The
estimate pools, per radial bin, the periodogram values of all tiles of side ``T``
(odd) and takes their ``q``-quantile divided by the same quantile of the unit
exponential, ``-ln(1 - q)`` (``ln 2`` for the median; for the bin at ``k = 0``, the
quantile of ``chi^2_1``). The quantile of a mixture in which a fraction ``f`` of the
values is inflated moves only by how much of the clean distribution the inflated values
displace: with ``q = 0.25`` and tiles the size of a patch, ``f`` is the fraction of
tiles a particle touches (about 0.4 at density 0.1) and the estimate stays within a few
percent of the noise's own spectrum where the mean is off by the particles' power
(``tests/test_noise.py`` measures both).

Refinement (:func:`estimate_noise_spectrum`). A tile's periodogram is the spectrum
smoothed over the tile's frequency resolution ``1/T`` (the Fejer kernel), which flattens
a sharp low-frequency peak: whitening pink noise by the first estimate leaves 40% excess
power at ``k = 0``. The estimate is therefore refined on the whitened image: its residual
spectrum, much flatter and so little biased by the smoothing, multiplies the estimate, a
few times (pink noise, T = 11: 1.40, 1.13, 1.06, 1.03 at ``k = 0`` after 0-3 refinements;
every other bin within 0.3% after 2).
"""
import dataclasses
import math

import numpy as np
import scipy.fft

from ..runtime.errors import NumbaemError
from ..runtime.threads import fft_threads

__all__ = ["RadialProfile", "tile_periodograms", "estimate_psd", "estimate_noise_spectrum", "mean_power",
           "whitening_filter", "apply_radial_filter", "DEFAULT_QUANTILE"]

#: Quantile of the pooled periodogram values taken per radial bin (module doc).
DEFAULT_QUANTILE = 0.25


@dataclasses.dataclass(frozen=True, eq=False)
class RadialProfile:
    """A function of the radial frequency ``|k|`` (cycles per pixel), linear between samples.

    Attributes
    ----------
    radius : ndarray, shape (n,)
        Increasing sample positions, cycles per pixel.
    values : ndarray, shape (n,)
        Values there; constant beyond the first and last sample.
    """

    radius: np.ndarray
    values: np.ndarray

    def __post_init__(self):
        r = np.asarray(self.radius, dtype=np.float64)
        v = np.asarray(self.values, dtype=np.float64)
        if r.ndim != 1 or r.shape != v.shape or len(r) < 1 or np.any(np.diff(r) <= 0):
            raise NumbaemError("a radial profile needs increasing radii and one value per radius")
        if not np.all(np.isfinite(v)):
            raise NumbaemError("a radial profile holds NaN or infinite values")
        object.__setattr__(self, "radius", r)
        object.__setattr__(self, "values", v)

    def __call__(self, k):
        return np.interp(np.asarray(k, dtype=np.float64), self.radius, self.values)

    def to_dict(self):
        return dict(radius=self.radius.tolist(), values=self.values.tolist())


def _check_tile(T):
    if int(T) != T or T < 3 or T % 2 == 0:
        raise NumbaemError(f"tile side {T!r} must be an odd whole number >= 3 (odd: no Nyquist bin)")
    return int(T)


def tile_periodograms(img, T):
    """Periodograms ``|DFT2(tile)|^2 / T^2`` of the non-overlapping ``T x T`` tiles of an image.

    Parameters
    ----------
    img : ndarray, shape (N0, N1)
    T : int
        Odd tile side.

    Returns
    -------
    ndarray, shape (n_tiles, T, T)
        ``fftfreq`` layout per axis; rows and columns that do not fill a tile are left out.
    """
    T = _check_tile(T)
    img = np.asarray(img, dtype=np.float64)
    r, c = img.shape[0] // T, img.shape[1] // T
    if r == 0 or c == 0:
        raise NumbaemError(f"an image of {img.shape[0]} x {img.shape[1]} pixels holds no {T} x {T} tile; "
                           "use larger micrographs or a smaller patch size")
    tiles = img[:r * T, :c * T].reshape(r, T, c, T).transpose(0, 2, 1, 3).reshape(r * c, T, T)
    spec = scipy.fft.fft2(tiles, workers=fft_threads(), overwrite_x=True)
    return (spec.real ** 2 + spec.imag ** 2) / (T * T)


def _radial_bins(T):
    f = np.fft.fftfreq(T)
    rad = np.hypot(f[:, None], f[None, :])
    return np.rint(rad * T).astype(np.int64)


def _unit_quantile(q, chi2_1=False):
    """The ``q``-quantile of the unit exponential (``-ln(1 - q)``) or of ``chi^2_1``."""
    if chi2_1:
        from scipy.stats import chi2
        return float(chi2.ppf(q, 1))
    return -math.log1p(-q)


def estimate_psd(images, T, quantile=DEFAULT_QUANTILE, weights=None):
    """Robust radial noise power spectrum of one or more images (module doc).

    Parameters
    ----------
    images : ndarray (N0, N1) or list of them
        Micrographs at the working pixel size, background removed (zero-mean noise).
    T : int
        Odd tile side (the patch size ``L`` is a good choice: a tile is then as likely
        to hold a particle as a patch).
    quantile : float
        ``q`` in (0, 1).
    weights : list of float, optional
        Per image, a factor its periodograms are multiplied by (to pool images brought
        to a common scale).

    Returns
    -------
    RadialProfile
        ``S`` at radii ``b / T``, ``b = 0 .. round(T / sqrt 2)``, cycles per pixel.
    """
    if not 0 < quantile < 1:
        raise NumbaemError(f"quantile={quantile!r} must lie in (0, 1)")
    T = _check_tile(T)
    if isinstance(images, np.ndarray) and images.ndim == 2:
        images = [images]
    bins = _radial_bins(T).ravel()
    nb = int(bins.max()) + 1
    pools = [[] for _ in range(nb)]
    order = np.argsort(bins, kind="stable")
    edges = np.searchsorted(bins[order], np.arange(nb + 1))
    for i, img in enumerate(images):
        per = tile_periodograms(img, T).reshape(-1, T * T)[:, order]
        if weights is not None:
            per *= float(weights[i])
        for b in range(nb):
            pools[b].append(per[:, edges[b]:edges[b + 1]].ravel())
    vals = np.empty(nb)
    for b in range(nb):
        v = np.concatenate(pools[b])
        vals[b] = np.quantile(v, quantile) / _unit_quantile(quantile, chi2_1=(b == 0))
    if not np.all(vals > 0):
        raise NumbaemError("the noise power spectrum is zero in some band (constant or band-limited micrographs?); "
                           "use --noise white for such data")
    return RadialProfile(np.arange(nb) / T, vals)


def mean_power(profile, n=255):
    """``S_bar``: the mean of ``S(|k|)`` over the frequency square ``[-1/2, 1/2]^2`` (the pixel variance).

    Evaluated on the ``n x n`` DFT grid (``n`` odd), which is exact for an image of that side.
    """
    f = np.fft.fftfreq(int(n))
    return float(np.mean(profile(np.hypot(f[:, None], f[None, :]))))


def whitening_filter(profile):
    """``w(|k|) = sqrt(S_bar / S(|k|))`` as a :class:`RadialProfile` on the same radii."""
    sbar = mean_power(profile)
    return RadialProfile(profile.radius, np.sqrt(sbar / profile.values))


def apply_radial_filter(img, profile):
    """Filter a whole image by ``profile(|k|)`` (periodic; real FFT).

    Parameters
    ----------
    img : ndarray, shape (N0, N1)
    profile : RadialProfile

    Returns
    -------
    ndarray, shape (N0, N1), float64
    """
    img = np.asarray(img, dtype=np.float64)
    n0, n1 = img.shape
    f0 = np.fft.fftfreq(n0)[:, None]
    f1 = np.fft.rfftfreq(n1)[None, :]
    w = fft_threads()                    # the configured threads (--threads, use_threads)
    spec = scipy.fft.rfft2(img, workers=w)
    spec *= profile(np.hypot(f0, f1))
    return scipy.fft.irfft2(spec, s=(n0, n1), workers=w, overwrite_x=True)


def estimate_noise_spectrum(img, T, quantile=DEFAULT_QUANTILE, refinements=3):
    """:func:`estimate_psd` refined on the whitened image ``refinements`` times (module doc).

    Parameters
    ----------
    img : ndarray, shape (N0, N1)
    T : int
        Odd tile side.
    quantile : float
    refinements : int

    Returns
    -------
    RadialProfile
        ``S(|k|)``, cycles per pixel.
    """
    prof = estimate_psd(img, T, quantile)
    for _ in range(int(refinements)):
        resid = estimate_psd(apply_radial_filter(img, whitening_filter(prof)), T, quantile)
        prof = RadialProfile(prof.radius, prof.values * resid.values / mean_power(resid))
    return prof
