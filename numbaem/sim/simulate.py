"""Synthetic micrographs with known truth (MODEL.md section 1).

    I[n] = sum_i (P R_{w_i} f)[n - s_i] + eps[n],      eps[n] ~ N(0, sigma2) i.i.d.,

with Haar-random rotations ``w_i``, top-left positions ``s_i`` placed by random
sequential addition (:func:`place_positions`), and ``sigma2`` set from the SNR,
``SNR = mean_i ||P R_{w_i} f||_F^2 / (L^2 sigma2)`` over the placed projections.

Two methods (MODEL.md section 1)
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

Noise variance after downsampling. A Fourier crop of one axis from ``Nf`` to ``M``
samples maps white noise ``x`` to ``y_m = (1/Nf) sum_{k in K} X_k e^{2 pi i k m / M}``,
``K`` the kept frequencies; by Parseval ``Var y_m = sigma2 |K| / Nf`` for every ``m``.
``|K| = M`` for odd ``M`` (and then ``y`` is white again); for even ``M < Nf`` the
``+M/2`` bin is folded onto ``-M/2`` (:mod:`numbaem.runtime.fourier`), so ``|K| = M + 1``.
Hence the returned ::

    sigma2 = sigma2_gen * g(N0, Nf0) * g(N1, Nf1) * (L / L0)^2,
    g(M, Nf) = (M + [M even and M < Nf]) / Nf      (= 1 when M = Nf),

i.e. ``sigma2_gen (N0 N1 / (Nf0 Nf1)) (L / L0)^2`` for odd sizes.

Positions. A Fourier crop keeps the origin at index ``N // 2`` of each axis, so the
final pixel ``m`` sits at full-size position ``(m - N//2) Nf / N + Nf//2``. A
projection whose top-left final pixel is ``s`` (centre ``s + L//2``) is therefore
placed at the full-size top-left pixel ``round((s + L//2 - N//2) Nf / N + Nf//2 -
L0//2)``, which centres it exactly where Method 2 centres it (``s L0 / L`` alone
would be off by up to ``L0 / (2L)`` full-size pixels). The full-size box can reach
``(L0/L - 1) / 2`` pixels beyond the final one, so projections at the border are
clipped to the micrograph (the map is close to zero there). All positions reported
are final-scale ones.

Randomness. One generator drives everything, in this order: positions and rotations
of every micrograph, then the noise of every micrograph. Methods 1 and 2 with the same
seed therefore share positions and rotations.
"""
import dataclasses
import json
import logging
import math
import numbers
import os
from pathlib import Path

import numpy as np
from numba import prange
from scipy import ndimage

from ..data import io as nio
from ..runtime.jit import jit, pjit
from ..model.basis import FBBasis, check_L, expand, synthesize
from ..runtime.errors import NumbaemError
from ..runtime.fourier import downsample, downsample_image
from ..model.projection import project
from ..model.rotations import random_rotations

logger = logging.getLogger(__name__)

__all__ = [
    "Simulation",
    "place_positions",
    "project_real_space",
    "simulate_micrographs",
    "write_simulation",
    "default_lmax",
]

_SPACINGS = ("separated", "arbitrary")
# Projections per chunk of the Method 1 real-space projector (memory: chunk * L0^2).
_CHUNK = 256


# --------------------------------------------------------------------------- helpers


def _is_int(value):
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise NumbaemError(
            f"rng={rng!r} is not a numpy.random.Generator; pass "
            "numpy.random.default_rng(seed)"
        )
    return rng


def _check_shape(N, name="micrograph_size"):
    """Return ``N`` (an int or a pair of ints) as a tuple ``(N0, N1)``."""
    if _is_int(N):
        shape = (int(N), int(N))
    else:
        try:
            shape = tuple(N)
        except TypeError:
            shape = ()
        if len(shape) != 2 or not all(_is_int(n) for n in shape):
            raise NumbaemError(
                f"{name}={N!r} is not an integer or a pair of integers; pass e.g. "
                f"{name}=1024 or {name}=(1024, 768)"
            )
        shape = (int(shape[0]), int(shape[1]))
    return shape


def _spacing_distance(spacing, L):
    """Minimum Chebyshev distance between two positions (MODEL.md section 1)."""
    if spacing not in _SPACINGS:
        raise NumbaemError(
            f"spacing={spacing!r} is not one of {_SPACINGS}; pass 'separated' (the "
            "paper's well-separated placement) or 'arbitrary' (no overlap only)"
        )
    return 2 * L - 1 if spacing == "separated" else L


def default_lmax(L):
    """The highest angular order ``l`` with ``S_l > 0`` for side ``L`` (MODEL.md section 2).

    Parameters
    ----------
    L : int
        Odd side of the volume.

    Returns
    -------
    lmax : int
        The largest ``l`` for which ``j_l`` has a zero below ``2 pi c R`` (Nyquist).
    """
    return FBBasis.max_lmax(L)


# --------------------------------------------------------------------------- placement


@jit
def _place_batch(blocked, free, draws, d, n_target, count, out):
    """Random sequential addition over one batch of draws from the free list.

    ``blocked[a, b]`` is nonzero where a position is within Chebyshev distance
    ``< d`` of a placed one. ``free`` lists flat indices that were free when the
    batch was drawn; ``draws`` index into it. Each drawn position still free is
    accepted, written to ``out[count]`` and blocks its ``(2d - 1)^2`` neighbourhood.
    Returns the new count and the number of draws consumed.
    """
    A0, A1 = blocked.shape
    used = 0
    for q in range(draws.shape[0]):
        if count >= n_target:
            break
        used += 1
        idx = free[draws[q]]
        p0 = idx // A1
        p1 = idx - p0 * A1
        if blocked[p0, p1]:
            continue
        out[count, 0] = p0
        out[count, 1] = p1
        count += 1
        for a in range(max(0, p0 - d + 1), min(A0, p0 + d)):
            for b in range(max(0, p1 - d + 1), min(A1, p1 + d)):
                blocked[a, b] = 1
    return count, used


def place_positions(n_target, N, L, spacing="separated", rng=None, max_tries=None):
    """Top-left positions of ``n_target`` projections by random sequential addition.

    Positions are drawn one at a time, uniformly among those still allowed, until
    ``n_target`` are placed: with ``spacing='separated'`` any two positions are at
    Chebyshev distance ``>= 2L - 1`` (MODEL.md section 1, the paper's eq. 5: every
    ``L x L`` patch of a regular grid holds at most one projection), with
    ``'arbitrary'`` at distance ``>= L`` (projections do not overlap).

    The grid of occupied cells is a boolean array over all allowed positions: each
    accepted position blocks its ``(2d - 1)^2`` neighbourhood, and candidates are
    drawn from the list of free positions, recompacted in rounds (rejection sampling
    against the positions blocked since). This is exact random sequential addition
    at a cost of ``O(N0 N1 + T d^2)`` per round, never ``O(T^2)``, and it ends by
    itself when no position is free (the jammed state, about 56 % of the plane
    covered by the ``d x d`` exclusion squares for random sequential addition of
    squares).

    Parameters
    ----------
    n_target : int
        Number of positions wanted, ``>= 0``.
    N : int or tuple of int
        Micrograph shape, ``N`` for ``N x N`` or ``(N0, N1)``.
    L : int
        Side of a projection, ``1 <= L <= min(N0, N1)``.
    spacing : {'separated', 'arbitrary'}, optional
        The separation rule.
    rng : numpy.random.Generator
        Source of randomness.
    max_tries : int or None, optional
        Upper bound on the number of candidate draws; None (default) for no bound
        (placement still ends, at the jammed state at the latest).

    Returns
    -------
    positions : ndarray of int64, shape (n_target, 2)
        Top-left pixels ``(s0, s1)``, ``0 <= s0 <= N0 - L``, ``0 <= s1 <= N1 - L``,
        in placement order.

    Raises
    ------
    NumbaemError
        If an argument is invalid, or fewer than ``n_target`` positions could be
        placed (the message gives the count and the density reachable).
    """
    if not _is_int(n_target) or n_target < 0:
        raise NumbaemError(f"n_target={n_target!r} is not a whole number >= 0; pass a count of projections")
    n_target = int(n_target)
    N0, N1 = _check_shape(N, "N")
    if not _is_int(L) or L < 1:
        raise NumbaemError(f"L={L!r} is not a positive whole number; pass the projection side, e.g. L=7")
    L = int(L)
    if L > min(N0, N1):
        raise NumbaemError(
            f"L={L} does not fit in a {N0} x {N1} micrograph; use a micrograph of at "
            f"least {L} x {L} pixels"
        )
    d = _spacing_distance(spacing, L)
    rng = _check_rng(rng)
    if max_tries is not None and (not _is_int(max_tries) or max_tries < 1):
        raise NumbaemError(f"max_tries={max_tries!r} is not a positive whole number or None; pass e.g. max_tries=10**7")

    out = np.zeros((n_target, 2), np.int64)
    if n_target == 0:
        return out
    A0, A1 = N0 - L + 1, N1 - L + 1
    blocked = np.zeros((A0, A1), np.uint8)
    count, tries, jammed = 0, 0, False
    while count < n_target:
        free = np.flatnonzero(blocked.ravel() == 0)
        if free.size == 0:
            jammed = True
            break
        n_draw = free.size
        if max_tries is not None:
            n_draw = min(n_draw, max_tries - tries)
            if n_draw <= 0:
                break
        draws = rng.integers(0, free.size, n_draw)
        count, used = _place_batch(blocked, free, draws, d, n_target, count, out)
        tries += used
    if count < n_target:
        kind = "well-separated" if spacing == "separated" else "non-overlapping"
        reached = count * L * L / (N0 * N1)
        if jammed:
            why = (
                f"the micrograph is too crowded for {kind} placement (no free position "
                f"is left); lower --density or raise --micrograph-size; the highest "
                f"density reachable is about {reached:.3g}"
            )
        else:
            why = (
                f"placement gave up after max_tries={max_tries} random draws; raise "
                f"max_tries, lower --density or raise --micrograph-size"
            )
        raise NumbaemError(
            f"only {count} of {n_target} projections of side L={L} could be placed in a "
            f"{N0} x {N1} micrograph (density {n_target * L * L / (N0 * N1):.3g} "
            f"requested): {why}"
        )
    logger.debug("placed %d positions in %d draws", count, tries)
    return out


# --------------------------------------------------------------------------- real-space projection


@jit
def _mirror(j, n):
    """Mirror-reflect index ``j`` into ``0 .. n-1`` (``scipy.ndimage`` 'mirror')."""
    if j < 0:
        j = -j
    if j > n - 1:
        j = 2 * (n - 1) - j
    return j


@jit
def _taps(q, n, w, idx):
    """Cubic B-spline weights ``w[0..3]`` and mirrored tap indices ``idx[0..3]`` at ``q``."""
    f = math.floor(q)
    t = q - f
    fi = int(f)
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    w[0] = s * s * s / 6.0
    w[1] = (4.0 - 6.0 * t2 + 3.0 * t3) / 6.0
    w[2] = (1.0 + 3.0 * t + 3.0 * t2 - 3.0 * t3) / 6.0
    w[3] = t3 / 6.0
    if 1 <= fi <= n - 3:
        for a in range(4):
            idx[a] = fi - 1 + a
    else:
        for a in range(4):
            idx[a] = _mirror(fi - 1 + a, n)


