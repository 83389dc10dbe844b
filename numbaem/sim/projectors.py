"""The real-space projector of Method 1 (theory section 1): rotate a voxel map by cubic B-spline
interpolation and integrate along z.

This projector is independent of the Fourier-Bessel operator of :mod:`numbaem.model.projection`,
so micrographs made with it do not share the reconstruction's discretisation (no inverse crime).
"""
import math

import numpy as np
from numba import prange
from scipy import ndimage

from ..runtime.jit import jit, pjit


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


def spline_coefficients(vol):
    """Cubic B-spline coefficients as ``map_coordinates(order=3, mode='constant')`` uses them."""
    return np.ascontiguousarray(ndimage.spline_filter(vol, order=3, mode="constant"), dtype=np.float64)


def project_real_space(vol, rots, oversample=1, coef=None):
    """Real-space projections of a voxel map: rotate by cubic interpolation, sum along z.

    ``(P R_w f)[i, j] = sum_k f(w^T (i - R, j - R, k - R))`` with ``f`` the cubic
    B-spline interpolant of the map about the centre voxel ``R = n // 2`` and zero
    outside the map, i.e. ``scipy.ndimage.map_coordinates(vol, w^T r + R, order=3,
    mode='constant').sum(axis=2)`` (Method 1 of theory section 1).

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
        coef = spline_coefficients(vol)
    rots = np.ascontiguousarray(np.asarray(rots, dtype=np.float64).reshape(-1, 3, 3))
    out = np.empty((len(rots), vol.shape[0], vol.shape[0]))
    if len(rots):
        _project_real(coef, rots, int(oversample), out)
    return out


# --------------------------------------------------------------------------- simulation
