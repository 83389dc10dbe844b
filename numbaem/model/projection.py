"""The projection operator ``A_w``: coefficients -> ``L x L`` projection (theory section 3).

    A_w [p, (l,m,s)] = sum_{N=-l}^{l} D^l_{N,m}(w) Phi_{l,s,N}[p],
    Phi_{l,s,N}(r, theta) = 2 pi i^N Y_l^N(pi/2, 0) e^{i N theta}
                            integral_0^c j_{l,s}(kappa) J_N(2 pi kappa r) kappa dkappa,

at the pixel centres ``x_p = (p0 - R, p1 - R)``, ``p = p0 L + p1``, ``r = |x_p|``,
``theta = atan2(p1 - R, p0 - R)``. The ``Phi`` images depend on no rotation and are
computed once per basis (the Hankel route: Gauss-Legendre on ``[0, c]``). The real
matrix ``A_w U`` is assembled in a parallel numba kernel, one rotation per task, using
``Phi_{l,s,-N} = conj(Phi_{l,s,N})`` and ``Y_l^N(pi/2, 0) = 0`` for odd ``l + N``.
"""
import functools
import logging
import math

import numpy as np
from numba import prange
from scipy import special

from ..runtime.jit import jit, pjit
from .basis import C_BAND
from ..runtime.errors import NumbaemError
from .rotations import _wigner_d_all, euler_zyz

logger = logging.getLogger(__name__)


def pixel_polar(L):
    """Polar coordinates ``(r, theta)`` of the ``L x L`` pixel centres, flattened ``p0 L + p1``."""
    R = L // 2
    p0, p1 = np.meshgrid(np.arange(L) - R, np.arange(L) - R, indexing="ij")
    return np.hypot(p0, p1).ravel().astype(np.float64), np.arctan2(p1, p0).ravel().astype(np.float64)


@functools.lru_cache(maxsize=16)
def phi_images(basis, n_quad=None):
    """The rotation-independent images ``Phi_{l,s,N}`` (Hankel route).

    Parameters
    ----------
    basis : FBBasis
    n_quad : int, optional
        Gauss-Legendre nodes on ``[0, c]``; default ``4 L + 16`` (``3 L`` already
        reaches round-off, theory section 3).

    Returns
    -------
    phi : ndarray, complex, shape (n_ls, 2 lmax + 1, L^2)
        ``phi[i, N + lmax, p]`` for the ``i``-th ``(l, s)`` pair of ``basis.ls_pairs``.
    """
    L, lmax = basis.L, basis.lmax
    n_quad = 4 * L + 16 if n_quad is None else int(n_quad)
    nodes, weights = np.polynomial.legendre.leggauss(n_quad)
    kappa = C_BAND * (nodes + 1) / 2
    wq = C_BAND / 2 * weights * kappa
    rad = basis.radial(kappa)                                  # (n_ls, n_quad)
    r, theta = pixel_polar(L)
    phi = np.zeros((len(basis.ls_pairs), 2 * lmax + 1, L * L), np.complex128)
    for N in range(-lmax, lmax + 1):
        J = special.jv(N, 2 * np.pi * np.outer(kappa, r))      # (n_quad, P)
        hank = (rad * wq) @ J                                  # (n_ls, P)
        ang = 2 * np.pi * (1j) ** N * np.exp(1j * N * theta)
        for i, (l, _) in enumerate(basis.ls_pairs):
            if abs(N) > l or (l + N) % 2:
                continue
            Y = special.sph_harm_y(l, N, np.pi / 2, 0.0).real
            phi[i, N + lmax] = Y * ang * hank[i]
    return phi


@jit
def _assemble_one(phi, ls_l, ls_col, ls_S, d, alpha, gamma, lmax, out):
    """Real columns of ``A_w U`` for one rotation into ``out`` (P, M)."""
    P = phi.shape[2]
    inv2 = 1.0 / math.sqrt(2.0)
    colp = np.empty(P, np.complex128)
    coln = np.empty(P, np.complex128)
    for i in range(ls_l.shape[0]):
        l = ls_l[i]
        Sl = ls_S[i]
        base = ls_col[i]
        for m in range(0, l + 1):
            colp[:] = 0.0
            coln[:] = 0.0
            for N in range(-l, l + 1):
                if (l + N) % 2 != 0:
                    continue
                dp = d[l, lmax + N, lmax + m]
                ph = -(N * alpha + m * gamma)
                Dp = complex(dp * math.cos(ph), dp * math.sin(ph))
                dn = d[l, lmax + N, lmax - m]
                ph = -(N * alpha - m * gamma)
                Dn = complex(dn * math.cos(ph), dn * math.sin(ph))
                for p in range(P):
                    f = phi[i, lmax + N, p]
                    colp[p] += Dp * f
                    coln[p] += Dn * f
            if m == 0:
                if l % 2 == 0:
                    for p in range(P):
                        out[p, base] = colp[p].real
                else:
                    for p in range(P):
                        out[p, base] = -colp[p].imag
            else:
                sg = 1.0 if (l + m) % 2 == 0 else -1.0
                ca = base + (2 * m - 1) * Sl
                cb = base + 2 * m * Sl
                for p in range(P):
                    out[p, ca] = (colp[p].real + sg * coln[p].real) * inv2
                    out[p, cb] = -(colp[p].imag - sg * coln[p].imag) * inv2


@pjit
def _build_A(phi, ls_l, ls_col, ls_S, angles, lmax, A):
    K = angles.shape[0]
    n = 2 * lmax + 1
    for k in prange(K):
        d = np.empty((lmax + 1, n, n))
        _wigner_d_all(angles[k, 1], lmax, d)
        _assemble_one(phi, ls_l, ls_col, ls_S, d, angles[k, 0], angles[k, 2], lmax, A[k])


def _layout(basis):
    ls = basis.ls_pairs
    ls_l = ls[:, 0].copy()
    ls_col = np.array([basis.index(l, 0, s) for l, s in ls], np.int64)
    ls_S = np.array([basis.S[l] for l, _ in ls], np.int64)
    return ls_l, ls_col, ls_S


def projection_matrices(basis, rots, out=None):
    """The real projection operators ``A_w U`` for a batch of rotations.

    Parameters
    ----------
    basis : FBBasis
    rots : ndarray, shape (K, 3, 3)
    out : ndarray, shape (K, L^2, M), optional
        Filled in place when given.

    Returns
    -------
    A : ndarray, float64, shape (K, L^2, M)
        ``A[k] @ theta`` is the projection for rotation ``k`` as a flat ``L^2`` image
        (pixel ``p0 L + p1``).
    """
    rots = np.asarray(rots, dtype=np.float64)
    if rots.ndim == 2:
        rots = rots[None]
    angles = euler_zyz(rots)
    K, P, M = len(rots), basis.L ** 2, basis.M
    if out is None:
        out = np.empty((K, P, M))
    elif out.shape != (K, P, M) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise NumbaemError(f"out has shape {out.shape}; expected a C-contiguous float64 array of shape {(K, P, M)}")
    ls_l, ls_col, ls_S = _layout(basis)
    _build_A(phi_images(basis), ls_l, ls_col, ls_S, angles, basis.lmax, out)
    return out


def project(theta, basis, rots):
    """Projections ``A_w theta`` as images.

    Parameters
    ----------
    theta : ndarray, shape (M,)
    basis : FBBasis
    rots : ndarray, shape (K, 3, 3)

    Returns
    -------
    images : ndarray, shape (K, L, L); image axis 0 is the first pixel coordinate
    """
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (basis.M,):
        raise NumbaemError(f"theta has shape {theta.shape}; expected ({basis.M},) for L={basis.L}, lmax={basis.lmax}")
    rots = np.asarray(rots, dtype=np.float64).reshape(-1, 3, 3)
    L = basis.L
    out = np.empty((len(rots), L, L))
    step = max(1, int(2 ** 27 // (L * L * basis.M * 8)))  # rotation chunks of at most 128 MiB of A
    for i in range(0, len(rots), step):
        A = projection_matrices(basis, rots[i:i + step])
        out[i:i + step] = (A @ theta).reshape(-1, L, L)
    return out




@pjit
def filter_images(x, filt_t, out):
    """``out[k] = filt @ x[k]`` for flattened images ``x`` (n, P), given ``filt_t = filt.T`` (P, P) C-contiguous.

    The E-step's CTF / whitening filter ``Psi_g`` (theory section 11) applied to a pass's
    projections without BLAS: a threaded BLAS called between the parallel kernels leaves
    its threads spinning on the cores those kernels need (measured: the search's kernels
    ran 1.7-2x slower inside ``numbaem reconstruct`` on 2 cores). Each image is an
    axpy over ``filt``'s columns, so the loop vectorises without reassociating a sum.
    """
    n, P = x.shape
    for k in prange(n):
        o = out[k]
        o[:] = 0.0
        xk = x[k]
        for q in range(P):
            v = xk[q]
            fq = filt_t[q]
            for p in range(P):
                o[p] += fq[p] * v


@pjit
def _steer(q, dir_of, alpha, lmax, out):
    """``out[k] = Re sum_N e^{-i N alpha_k} q[dir_of[k], N + lmax]`` (theory section 3, in-plane phases)."""
    n = out.shape[0]
    P = out.shape[1]
    for k in prange(n):
        d = dir_of[k]
        a = alpha[k]
        o = out[k]
        o[:] = 0.0
        for N in range(-lmax, lmax + 1):
            c = math.cos(N * a)
            sn = math.sin(N * a)
            qn = q[d, N + lmax]
            for p in range(P):
                v = qn[p]
                o[p] += c * v.real + sn * v.imag


def direction_images(theta, basis, beta, gamma):
    """``q_{d,N}[p] = sum_{l,s} Phi_{l,s,N}[p] sum_m D^l_{N,m}(Ry(beta_d) Rz(gamma_d)) x[l,m,s]``.

    The projection of rotation ``Rz(alpha) Ry(beta_d) Rz(gamma_d)`` is then
    ``Re sum_N e^{-i N alpha} q_{d,N}`` (theory section 3: an in-plane rotation is a phase per
    ``N``), so all in-plane angles of one viewing direction share ``q``.

    Parameters
    ----------
    theta : ndarray, shape (M,)
    basis : FBBasis
    beta, gamma : ndarray, shape (D,)
        The directions' Euler angles.

    Returns
    -------
    q : ndarray, complex, shape (D, 2 lmax + 1, L^2)
    """
    from .rotations import wigner_d
    lmax, L = basis.lmax, basis.L
    x = basis.to_complex(np.asarray(theta, dtype=np.float64))
    phi = phi_images(basis)                                     # (n_ls, 2 lmax + 1, L^2)
    D = len(beta)
    d = np.stack([wigner_d(lmax, b) for b in beta]) if D else np.zeros((0, lmax + 1, 2 * lmax + 1, 2 * lmax + 1))
    xr = np.zeros((D, len(basis.ls_pairs), 2 * lmax + 1), np.complex128)   # x'[d, (l,s), N]
    i = 0
    for l in range(lmax + 1):
        Sl = basis.S[l]
        m = np.arange(-l, l + 1)
        xl = x[basis.offsets[l]:basis.offsets[l + 1]].reshape(2 * l + 1, Sl)          # [m + l, s]
        rot = np.exp(-1j * np.outer(gamma, m))[:, :, None] * xl[None]                  # (D, m, s)
        dl = d[:, l, lmax - l:lmax + l + 1, lmax - l:lmax + l + 1]                     # (D, N, m)
        xr[:, i:i + Sl, lmax - l:lmax + l + 1] = np.einsum("dnm,dms->dsn", dl, rot)
        i += Sl
    q = np.einsum("din,inp->dnp", xr, phi)
    return q


def project_hopf(theta, basis, level, idx=None):
    """Projections ``A_w theta`` for rotations of the Hopf grid (:mod:`numbaem.model.hopf`), by steering.

    Equal to :func:`project` at ``hopf.rotations(level, idx)`` (to round-off), at a cost
    of ``(2 lmax + 1) L^2`` per rotation after ``(2 lmax + 1) n_ls L^2`` per viewing
    direction, instead of building ``A_w`` (``L^2 M (2 lmax + 1)``) per rotation.

    Parameters
    ----------
    theta : ndarray, shape (M,)
    basis : FBBasis
    level : int
    idx : ndarray of int, optional
        Tree-order indices (default: the whole level).

    Returns
    -------
    images : ndarray, shape (n, L, L)
    """
    from . import hopf
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (basis.M,):
        raise NumbaemError(f"theta has shape {theta.shape}; expected ({basis.M},) for L={basis.L}, lmax={basis.lmax}")
    idx = np.arange(hopf.size(level)) if idx is None else np.asarray(idx, dtype=np.int64)
    ang = hopf.euler_angles(level, idx)
    pix, _ = hopf.tree_to_cells(level, idx)
    upix, dir_of = np.unique(pix, return_inverse=True)
    L = basis.L
    out = np.empty((len(idx), L * L))
    first = np.zeros(len(upix), np.int64)
    first[dir_of[::-1]] = np.arange(len(idx))[::-1]        # one rotation of each direction
    step = max(1, int(2 ** 26 // ((2 * basis.lmax + 1) * L * L * 16)))   # q in blocks of at most 64 MiB
    for d0 in range(0, len(upix), step):
        sl = slice(d0, min(d0 + step, len(upix)))
        q = direction_images(theta, basis, ang[first[sl], 1], ang[first[sl], 2])
        sel = np.nonzero((dir_of >= sl.start) & (dir_of < sl.stop))[0]
        part = np.empty((len(sel), L * L))
        _steer(q, dir_of[sel] - sl.start, ang[sel, 0], basis.lmax, part)
        out[sel] = part
    return out.reshape(-1, L, L)


class Operator:
    """The projection operators of one stage: basis, rotation grid and (if it fits) ``A``.

    ``A`` (K x L^2 x M) is kept when it takes at most ``max_bytes``; otherwise it is
    rebuilt in blocks of rotations whenever needed (twice an iteration).
    """

    def __init__(self, basis, rots, max_bytes):
        self.basis = basis
        self.rots = rots
        self.K = len(rots)
        per_rot = basis.L ** 2 * basis.M * 8
        self.block = max(1, min(self.K, int(max_bytes // per_rot)))
        self.A = projection_matrices(basis, rots) if self.block >= self.K else None

    @property
    def nbytes(self):
        return 0 if self.A is None else self.A.nbytes

    def blocks(self):
        """Yield ``(slice, A_block)`` over all rotations."""
        if self.A is not None:
            yield slice(0, self.K), self.A
            return
        for i in range(0, self.K, self.block):
            sl = slice(i, min(i + self.block, self.K))
            yield sl, projection_matrices(self.basis, self.rots[sl])

    def project(self, theta):
        L = self.basis.L
        out = np.empty((self.K, L, L))
        for sl, A in self.blocks():
            out[sl] = (A @ theta).reshape(-1, L, L)
        return out


__all__ = ["Operator", "direction_images", "phi_images", "pixel_polar", "projection_matrices", "project", "project_hopf"]