@pjit
def _project_real(coef, rots, oversample, out):
    """Real-space projections of a cubic B-spline volume, one ``(rotation, x)`` row per task.

    ``coef`` holds the B-spline coefficients of the ``n^3`` map (``ndimage.spline_filter``,
    mirror boundary). Output pixel ``(i, j)`` of rotation ``t`` is
    ``(1/os) sum_k f(w^T r_k)`` over the ray ``r_k = (i - R, j - R, z_k)``,
    ``z_k = -R + (k + 1/2)/os - 1/2``, ``k = 0 .. n os - 1``; ``f`` at input index
    coordinates ``q = w^T r + R`` is the spline, and zero where any ``q_a`` is outside
    ``[0, n - 1]`` (``map_coordinates`` with ``mode='constant'``). Every task costs the
    same, so the split by rows is a split by cost.
    """
    n = coef.shape[0]
    K = rots.shape[0]
    R = n // 2
    top = n - 1.0
    nz = n * oversample
    inv = 1.0 / oversample
    for task in prange(K * n):
        t = task // n
        i = task - t * n
        w = rots[t]
        wx = np.empty(4)
        wy = np.empty(4)
        wz = np.empty(4)
        ix = np.empty(4, np.int64)
        iy = np.empty(4, np.int64)
        iz = np.empty(4, np.int64)
        x = i - R
        for j in range(n):
            y = j - R
            # q = w^T r + R, r = (x, y, z): q_a = w[0, a] x + w[1, a] y + w[2, a] z + R
            b0 = w[0, 0] * x + w[1, 0] * y + R
            b1 = w[0, 1] * x + w[1, 1] * y + R
            b2 = w[0, 2] * x + w[1, 2] * y + R
            acc = 0.0
            for k in range(nz):
                z = -R + (k + 0.5) * inv - 0.5
                q0 = b0 + w[2, 0] * z
                q1 = b1 + w[2, 1] * z
                q2 = b2 + w[2, 2] * z
                if q0 < 0.0 or q0 > top or q1 < 0.0 or q1 > top or q2 < 0.0 or q2 > top:
                    continue
                _taps(q0, n, wx, ix)
                _taps(q1, n, wy, iy)
                _taps(q2, n, wz, iz)
                z0, z1, z2, z3 = iz[0], iz[1], iz[2], iz[3]
                e0, e1, e2, e3 = wz[0], wz[1], wz[2], wz[3]
                v = 0.0
                for a in range(4):
                    va = 0.0
                    for b in range(4):
                        row = coef[ix[a], iy[b]]
                        va += wy[b] * (e0 * row[z0] + e1 * row[z1] + e2 * row[z2] + e3 * row[z3])
                    v += wx[a] * va
                acc += v
            out[t, i, j] = acc * inv


def _spline_coefficients(vol):
    """Cubic B-spline coefficients as ``map_coordinates(order=3, mode='constant')`` uses them."""
    return np.ascontiguousarray(ndimage.spline_filter(vol, order=3, mode="constant"), dtype=np.float64)


def project_real_space(vol, rots, oversample=1, coef=None):
    """Real-space projections of a voxel map: rotate by cubic interpolation, sum along z.

    ``(P R_w f)[i, j] = sum_k f(w^T (i - R, j - R, k - R))`` with ``f`` the cubic
    B-spline interpolant of the map about the centre voxel ``R = n // 2`` and zero
    outside the map, i.e. ``scipy.ndimage.map_coordinates(vol, w^T r + R, order=3,
    mode='constant').sum(axis=2)`` (Method 1 of MODEL.md section 1).

    Parameters
    ----------
    vol : ndarray, shape (n, n, n)
        The map, axes x, y, z.
    rots : ndarray, shape (K, 3, 3)
        Rotations ``w``; ``R_w f(r) = f(w^T r)``.
    oversample : int, optional
        Samples per voxel along each ray (weighted ``1 / oversample``), default 1.
    coef : ndarray, shape (n, n, n), optional
        Precomputed spline coefficients of ``vol`` (internal reuse).

    Returns
    -------
    images : ndarray, shape (K, n, n)
        Image axis 0 is x (volume axis 0), axis 1 is y.
    """
    vol = np.asarray(vol, dtype=np.float64)
    if coef is None:
        coef = _spline_coefficients(vol)
    rots = np.ascontiguousarray(np.asarray(rots, dtype=np.float64).reshape(-1, 3, 3))
    out = np.empty((len(rots), vol.shape[0], vol.shape[0]))
    if len(rots):
        _project_real(coef, rots, int(oversample), out)
    return out


# --------------------------------------------------------------------------- simulation


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
        Requested SNR at the generation size (MODEL.md section 1).
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

    @property
    def shape(self):
        """Micrograph shape ``(N0, N1)``."""
        return self.micrographs[0].shape

    @property
    def count(self):
        """Number of micrographs."""
        return len(self.micrographs)


def _check_volume(volume):
    vol = np.asarray(volume)
    if vol.ndim != 3 or len(set(vol.shape)) != 1 or vol.size == 0:
        raise NumbaemError(
            f"volume has shape {vol.shape}; pass a cubic 3-D map of shape (L0, L0, L0)"
        )
    if not (np.issubdtype(vol.dtype, np.floating) or np.issubdtype(vol.dtype, np.integer)):
        raise NumbaemError(f"volume has dtype {vol.dtype}; pass a real-valued map")
    vol = vol.astype(np.float64)
    if not np.all(np.isfinite(vol)):
        raise NumbaemError("volume holds NaN or inf voxels; replace them before simulating")
    return vol


def _check_positive(name, value, example):
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, (bool, np.bool_)) or not np.isfinite(v) or v <= 0:
        raise NumbaemError(f"{name}={value!r} is not a positive finite number; pass e.g. {name}={example}")
    return v


def _crop_gain(M, Nf):
    """Variance gain ``|K| / Nf`` of a Fourier crop of white noise from ``Nf`` to ``M``."""
    if M == Nf:
        return 1.0
    return (M + (1 if M % 2 == 0 else 0)) / Nf


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


def simulate_micrographs(volume, L, *, micrograph_size, method=2, density=0.1, snr=1.0,
                         spacing="separated", count=1, lmax=None, rng, oversample=1):
    """Simulate micrographs of a volume with known positions, rotations and noise.

    MODEL.md section 1; see the module docstring for the two methods, the scale, the
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
        :func:`default_lmax`.
    rng : numpy.random.Generator or int
        Source of randomness; an int is used as a seed and recorded.
    oversample : int, optional
        Method 1 only: samples per voxel along each projection ray.

    Returns
    -------
    Simulation

    Raises
    ------
    NumbaemError
        On invalid input, or when the projections cannot be placed.
    """
    seed = None
    if _is_int(rng) and rng >= 0:
        seed = int(rng)
        rng = np.random.default_rng(seed)
    rng = _check_rng(rng)
    vol = _check_volume(volume)
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
    N = _check_shape(micrograph_size)
    if min(N) < 2 * L:
        raise NumbaemError(
            f"micrograph_size={micrograph_size!r} is smaller than 2 L = {2 * L} on some "
            f"axis; pass a micrograph of at least {2 * L} x {2 * L} pixels"
        )
    gamma = _check_positive("density", density, 0.1)
    snr = _check_positive("snr", snr, 1.0)
    if not _is_int(count) or count < 1:
        raise NumbaemError(f"count={count!r} is not a whole number >= 1; ask for 1 or more micrographs")
    count = int(count)
    _spacing_distance(spacing, L)
    if not _is_int(oversample) or oversample < 1:
        raise NumbaemError(f"oversample={oversample!r} is not a whole number >= 1; pass oversample=1")
    oversample = int(oversample)
    top = default_lmax(L)
    if lmax is None:
        lmax = top
    elif not _is_int(lmax) or not 0 <= lmax <= top:
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
    rotations = [random_rotations(T, rng) for _ in range(count)]

    clean = []
    if method == 2:
        L_gen = L
        energy = 0.0
        for pos, rots in zip(positions, rotations):
            proj = project(theta, basis, rots)
            energy += float(np.sum(proj**2))
            img = np.zeros(N)
            for (s0, s1), p in zip(pos, proj):
                img[s0:s0 + L, s1:s1 + L] += p
            clean.append(img)
        sigma2_gen = energy / (count * T) / (L_gen**2 * snr)
        sigma2 = sigma2_gen
        micrographs = [c + rng.normal(0.0, math.sqrt(sigma2), N) for c in clean]
    else:
        L_gen = L0
        Nf = tuple(int(round(n * L0 / L)) for n in N)
        coef = _spline_coefficients(vol)
        scale = L / L0
        energy = 0.0
        for pos, rots in zip(positions, rotations):
            full = _full_positions(pos, N, Nf, L, L0)
            img = np.zeros(Nf)
            for c0 in range(0, T, _CHUNK):
                proj = project_real_space(vol, rots[c0:c0 + _CHUNK], oversample, coef=coef)
                energy += float(np.sum(proj**2))
                for (s0, s1), p in zip(full[c0:c0 + _CHUNK], proj):
                    _add_clipped(img, p, int(s0), int(s1))
            clean.append(downsample_image(img, N) * scale if Nf != N else img)
            del img
        sigma2_gen = energy / (count * T) / (L_gen**2 * snr)
        sigma2 = sigma2_gen * _crop_gain(N[0], Nf[0]) * _crop_gain(N[1], Nf[1]) * scale**2
        micrographs = []
        for c in clean:
            noise = rng.normal(0.0, math.sqrt(sigma2_gen), Nf)
            if Nf != N:
                noise = downsample_image(noise, N) * scale
            micrographs.append(c + noise)
            del noise

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
    )
    logger.info(
        "simulated %d micrograph(s) of %d x %d, %d projections each (density %.3g), "
        "method %d, L=%d from L0=%d, SNR %.3g (%.3g after downsampling), sigma2=%.4g",
        count, N[0], N[1], T, sim.density_achieved, method, L, L0, snr, snr_down, sigma2,
    )
    return sim


# --------------------------------------------------------------------------- output


def _output_paths(out_path, count):
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
    command, file names) and ``MIC.truth.mrc`` (the band-limited truth, side ``L``).
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
        ``pixel_size * L0 / L``.

    Returns
    -------
    paths : list of pathlib.Path
        The files written: micrographs, then the JSON, then the truth volume.

    Raises
    ------
    NumbaemError
        If an output exists (without ``force``), a directory is missing, or an
        argument is invalid; nothing is written then.
    """
    if not isinstance(sim, Simulation):
        raise NumbaemError(f"sim is a {type(sim).__name__}, not a Simulation; pass the result of simulate_micrographs")
    if pixel_size is not None:
        pixel_size = _check_positive("pixel_size", pixel_size, 1.0)
        out_pixel = pixel_size * sim.L0 / sim.L
    else:
        out_pixel = None
    if command is not None and not isinstance(command, str):
        command = " ".join(str(c) for c in command)
    mics, json_path, truth_path = _output_paths(out_path, sim.count)
    paths = mics + [json_path, truth_path]
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
            "R_w f(r) = f(w^T r) and projections integrate along z (MODEL.md section 1)"
        ),
        "positions": [np.asarray(p).tolist() for p in sim.positions],
        "rotations": [np.asarray(r).tolist() for r in sim.rotations],
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
    except BaseException:
        for p in written:
            try:
                p.unlink()
            except OSError:
                logger.warning("could not remove %s after a failed write", p)
        raise
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths
