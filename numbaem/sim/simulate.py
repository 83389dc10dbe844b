"""Synthetic micrographs with known truth (theory section 1).

    I[n] = sum_i (P R_{w_i} f)[n - s_i] + eps[n],      eps[n] ~ N(0, sigma2) i.i.d.,

with Haar-random rotations ``w_i``, top-left positions ``s_i`` placed by random
sequential addition (:func:`place_positions`), and ``sigma2`` set from the SNR,
``SNR = mean_i ||P R_{w_i} f||_F^2 / (L^2 sigma2)`` over the placed projections.

Two methods (theory section 1)
--------------------------------
Method 2 downsamples the volume (side ``L0``) to side ``L`` by Fourier cropping
(:func:`numbaem.runtime.fourier.downsample`, values preserved), expands it in the
Fourier-Bessel basis ``FBBasis(L, lmax)`` and uses the package's own band-limited
operator :func:`numbaem.model.projection.project`. Every pixel of a projection lies in its
``L x L`` box, so a crop of the clean micrograph at ``s_i`` is exactly ``A_{w_i}
theta``.

Method 1 is what real data look like: it works at the volume's own pixel size. The
micrograph has ``Nf_a = round(N_a L0 / L)`` pixels per axis; each projection is the
real-space line integral of the ``L0^3`` voxel map, ``f(w^T r)`` sampled by cubic
B-spline interpolation (exactly ``scipy.ndimage.map_coordinates(order=3,
mode='constant')`` about the centre voxel ``L0 // 2``, a numba kernel checked against
it in the tests) and summed along axis 2 (z). Noise of variance ``sigma2_gen`` (SNR
with ``L0^2`` in the denominator) is added at that size, and the whole micrograph is
Fourier-cropped to ``(N0, N1)`` (the crop of :func:`numbaem.runtime.fourier.downsample_image`,
computed by a cheaper real-FFT route for these large images) and multiplied by
``L / L0``. The factor makes projections line integrals in units of the
final pixel: a Method 2 projection of the downsampled volume sums ``L`` voxels where
Method 1 summed ``L0``, so the two methods give micrographs on the same scale.
By linearity the clean micrograph and the noise are cropped separately (the noisy
micrograph is their sum), which keeps only one full-size array in memory at a time.

Noise after downsampling. A Fourier crop of one axis from ``Nf`` to an odd ``M``
samples maps white noise ``x`` of variance ``sigma2_gen`` to
``y_m = (1/Nf) sum_{|k| <= (M-1)/2} X_k e^{2 pi i k m / M}``: by Parseval every ``y_m``
has variance ``sigma2_gen M / Nf`` and the kept frequencies stay uncorrelated, so ``y``
is white Gaussian noise again. The cropped noise is therefore drawn directly at the
final size, white, with the variance ::

    sigma2 = sigma2_gen (N0 N1 / (Nf0 Nf1)) (L / L0)^2,

which has the same distribution as cropping full-size noise for odd sizes and saves the
full-size noise image and its transform. For an even ``M`` a crop would fold the
``+M/2`` bin onto ``-M/2`` (:mod:`numbaem.runtime.fourier`) and double the noise power
at the Nyquist frequency; drawing the noise at the final size keeps it white there too
(issue 9: the spectrum is tested). The clean micrograph is still Fourier-cropped from
the full size, so the signal is what a detector at the coarse pixel size records.

Positions. A Fourier crop keeps the origin at index ``N // 2`` of each axis, so the
final pixel ``m`` sits at full-size position ``(m - N//2) Nf / N + Nf//2``. A
projection whose top-left final pixel is ``s`` (centre ``s + L//2``) is therefore
placed at the full-size top-left pixel ``round((s + L//2 - N//2) Nf / N + Nf//2 -
L0//2)``, which centres it exactly where Method 2 centres it (``s L0 / L`` alone
would be off by up to ``L0 / (2L)`` full-size pixels). The full-size box can reach
``(L0/L - 1) / 2`` pixels beyond the final one, so projections at the border are
clipped to the micrograph (the map is close to zero there). All positions reported
are final-scale ones.

Contrast transfer (theory section 11). With ``ctf`` (one :class:`~numbaem.model.ctf.CTFParams`
per micrograph) and the volume's ``pixel_size``, the whole clean micrograph is filtered
by its CTF at the generation size, as the microscope does: Method 1 at the volume's voxel
size before the Fourier crop, Method 2 at the final pixel size. A particle's filtered
image therefore reaches beyond its box, which the patch model (``Psi_g``) does not keep:
the data carry the model's error. The SNR keeps its definition (projections before the
CTF); ``snr_downsampled`` measures the clean micrographs after it.

Coloured noise. ``noise_psd`` (a function of the radial frequency ``|k|`` in cycles per
final pixel, or ``'pink'`` for :func:`pink_psd`) shapes the noise: white noise of the
final size is filtered by ``sqrt(n(|k|))`` with ``n`` normalised to mean 1 over the
micrograph's DFT grid, so ``sigma2`` stays the pixel variance and the SNR its meaning.

Randomness. One generator drives everything, in this order: positions and rotations
of every micrograph, then the noise of every micrograph. Methods 1 and 2 with the same
seed therefore share positions and rotations, and so do runs with and without a CTF or
coloured noise (the same noise draws, filtered).
"""
import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from ..data import io as nio
from ..model.basis import FBBasis, expand, synthesize
from ..model.projection import project
from ..model.rotations import random_rotations
from ..runtime.errors import NumbaemError
from ..runtime.fourier import downsample, downsample_image
from ..runtime.validate import as_rng, check_L, cubic_volume, image_shape, is_int, positive_number
from .placement import place_positions, spacing_distance
from .projectors import project_real_space, spline_coefficients

logger = logging.getLogger(__name__)

__all__ = [
    "Simulation",
    "pink_psd",
    "random_ctf",
    "simulate_micrographs",
    "write_simulation",
]

# Projections per chunk of the Method 1 real-space projector (memory: chunk * L0^2).
_CHUNK = 256

#: The knee ``f0`` of :func:`pink_psd`, cycles per pixel.
PINK_KNEE = 0.05


def pink_psd(k):
    """Pink noise ``1 / (|k| + f0)`` (``f0 =`` :data:`PINK_KNEE` cycles per pixel; 11:1 from 0 to Nyquist).

    Unnormalised: :func:`simulate_micrographs` scales it to the noise variance.
    """
    return 1.0 / (np.asarray(k, dtype=np.float64) + PINK_KNEE)


def _shaped_noise(white, psd):
    """Filter a white noise image by ``sqrt(n(|k|))``, ``n = psd`` normalised to mean 1 on its DFT grid."""
    n0, n1 = white.shape
    f0 = np.fft.fftfreq(n0)[:, None]
    full = psd(np.hypot(f0, np.fft.fftfreq(n1)[None, :]))
    half = psd(np.hypot(f0, np.fft.rfftfreq(n1)[None, :]))
    if not (np.all(np.isfinite(full)) and np.all(full > 0)):
        raise NumbaemError("the noise power spectrum must be positive and finite at every frequency")
    spec = np.fft.rfft2(white) * np.sqrt(half / np.mean(full))
    return np.fft.irfft2(spec, s=(n0, n1))


def _apply_ctf(img, params, pixel_size):
    """Filter a whole (clean) micrograph by its CTF at ``pixel_size`` Angstrom (real FFT).

    The result is the real part of the complex-FFT filter: the CTF enters as its even part on
    the DFT grid, ``(c(k) + c(-k)) / 2`` with ``-k`` the mirrored grid index, which differs from
    ``c`` only on the Nyquist row / column of an even axis of an astigmatic CTF.
    """
    from ..model.ctf import ctf_on_grid

    n0, n1 = img.shape
    c = ctf_on_grid(params, (n0, n1), pixel_size)
    c = 0.5 * (c + c[(-np.arange(n0)) % n0][:, (-np.arange(n1)) % n1])
    return np.fft.irfft2(np.fft.rfft2(img) * c[:, :n1 // 2 + 1], s=(n0, n1))


# --------------------------------------------------------------------------- placement


@dataclasses.dataclass
class Simulation:
    """Micrographs and the truth that made them.

    Attributes
    ----------
    micrographs : list of ndarray, shape (N0, N1), float64
        The noisy micrographs at the final pixel size (side-``L`` scale).
    clean_micrographs : list of ndarray, shape (N0, N1), float64
        The same without noise.
    positions : list of ndarray of int64, shape (T, 2)
        Top-left pixels of the projections, per micrograph, on the final grid.
    rotations : list of ndarray, shape (T, 3, 3)
        Rotations ``w_i`` per micrograph.
    sigma2 : float
        Noise variance of the returned micrographs.
    sigma2_gen : float
        Noise variance at the generation size (``sigma2`` for Method 2).
    snr : float
        Requested SNR at the generation size (theory section 1).
    snr_downsampled : float
        Measured SNR of the returned micrographs: total clean energy divided by
        ``T_total L^2 sigma2`` (equal to ``snr`` for Method 2).
    L, L0 : int
        Side of the projections, side of the input volume.
    method : int
        1 or 2.
    truth_volume : ndarray, shape (L, L, L)
        Band-limited truth, ``synthesize(expand(downsample(volume, L)))``.
    truth_theta : ndarray, shape (M,)
        Its coefficients in ``FBBasis(L, lmax)``.
    lmax : int
        Angular order of the basis.
    density : float
        Requested density ``gamma``.
    density_achieved : float
        ``T L^2 / (N0 N1)``, the same for every micrograph.
    spacing : str
        'separated' or 'arbitrary'.
    oversample : int
        Ray samples per voxel of Method 1.
    seed : int or None
        The seed, when ``rng`` was given as one.
    ctf : list of CTFParams or None
        The CTF of each micrograph (module doc).
    pixel_size : float or None
        The volume's voxel size in Angstrom (the final micrographs have ``pixel_size L0 / L``).
    noise : str
        ``'white'``, ``'pink'`` or ``'custom'``.
    """

    micrographs: list
    clean_micrographs: list
    positions: list
    rotations: list
    sigma2: float
    sigma2_gen: float
    snr: float
    snr_downsampled: float
    L: int
    L0: int
    method: int
    truth_volume: np.ndarray
    truth_theta: np.ndarray
    lmax: int
    density: float
    density_achieved: float
    spacing: str
    oversample: int = 1
    seed: int = None
    ctf: list = None
    pixel_size: float = None
    noise: str = "white"
    views: str = None           # the viewing-direction distribution (numbaem.sim.views), None: Haar
    junk_fraction: float = 0.0
    junk: list = None           # per micrograph, (T,) bool: which objects are contaminants

    @property
    def shape(self):
        """Micrograph shape ``(N0, N1)``."""
        return self.micrographs[0].shape

    @property
    def count(self):
        """Number of micrographs."""
        return len(self.micrographs)


def _full_positions(pos, N, Nf, L, L0):
    """Full-size top-left pixels of projections at final top-left pixels ``pos`` (module doc)."""
    full = np.empty_like(pos)
    for a in range(2):
        r = Nf[a] / N[a]
        full[:, a] = np.rint((pos[:, a] + L // 2 - N[a] // 2) * r + Nf[a] // 2 - L0 // 2)
    return full


def _add_clipped(img, proj, s0, s1):
    """Add ``proj`` into ``img`` with its top-left pixel at ``(s0, s1)``, clipped to ``img``."""
    n0, n1 = proj.shape
    a0, a1 = max(s0, 0), max(s1, 0)
    b0, b1 = min(s0 + n0, img.shape[0]), min(s1 + n1, img.shape[1])
    if a0 < b0 and a1 < b1:
        img[a0:b0, a1:b1] += proj[a0 - s0:b0 - s0, a1 - s1:b1 - s1]


def _junk(n, side, mean_energy, rng):
    from .junk import junk_images
    return junk_images(n, side, mean_energy, rng)


def simulate_micrographs(volume, L, *, micrograph_size, method=2, density=0.1, snr=1.0,
                         spacing="separated", count=1, lmax=None, rng, oversample=1, ctf=None, pixel_size=None,
                         noise_psd=None, views=None, junk=0.0):
    """Simulate micrographs of a volume with known positions, rotations and noise.

    theory section 1; see the module docstring for the two methods, the scale, the
    noise variance after downsampling and the position mapping.

    Parameters
    ----------
    volume : ndarray, shape (L0, L0, L0)
        The map, axes x, y, z, voxel ``n`` at position ``n - L0 // 2``.
    L : int
        Side of the projections in the returned micrographs; odd, ``3 <= L <= L0``.
    micrograph_size : int or tuple of int
        ``N`` or ``(N0, N1)`` at the final pixel size, each ``>= 2 L``.
    method : {1, 2}, optional
        1: project the full-size map in real space, add noise, downsample the
        micrograph; 2: downsample the map, project with the Fourier-Bessel operator.
    density : float, optional
        ``gamma``: each micrograph holds ``T = round(gamma N0 N1 / L^2)`` projections.
    snr : float, optional
        ``mean_i ||P R_{w_i} f||_F^2 / (L_gen^2 sigma2_gen)`` at the generation size
        (``L_gen = L0`` for Method 1, ``L`` for Method 2).
    spacing : {'separated', 'arbitrary'}, optional
        Placement rule (:func:`place_positions`).
    count : int, optional
        Number of micrographs.
    lmax : int or None, optional
        Angular order of the truth basis ``FBBasis(L, lmax)``; default
        :meth:`FBBasis.max_lmax`.
    rng : numpy.random.Generator or int
        Source of randomness; an int is used as a seed and recorded.
    oversample : int, optional
        Method 1 only: samples per voxel along each projection ray.
    ctf : list of numbaem.model.ctf.CTFParams, optional
        One per micrograph: filter each whole clean micrograph by it (module doc).
    pixel_size : float, optional
        The volume's voxel size in Angstrom; required with ``ctf``.
    noise_psd : 'pink' or callable, optional
        Shape of the noise power spectrum against ``|k|`` in cycles per final pixel
        (module doc); None: white.
    views : str or numbaem.sim.views.ViewDistribution, optional
        Distribution of the viewing directions (``'top:0.6'``, ...; :mod:`numbaem.sim.views`);
        None: Haar-random rotations drawn as without it (the same bits).
    junk : float, optional
        Fraction in [0, 1) of the placed objects that are contaminants
        (:func:`numbaem.sim.junk.junk_images`) instead of particles; their energy is a
        multiple of the micrograph's mean particle projection energy, and the SNR counts
        the particles only. 0: none (the same bits as without).

    Returns
    -------
    Simulation

    Raises
    ------
    NumbaemError
        On invalid input, or when the projections cannot be placed.
    """
    rng, seed = as_rng(rng)
    vol = cubic_volume("volume", volume, "simulate")
    L0 = vol.shape[0]
    L = check_L(L)
    if L > L0:
        raise NumbaemError(
            f"L={L} is larger than the volume's side L0={L0}; simulating only "
            f"downsamples, pass an odd L <= {L0}"
        )
    if method not in (1, 2) or isinstance(method, (bool, np.bool_)):
        raise NumbaemError(
            f"method={method!r} is not 1 or 2; pass method=1 (project at full size, then "
            "downsample the micrograph) or method=2 (downsample the volume first)"
        )
    method = int(method)
    N = image_shape(micrograph_size)
    if min(N) < 2 * L:
        raise NumbaemError(
            f"micrograph_size={micrograph_size!r} is smaller than 2 L = {2 * L} on some "
            f"axis; pass a micrograph of at least {2 * L} x {2 * L} pixels"
        )
    gamma = positive_number("density", density, 0.1)
    snr = positive_number("snr", snr, 1.0)
    if not is_int(count) or count < 1:
        raise NumbaemError(f"count={count!r} is not a whole number >= 1; ask for 1 or more micrographs")
    count = int(count)
    spacing_distance(spacing, L)
    if not is_int(oversample) or oversample < 1:
        raise NumbaemError(f"oversample={oversample!r} is not a whole number >= 1; pass oversample=1")
    oversample = int(oversample)
    top = FBBasis.max_lmax(L)
    if lmax is None:
        lmax = top
    elif not is_int(lmax) or not 0 <= lmax <= top:
        raise NumbaemError(
            f"lmax={lmax!r} is not a whole number in 0 .. {top} for L={L}; pass lmax <= "
            f"{top} or leave it out"
        )
    lmax = int(lmax)
    if gamma > 1:
        raise NumbaemError(
            f"density={density!r} is above 1: projections of side L={L} that do not overlap cover at "
            f"most the whole micrograph; pass a density below {0.25 if spacing == 'separated' else 1}"
        )
    if ctf is not None:
        from ..model.ctf import CTFParams
        ctf = list(ctf)
        if len(ctf) != count or not all(isinstance(c, CTFParams) for c in ctf):
            raise NumbaemError(f"ctf must give one CTFParams per micrograph ({count}); got {len(ctf)} item(s)")
        if pixel_size is None:
            raise NumbaemError("a CTF needs the volume's pixel size; pass pixel_size (Angstrom per voxel), "
                               "or --pixel-size on the command line")
    if pixel_size is not None:
        pixel_size = positive_number("pixel_size", pixel_size, 1.0, " (Angstrom per voxel)")
    try:
        junk = float(junk)
    except (TypeError, ValueError):
        junk = float("nan")
    if not 0 <= junk < 1:
        raise NumbaemError("the contaminant fraction (--junk) must lie in [0, 1), e.g. 0.3")
    noise_name = "white"
    if isinstance(noise_psd, str):
        if noise_psd not in ("white", "pink"):
            raise NumbaemError(f"noise_psd={noise_psd!r} is not 'white', 'pink' or a function of |k|")
        noise_name = noise_psd
        noise_psd = pink_psd if noise_psd == "pink" else None
    elif noise_psd is not None:
        if not callable(noise_psd):
            raise NumbaemError("noise_psd must be 'white', 'pink' or a function of |k| (cycles per pixel)")
        noise_name = "custom"
    T = int(round(gamma * N[0] * N[1] / L**2))
    if T < 1:
        raise NumbaemError(
            f"density={density!r} gives no projection in a {N[0]} x {N[1]} micrograph of "
            f"side L={L}; pass a density of at least {0.5 * L * L / (N[0] * N[1]):.3g}"
        )

    # The band-limited truth, the same for both methods.
    basis = FBBasis(L, lmax)
    small = downsample(vol, L) if L < L0 else vol
    theta = expand(small, basis)
    truth = synthesize(theta, basis)

    # Geometry of every micrograph first (shared by both methods for one seed).
    positions = [place_positions(T, N, L, spacing, rng) for _ in range(count)]
    if views is None:
        rotations = [random_rotations(T, rng) for _ in range(count)]
    else:
        from .views import ViewDistribution, parse_views, sample_rotations
        views = views if isinstance(views, ViewDistribution) else parse_views(views)
        rotations = [sample_rotations(T, views, rng) for _ in range(count)]
    is_junk = [np.zeros(T, bool) for _ in range(count)]
    if junk:
        for mask in is_junk:
            mask[rng.choice(T, int(round(junk * T)), replace=False)] = True
    n_mol = sum(int(np.sum(~m)) for m in is_junk)
    if n_mol < 1:
        raise NumbaemError(f"junk={junk!r} leaves no particle among {T} objects per micrograph; lower --junk")

    clean = []
    if method == 2:
        L_gen = L
        energy = 0.0
        for m, (pos, rots) in enumerate(zip(positions, rotations)):
            proj = project(theta, basis, rots)
            jm = is_junk[m]
            e_m = float(np.sum(proj[~jm] ** 2))
            energy += e_m
            if jm.any():
                proj[jm] = _junk(int(jm.sum()), L, e_m / max(1, int(np.sum(~jm))), rng)
            img = np.zeros(N)
            for (s0, s1), p in zip(pos, proj):
                img[s0:s0 + L, s1:s1 + L] += p
            if ctf is not None:
                img = _apply_ctf(img, ctf[m], pixel_size * L0 / L)
            clean.append(img)
        sigma2_gen = energy / n_mol / (L_gen**2 * snr)
        sigma2 = sigma2_gen
        micrographs = [c + _noise(rng, sigma2, N, noise_psd) for c in clean]
    else:
        L_gen = L0
        Nf = tuple(int(round(n * L0 / L)) for n in N)
        coef = spline_coefficients(vol)
        scale = L / L0
        energy = 0.0
        for m, (pos, rots) in enumerate(zip(positions, rotations)):
            full = _full_positions(pos, N, Nf, L, L0)
            img = np.zeros(Nf)
            jm = is_junk[m]
            e_m = 0.0
            for c0 in range(0, T, _CHUNK):
                proj = project_real_space(vol, rots[c0:c0 + _CHUNK], oversample, coef=coef)
                keep = ~jm[c0:c0 + _CHUNK]
                e_c = float(np.sum(proj[keep] ** 2))
                energy += e_c          # summed in this order as without contaminants (the same bits)
                e_m += e_c
                for (s0, s1), p, k in zip(full[c0:c0 + _CHUNK], proj, keep):
                    if k:
                        _add_clipped(img, p, int(s0), int(s1))
            if jm.any():           # contaminants at the generation size, scaled to this micrograph's particles
                for (s0, s1), p in zip(full[jm], _junk(int(jm.sum()), L0, e_m / max(1, int(np.sum(~jm))), rng)):
                    _add_clipped(img, p, int(s0), int(s1))
            if ctf is not None:
                img = _apply_ctf(img, ctf[m], pixel_size)
            clean.append(downsample_image(img, N) * scale if Nf != N else img)
            del img
        sigma2_gen = energy / n_mol / (L_gen**2 * snr)
        sigma2 = sigma2_gen * (N[0] * N[1]) / (Nf[0] * Nf[1]) * scale**2
        micrographs = [c + _noise(rng, sigma2, N, noise_psd) for c in clean]

    if not sigma2 > 0:
        raise NumbaemError(
            "volume projects to zero images (its density is zero or lies outside the "
            "projected region); pass a map with density near its centre"
        )
    total = sum(float(np.sum(c**2)) for c in clean)
    snr_down = total / (count * T * L**2 * sigma2)
    sim = Simulation(
        micrographs=micrographs,
        clean_micrographs=clean,
        positions=positions,
        rotations=rotations,
        sigma2=float(sigma2),
        sigma2_gen=float(sigma2_gen),
        snr=snr,
        snr_downsampled=float(snr_down),
        L=L,
        L0=L0,
        method=method,
        truth_volume=truth,
        truth_theta=theta,
        lmax=lmax,
        density=gamma,
        density_achieved=T * L * L / (N[0] * N[1]),
        spacing=spacing,
        oversample=oversample,
        seed=seed,
        ctf=ctf,
        pixel_size=pixel_size,
        noise=noise_name,
        views=None if views is None else str(views),
        junk_fraction=float(junk),
        junk=is_junk if junk else None,
    )
    logger.info(
        "simulated %d micrograph(s) of %d x %d, %d projections each (density %.3g), "
        "method %d, L=%d from L0=%d, SNR %.3g (%.3g after downsampling), sigma2=%.4g",
        count, N[0], N[1], T, sim.density_achieved, method, L, L0, snr, snr_down, sigma2,
    )
    return sim


def random_ctf(defocus, count, seed, voltage=300.0, cs=2.7, amplitude_contrast=0.1, astigmatism=0.0):
    """One CTF per micrograph: mean defocus uniform in ``defocus`` (micrometres), astigmatism at a random angle.

    Drawn from a generator seeded by ``(seed, 1)``, apart from the simulation's own, so a
    run with ``--defocus`` has the particles and the noise of the same run without.
    """
    from ..model.ctf import CTFParams

    rng = np.random.default_rng([int(seed), 1])
    mean = rng.uniform(defocus[0], defocus[1], count) * 1e4
    angle = rng.uniform(0.0, 180.0, count)
    return [CTFParams(defocus_u=float(m + astigmatism / 2), defocus_v=float(m - astigmatism / 2),
                      defocus_angle=float(a), voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast)
            for m, a in zip(mean, angle)]


def _noise(rng, sigma2, shape, psd):
    """Noise of pixel variance ``sigma2``: white, or shaped by ``psd`` (module doc); one draw of ``rng``."""
    white = rng.normal(0.0, math.sqrt(sigma2), shape)
    return white if psd is None else _shaped_noise(white, psd)


# --------------------------------------------------------------------------- output


def output_paths(out_path, count):
    """The micrograph, truth-JSON and truth-volume paths for base ``out_path``."""
    if not isinstance(out_path, (str, os.PathLike)) or str(out_path) == "":
        raise NumbaemError(f"out_path={out_path!r} is not a file name; pass a path such as 'mic.mrc'")
    base = Path(out_path)
    if base.suffix.lower() == ".mrc":
        base = base.with_suffix("")
    if count == 1:
        mics = [base.with_name(base.name + ".mrc")]
    else:
        width = max(3, len(str(count - 1)))
        mics = [base.with_name(f"{base.name}_{i:0{width}d}.mrc") for i in range(count)]
    return mics, base.with_name(base.name + ".json"), base.with_name(base.name + ".truth.mrc")


def write_simulation(sim, out_path, force=False, command=None, pixel_size=None):
    """Write the micrographs, a JSON truth file and the truth volume.

    For ``out_path`` ``MIC.mrc`` (or ``MIC``): ``MIC.mrc`` (one micrograph) or
    ``MIC_000.mrc``, ``MIC_001.mrc``, ... (several), ``MIC.json`` (positions,
    rotations, noise and SNR, sizes, method, ``lmax``, density, spacing, seed,
    command, file names) and ``MIC.truth.mrc`` (the band-limited truth, side ``L``);
    with a CTF also ``MIC_ctf.star``, the RELION 3.1 micrographs STAR file that
    ``numbaem reconstruct --ctf`` reads (:mod:`numbaem.data.star`).
    Every path is checked before anything is written; each file is written
    atomically, and if one write fails the files this call already wrote are removed.

    Parameters
    ----------
    sim : Simulation
    out_path : str or os.PathLike
        Base name of the outputs.
    force : bool, optional
        Overwrite existing outputs.
    command : str or None, optional
        The command line that made the simulation, recorded in the JSON.
    pixel_size : float or None, optional
        Voxel size of the input volume in Angstrom; the outputs get
        ``pixel_size * L0 / L``. Default: the simulation's own (``sim.pixel_size``).

    Returns
    -------
    paths : list of pathlib.Path
        The files written: micrographs, then the JSON, then the truth volume (then the
        STAR file, with a CTF).

    Raises
    ------
    NumbaemError
        If an output exists (without ``force``), a directory is missing, or an
        argument is invalid; nothing is written then.
    """
    if not isinstance(sim, Simulation):
        raise NumbaemError(f"sim is a {type(sim).__name__}, not a Simulation; pass the result of simulate_micrographs")
    if pixel_size is None:
        pixel_size = sim.pixel_size
    if pixel_size is not None:
        pixel_size = positive_number("pixel_size", pixel_size, 1.0)
        out_pixel = pixel_size * sim.L0 / sim.L
    else:
        out_pixel = None
    if command is not None and not isinstance(command, str):
        command = " ".join(str(c) for c in command)
    mics, json_path, truth_path = output_paths(out_path, sim.count)
    paths = mics + [json_path, truth_path]
    star_path = None
    if sim.ctf is not None:
        if out_pixel is None:
            raise NumbaemError("a simulation with a CTF needs its pixel size to write the STAR file; pass pixel_size")
        star_path = json_path.with_name(json_path.stem + "_ctf.star")
        paths.append(star_path)
    for p in paths:
        nio.check_output(p, force)

    truth = {
        "format": "numbaem-simulation-1",
        "micrographs": [p.name for p in mics],
        "truth_volume": truth_path.name,
        "shape": list(sim.shape),
        "count": sim.count,
        "L": sim.L,
        "L0": sim.L0,
        "method": sim.method,
        "lmax": sim.lmax,
        "spacing": sim.spacing,
        "density": sim.density,
        "density_achieved": sim.density_achieved,
        "projections_per_micrograph": int(len(sim.positions[0])),
        "snr": sim.snr,
        "snr_downsampled": sim.snr_downsampled,
        "sigma2": sim.sigma2,
        "sigma2_gen": sim.sigma2_gen,
        "oversample": sim.oversample,
        "seed": sim.seed,
        "command": command,
        "pixel_size": out_pixel,
        "input_pixel_size": pixel_size,
        "conventions": (
            "positions are top-left pixels (axis 0 = x, axis 1 = y) on the final grid; "
            "projection i occupies [s0, s0 + L) x [s1, s1 + L); rotations act as "
            "R_w f(r) = f(w^T r) and projections integrate along z (theory section 1)"
        ),
        "noise": sim.noise,
        "ctf": None if sim.ctf is None else [dataclasses.asdict(c) for c in sim.ctf],
        "ctf_star": None if star_path is None else star_path.name,
        "positions": [np.asarray(p).tolist() for p in sim.positions],
        "rotations": [np.asarray(r).tolist() for r in sim.rotations],
        "orientation_prior": sim.views or "uniform",
        "junk_fraction": sim.junk_fraction,
        "junk": None if sim.junk is None else [np.asarray(j).tolist() for j in sim.junk],
    }
    text = json.dumps(truth, indent=1) + "\n"

    written = []
    try:
        for p, img in zip(mics, sim.micrographs):
            nio.write_image(p, img, pixel_size=out_pixel, force=force)
            written.append(p)
        nio.atomic_write_text(json_path, text, force=force)
        written.append(json_path)
        nio.write_volume(truth_path, sim.truth_volume, voxel_size=out_pixel, force=force)
        written.append(truth_path)
        if star_path is not None:
            from ..data.star import write_micrographs_star
            write_micrographs_star(star_path, [p.name for p in mics], sim.ctf, out_pixel, force=force)
            written.append(star_path)
    except BaseException:
        for p in written:
            try:
                p.unlink()
            except OSError:
                logger.warning("could not remove %s after a failed write", p)
        raise
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths
