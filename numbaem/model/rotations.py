"""Rotations (theory section 8): Haar-random draws, near-uniform grids, Wigner D-matrices.

Conventions
-----------
A rotation is a ``3 x 3`` matrix ``w`` acting on column vectors; ``R_w f (r) = f(w^T r)``.
Euler angles are active ZYZ: ``w = Rz(alpha) Ry(beta) Rz(gamma)`` (the angles of
``scipy.spatial.transform.Rotation.from_matrix(w).as_euler('ZYZ')``), and

    D^l_{N,m}(w) = exp(-i N alpha) d^l_{N,m}(beta) exp(-i m gamma),

with ``d`` the standard Wigner small-d (``d^1_{1,0} = -sin(beta)/sqrt(2)``), so that
``Y_l^m(w^T r) = sum_N D^l_{N,m}(w) Y_l^N(r)`` and ``D(w1 w2) = D(w1) D(w2)``.

Small-d is computed by the three-term recursion in ``l`` of Kostelec and Rockmore
("FFTs on the rotation group", J. Fourier Anal. Appl. 14, 2008), seeded on the border
``max(|N|, |m|) = l`` by the closed form; it stays accurate far beyond ``l = 20`` where
the explicit factorial sum loses digits by cancellation.
"""
import logging
import math

import numpy as np
from numba import prange
from scipy.spatial.transform import Rotation

from ..runtime.jit import jit, pjit
from ..runtime.errors import NumbaemError
from ..runtime.validate import whole_number

logger = logging.getLogger(__name__)

# Constants of the super-Fibonacci spiral (Alexa, "Super-Fibonacci Spirals: Fast,
# Low-Discrepancy Sampling of SO(3)", CVPR 2022): phi = sqrt(2), psi the real root of
# psi^4 = psi + 4.
_SF_PHI = math.sqrt(2.0)
_SF_PSI = 1.533751168755204288118041


def quaternions_to_matrices(q):
    """Unit quaternions ``(w, x, y, z)`` (scalar first), shape (n, 4) -> matrices (n, 3, 3)."""
    q = np.asarray(q, dtype=np.float64)
    return Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()


def matrices_to_quaternions(rots):
    """Rotation matrices (n, 3, 3) -> unit quaternions ``(w, x, y, z)`` with ``w >= 0``."""
    q = Rotation.from_matrix(np.asarray(rots, dtype=np.float64)).as_quat()[:, [3, 0, 1, 2]]
    q[q[:, 0] < 0] *= -1
    return q


def random_rotations(n, rng):
    """Haar-uniform random rotations.

    Parameters
    ----------
    n : int
        Number of rotations.
    rng : numpy.random.Generator

    Returns
    -------
    rots : ndarray, shape (n, 3, 3)
    """
    n = whole_number("n", n, 1)
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return quaternions_to_matrices(q)


def rotation_grid(K):
    """Deterministic near-uniform grid of ``K`` rotations (super-Fibonacci spiral).

    Alexa, CVPR 2022: ``s = i + 1/2``, ``r = sqrt(s/K)``, ``R = sqrt(1 - s/K)``,
    ``alpha = 2 pi s / phi``, ``beta = 2 pi s / psi``,
    ``q = (r sin alpha, r cos alpha, R sin beta, R cos beta)``. Any ``K`` works; the
    covering radius falls like ``K^(-1/3)`` (see :func:`covering_radius`).

    Returns
    -------
    rots : ndarray, shape (K, 3, 3)
    """
    K = whole_number("K", K, 1)
    s = np.arange(K) + 0.5
    r = np.sqrt(s / K)
    R = np.sqrt(1.0 - s / K)
    alpha = 2 * np.pi * s / _SF_PHI
    beta = 2 * np.pi * s / _SF_PSI
    q = np.stack([r * np.sin(alpha), r * np.cos(alpha), R * np.sin(beta), R * np.cos(beta)], axis=1)
    return quaternions_to_matrices(q)


def geodesic_distance(r1, r2):
    """Angle (radians) of ``r1^T r2`` for batches of rotations (broadcasting)."""
    tr = np.einsum("...ij,...ij->...", np.asarray(r1), np.asarray(r2))
    return np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0))


def _nearest_angle(qgrid, qprobe):
    """Angle from each probe quaternion to its nearest grid rotation (radians)."""
    out = np.empty(len(qprobe))
    step = max(1, 4_000_000 // max(len(qgrid), 1))
    for i in range(0, len(qprobe), step):
        dots = np.abs(qprobe[i:i + step] @ qgrid.T).max(axis=1)
        out[i:i + step] = 2 * np.arccos(np.clip(dots, 0.0, 1.0))
    return out


def covering_radius(rots, n_probe=20000, rng=None, refine=32):
    """Covering radius of a rotation set: the largest angle from any rotation to the set.

    Estimated from below by ``n_probe`` Haar-random probes, then the ``refine`` worst
    probes are pushed uphill (Nelder-Mead on a local rotation vector) to the local
    maxima of the distance to the set, which are the true candidates. The estimate is
    therefore a lower bound that is tight to a few percent for these sizes.

    Parameters
    ----------
    rots : ndarray, shape (K, 3, 3)
    n_probe : int
    rng : numpy.random.Generator, optional (default seeded 0: the figure is reproducible)

    Returns
    -------
    radius : float
        In radians.
    """
    from scipy.optimize import minimize

    rng = np.random.default_rng(0) if rng is None else rng
    qgrid = matrices_to_quaternions(rots)
    probes = random_rotations(n_probe, rng)
    qprobe = matrices_to_quaternions(probes)
    d = _nearest_angle(qgrid, qprobe)
    best = d.max()
    for idx in np.argsort(d)[-refine:]:
        base = Rotation.from_matrix(probes[idx])

        def neg(v, base=base):
            q = (Rotation.from_rotvec(v) * base).as_quat()[[3, 0, 1, 2]]
            return -_nearest_angle(qgrid, q[None])[0]

        res = minimize(neg, np.zeros(3), method="Nelder-Mead",
                       options=dict(initial_simplex=0.02 * np.vstack([np.zeros(3), np.eye(3)]),
                                    xatol=1e-6, fatol=1e-9, maxiter=400))
        best = max(best, -res.fun)
    return float(best)


def euler_zyz(rots):
    """Active ZYZ Euler angles ``(alpha, beta, gamma)`` with ``w = Rz(a) Ry(b) Rz(g)``.

    Parameters
    ----------
    rots : ndarray, shape (K, 3, 3)

    Returns
    -------
    angles : ndarray, shape (K, 3)
    """
    rots = np.asarray(rots, dtype=np.float64)
    if rots.ndim != 3 or rots.shape[1:] != (3, 3):
        raise NumbaemError(f"rotations have shape {rots.shape}; expected (K, 3, 3) matrices")
    return _euler_zyz(rots)


@jit
def _euler_zyz(rots):
    K = rots.shape[0]
    out = np.empty((K, 3))
    for k in range(K):
        w = rots[k]
        cb = min(1.0, max(-1.0, w[2, 2]))
        sb = math.sqrt(w[0, 2] ** 2 + w[1, 2] ** 2)
        beta = math.atan2(sb, cb)
        if sb > 1e-12:
            alpha = math.atan2(w[1, 2], w[0, 2])
            gamma = math.atan2(w[2, 1], -w[2, 0])
        elif cb > 0:  # beta = 0: w = Rz(alpha + gamma)
            alpha = math.atan2(w[1, 0], w[0, 0])
            gamma = 0.0
        else:  # beta = pi: w = Rz(alpha) Ry(pi) Rz(gamma), take gamma = 0
            alpha = math.atan2(-w[1, 0], -w[0, 0])
            gamma = 0.0
        out[k, 0] = alpha
        out[k, 1] = beta
        out[k, 2] = gamma
    return out


@jit
def _lbinom_half(n, k):
    # 0.5 * log(n choose k)
    return 0.5 * (math.lgamma(n + 1.0) - math.lgamma(k + 1.0) - math.lgamma(n - k + 1.0))


@jit
def _wigner_d_all(beta, lmax, d):
    """Fill ``d[l, N + lmax, m + lmax] = d^l_{N,m}(beta)`` for ``l <= lmax`` (zeros elsewhere)."""
    c = math.cos(beta / 2.0)
    s = math.sin(beta / 2.0)
    cb = math.cos(beta)
    d[:] = 0.0
    o = lmax
    for l in range(lmax + 1):
        # border, closed form: d^l_{l,m} = sqrt(C(2l, l+m)) c^(l+m) (-s)^(l-m)
        for m in range(-l, l + 1):
            v = math.exp(_lbinom_half(2 * l, l + m)) * c ** (l + m) * (-s) ** (l - m)
            d[l, o + l, o + m] = v                                   # row N = l
            d[l, o - m, o - l] = v                                   # d_{-m,-l} = d_{l,m}
            sg = 1.0 if (l - m) % 2 == 0 else -1.0
            d[l, o + m, o + l] = sg * v                              # d_{m,l} = (-1)^(l-m) d_{l,m}
            d[l, o - l, o - m] = sg * v                              # d_{-l,-m} = d_{m,l}
        if l == 1:
            d[1, o, o] = cb
        elif l >= 2:
            j = l - 1
            for N in range(-j, j + 1):
                for m in range(-j, j + 1):
                    a = (j + 1.0) * (2 * j + 1.0) / math.sqrt(((j + 1.0) ** 2 - m * m) * ((j + 1.0) ** 2 - N * N))
                    t = (cb - m * N / (j * (j + 1.0))) * d[j, o + N, o + m]
                    if abs(N) < j and abs(m) < j:
                        t -= math.sqrt((j * j - m * m) * (j * j - N * N)) / (j * (2 * j + 1.0)) * d[j - 1, o + N, o + m]
                    d[l, o + N, o + m] = a * t


def wigner_d(lmax, beta):
    """Wigner small-d matrices for all ``l <= lmax``.

    Returns
    -------
    d : ndarray, shape (lmax + 1, 2 lmax + 1, 2 lmax + 1)
        ``d[l, N + lmax, m + lmax] = d^l_{N,m}(beta)``; entries with ``|N|`` or ``|m| > l`` are 0.
    """
    lmax = int(lmax)
    if lmax < 0:
        raise NumbaemError(f"lmax={lmax} is negative; use lmax >= 0")
    d = np.zeros((lmax + 1, 2 * lmax + 1, 2 * lmax + 1))
    _wigner_d_all(float(beta), lmax, d)
    return d


@pjit
def _wigner_D_batch(angles, lmax, out):
    K = angles.shape[0]
    n = 2 * lmax + 1
    for k in prange(K):
        d = np.zeros((lmax + 1, n, n))
        _wigner_d_all(angles[k, 1], lmax, d)
        a = angles[k, 0]
        g = angles[k, 2]
        for l in range(lmax + 1):
            for N in range(-l, l + 1):
                for m in range(-l, l + 1):
                    ph = -(N * a + m * g)
                    v = d[l, lmax + N, lmax + m]
                    out[k, l, lmax + N, lmax + m] = complex(v * math.cos(ph), v * math.sin(ph))


def wigner_D(lmax, rots):
    """Wigner D-matrices ``D^l_{N,m}(w)`` for a batch of rotations, ``l <= lmax``.

    Parameters
    ----------
    lmax : int
    rots : ndarray, shape (K, 3, 3)

    Returns
    -------
    D : ndarray, complex, shape (K, lmax + 1, 2 lmax + 1, 2 lmax + 1)
        ``D[k, l, N + lmax, m + lmax]``; entries outside ``|N|, |m| <= l`` are 0.
    """
    lmax = int(lmax)
    if lmax < 0:
        raise NumbaemError(f"lmax={lmax} is negative; use lmax >= 0")
    angles = euler_zyz(rots)
    out = np.zeros((len(angles), lmax + 1, 2 * lmax + 1, 2 * lmax + 1), dtype=np.complex128)
    _wigner_D_batch(angles, lmax, out)
    return out

