"""The volume model: a Fourier-Bessel expansion of the volume's Fourier transform (theory section 2).

    F(k) = sum_{l,m,s} x[l,m,s] j_{l,s}(|k|) Y_l^m(k/|k|),     |k| <= c = 1/2,

with ``j_{l,s}(kappa) = j_l(u_{l,s} kappa / c) sqrt(2) / (c^{3/2} |j_{l+1}(u_{l,s})|)`` and
``S_l = #{s : u_{l,s} < 2 pi c R}`` (Nyquist; the tie ``u_{0,R} = pi R`` excluded).

Coefficient layout
------------------
The real parameter vector ``theta`` (length ``M = sum_l (2l+1) S_l``) is ordered ``l``
first, then ``q = 0 .. 2l``, then ``s``: ``index = offset_l + q S_l + (s - 1)``, where
``q = 0`` is ``m = 0`` and ``q = 2m - 1`` / ``q = 2m`` are ``a_m`` / ``b_m`` for ``m > 0``:

    x[l,0,s]  = theta_0            (l even)    or   i theta_0   (l odd)
    x[l,m,s]  = (a_m + i b_m) / sqrt2,   x[l,-m,s] = (-1)^(l+m) (a_m - i b_m) / sqrt2.

So ``x = U theta`` with ``U^H U = I``. Because ``S_l`` depends on ``L`` only, the
coefficients of a smaller ``lmax`` are a prefix of those of a larger one (frequency
marching copies the prefix). The complex vector ``x`` uses the same layout with
``q = m + l``.
"""
import dataclasses
import functools
import logging
import math

import numpy as np
from scipy import special
from scipy.optimize import brentq

from ..runtime.errors import NumbaemError
from ..runtime.fourier import centered_fft, centered_ifft
from ..runtime.validate import check_L

logger = logging.getLogger(__name__)

C_BAND = 0.5  # the band limit c (Nyquist), cycles per pixel


@functools.lru_cache(maxsize=None)
def spherical_bessel_zeros(l, umax):
    """Positive zeros of the spherical Bessel function ``j_l`` below ``umax``.

    Found by bracketing sign changes on a fine grid (zeros of ``j_l`` are more than
    ``pi/2`` apart) and refining with Brent's method to round-off.
    """
    xs = np.arange(max(l, 1) * 0.5 + 1e-3, umax + 1.0, 0.05)
    v = special.spherical_jn(l, xs)
    zeros = []
    for i in np.nonzero(np.sign(v[:-1]) * np.sign(v[1:]) < 0)[0]:
        z = brentq(lambda t: special.spherical_jn(l, t), xs[i], xs[i + 1], xtol=1e-15, rtol=1e-15)
        if z < umax:
            zeros.append(z)
    return tuple(zeros)


@dataclasses.dataclass(frozen=True)
class FBBasis:
    """Fourier-Bessel basis for volumes of side ``L`` up to angular order ``lmax``.

    Attributes
    ----------
    L, lmax : int
    R : int
        ``L // 2``.
    S : tuple of int
        ``S_l`` for ``l = 0 .. lmax`` (the Nyquist counts).
    M : int
        Number of real coefficients.
    """

    L: int
    lmax: int

    def __post_init__(self):
        check_L(self.L)
        if int(self.lmax) != self.lmax or self.lmax < 0:
            raise NumbaemError(f"lmax={self.lmax!r} must be a whole number >= 0")
        if self.S[-1] == 0:
            top = max(l for l, s in enumerate(self.S) if s > 0)
            raise NumbaemError(
                f"lmax={self.lmax} is too high for L={self.L}: no radial function of order "
                f"l={self.lmax} is below Nyquist; use lmax <= {top}")

    @staticmethod
    def max_lmax(L):
        """The highest angular order with at least one radial function below Nyquist for side ``L``."""
        L = check_L(L)
        umax = 2 * np.pi * C_BAND * (L // 2) - 1e-9
        l = 0
        while spherical_bessel_zeros(l + 1, umax):
            l += 1
        return l

    @property
    def R(self):
        return self.L // 2

    @functools.cached_property
    def zeros(self):
        """``zeros[l]``: the ``S_l`` zeros ``u_{l,s}`` used."""
        umax = 2 * np.pi * C_BAND * self.R - 1e-9
        return tuple(spherical_bessel_zeros(l, umax) for l in range(self.lmax + 1))

    @functools.cached_property
    def S(self):
        return tuple(len(z) for z in self.zeros)

    @functools.cached_property
    def offsets(self):
        off = [0]
        for l, s in enumerate(self.S):
            off.append(off[-1] + (2 * l + 1) * s)
        return tuple(off)

    @property
    def M(self):
        return self.offsets[-1]

    @functools.cached_property
    def ls_pairs(self):
        """Array (n_ls, 2) of the ``(l, s)`` pairs, ``s`` from 1, in layout order."""
        return np.array([(l, s + 1) for l in range(self.lmax + 1) for s in range(self.S[l])], dtype=np.int64)

    @functools.cached_property
    def u(self):
        """Array (n_ls,) of ``u_{l,s}`` in the order of :attr:`ls_pairs`."""
        return np.array([self.zeros[l][s - 1] for l, s in self.ls_pairs])

    def index(self, l, q, s):
        """Position of ``(l, q, s)`` in ``theta`` (``s`` from 1; ``q`` as in the module doc)."""
        return self.offsets[l] + q * self.S[l] + (s - 1)

    def radial(self, kappa):
        """Radial functions ``j_{l,s}(kappa)``, zero beyond ``c``.

        Parameters
        ----------
        kappa : ndarray, shape (n,)

        Returns
        -------
        ndarray, shape (n_ls, n), rows in the order of :attr:`ls_pairs`
        """
        kappa = np.asarray(kappa, dtype=np.float64)
        c = C_BAND
        out = np.empty((len(self.u), kappa.size))
        for i, ((l, _), u) in enumerate(zip(self.ls_pairs, self.u)):
            norm = math.sqrt(2.0) / (c ** 1.5 * abs(special.spherical_jn(l + 1, u)))
            out[i] = special.spherical_jn(l, u * kappa.ravel() / c) * norm
        out[:, kappa.ravel() > c] = 0.0
        return out

    @functools.cached_property
    def U_map(self):
        """Sparse form of ``x = U theta``: arrays ``(c1, w1, c2, w2)`` of length ``M``.

        Real coefficient ``r`` contributes ``w1[r] theta[r]`` to ``x[c1[r]]`` and
        ``w2[r] theta[r]`` to ``x[c2[r]]``.
        """
        M = self.M
        c1 = np.zeros(M, np.int64)
        c2 = np.zeros(M, np.int64)
        w1 = np.zeros(M, np.complex128)
        w2 = np.zeros(M, np.complex128)
        h = 1 / math.sqrt(2.0)
        for l in range(self.lmax + 1):
            for s in range(1, self.S[l] + 1):
                cidx = lambda m: self.offsets[l] + (m + l) * self.S[l] + (s - 1)  # noqa: E731
                r = self.index(l, 0, s)
                c1[r] = c2[r] = cidx(0)
                w1[r] = 1.0 if l % 2 == 0 else 1j
                for m in range(1, l + 1):
                    sg = (-1) ** (l + m)
                    ra, rb = self.index(l, 2 * m - 1, s), self.index(l, 2 * m, s)
                    c1[ra] = c1[rb] = cidx(m)
                    c2[ra] = c2[rb] = cidx(-m)
                    w1[ra], w2[ra] = h, sg * h
                    w1[rb], w2[rb] = 1j * h, -1j * sg * h
        return c1, w1, c2, w2

    def to_complex(self, theta):
        """``x = U theta`` (complex coefficients in the complex layout)."""
        theta = np.asarray(theta)
        c1, w1, c2, w2 = self.U_map
        flat = theta.reshape(-1, self.M)
        x = np.zeros(flat.shape, np.complex128)
        for row, t in zip(x, flat):
            np.add.at(row, c1, w1 * t)
            np.add.at(row, c2, w2 * t)
        return x.reshape(theta.shape)

    def to_real(self, x):
        """``theta = U^H x``; for ``x`` of a real volume this is real (imaginary part dropped)."""
        c1, w1, c2, w2 = self.U_map
        return (np.conj(w1) * x[..., c1] + np.conj(w2) * x[..., c2]).real

    def complex_columns_to_real(self, A):
        """``A U`` for a matrix ``A`` whose last axis is in the complex layout (real part)."""
        c1, w1, c2, w2 = self.U_map
        return (A[..., c1] * w1 + A[..., c2] * w2).real

    def evaluate_fourier(self, k):
        """Complex design matrix ``j_{l,s}(|k|) Y_l^m(k/|k|)`` at frequencies ``k``.

        Parameters
        ----------
        k : ndarray, shape (n, 3)
            Frequencies in cycles per pixel.

        Returns
        -------
        B : ndarray, complex, shape (n, M) in the complex layout
        """
        k = np.asarray(k, dtype=np.float64)
        kappa = np.linalg.norm(k, axis=1)
        polar = np.arccos(np.clip(np.divide(k[:, 2], kappa, out=np.ones_like(kappa), where=kappa > 0), -1, 1))
        azim = np.arctan2(k[:, 1], k[:, 0])
        rad = self.radial(kappa)
        B = np.zeros((len(k), self.M), np.complex128)
        i = 0
        for l in range(self.lmax + 1):
            Sl = self.S[l]
            for m in range(-l, l + 1):
                Y = special.sph_harm_y(l, m, polar, azim)
                for s in range(Sl):
                    B[:, self.offsets[l] + (m + l) * Sl + s] = rad[i + s] * Y
            i += Sl
        return B

    def evaluate_fourier_real(self, k):
        """``evaluate_fourier(k) U``: complex matrix (n, M) acting on the real ``theta``."""
        c1, w1, c2, w2 = self.U_map
        B = self.evaluate_fourier(k)
        return B[:, c1] * w1 + B[:, c2] * w2

    @functools.cached_property
    def grid_frequencies(self):
        """Frequencies of the centred ``L^3`` grid inside the ball, and their flat indices.

        Returns
        -------
        k : ndarray, shape (n_in, 3)
        flat : ndarray, shape (n_in,) indices into the raveled ``L^3`` grid
        """
        L, R = self.L, self.R
        f = (np.arange(L) - R) / L
        kx, ky, kz = np.meshgrid(f, f, f, indexing="ij")
        k = np.stack([kx.ravel(), ky.ravel(), kz.ravel()], axis=1)
        inside = np.linalg.norm(k, axis=1) <= C_BAND + 1e-12
        return k[inside], np.nonzero(inside)[0]

    @functools.cached_property
    def _grid_design(self):
        k, _ = self.grid_frequencies
        return self.evaluate_fourier_real(k)

    @functools.cached_property
    def _grid_gram_cho(self):
        from scipy.linalg import cho_factor
        B = self._grid_design
        G = (B.conj().T @ B).real
        return cho_factor(G)


def expand(vol, basis):
    """Coefficients of a volume: least squares against its centred DFT inside the ball.

    theory section 2: ``theta = argmin sum_{|k| <= c} |F_grid(k) - (B U theta)(k)|^2`` over
    the grid frequencies ``k = (n - R)/L``, with ``F_grid = fftshift(fftn(ifftshift(vol)))``.
    Solved through the normal equations (the grid samples the orthonormal basis almost
    orthogonally, so the Gram matrix is well conditioned; Cholesky).

    Parameters
    ----------
    vol : ndarray, shape (L, L, L)
    basis : FBBasis

    Returns
    -------
    theta : ndarray, shape (M,)
    """
    from scipy.linalg import cho_solve

    vol = np.asarray(vol, dtype=np.float64)
    L = basis.L
    if vol.shape != (L, L, L):
        raise NumbaemError(f"volume has shape {vol.shape}; the basis is for side L={L}: downsample it to ({L}, {L}, {L})")
    if not np.all(np.isfinite(vol)):
        raise NumbaemError("volume has NaN or infinite voxels; replace them before expanding")
    _, flat = basis.grid_frequencies
    F = centered_fft(vol).ravel()[flat]
    B = basis._grid_design
    rhs = (B.conj().T @ F).real
    return cho_solve(basis._grid_gram_cho, rhs)


def fourier_grid(theta, basis):
    """``F`` evaluated at the centred ``L^3`` grid frequencies (zero outside the ball)."""
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (basis.M,):
        raise NumbaemError(f"theta has shape {theta.shape}; expected ({basis.M},) for L={basis.L}, lmax={basis.lmax}")
    _, flat = basis.grid_frequencies
    L = basis.L
    F = np.zeros(L ** 3, np.complex128)
    F[flat] = basis._grid_design @ theta
    return F.reshape(L, L, L)


def synthesize(theta, basis):
    """Volume of side ``L`` from coefficients (theory section 2).

    ``f = fftshift(ifftn(ifftshift(F_grid))).real`` with ``F_grid`` the expansion at the
    grid frequencies inside the ball and zero outside (numpy's ``1/L^3`` scale).

    Returns
    -------
    vol : ndarray, shape (L, L, L)
    """
    return centered_ifft(fourier_grid(theta, basis)).real


def resize_theta(theta, basis_from, basis_to):
    """Copy coefficients between bases of the same ``L`` (frequency marching, section 7).

    Coefficients with ``l`` in both bases are copied; new ones are zero.
    """
    if basis_from.L != basis_to.L:
        raise NumbaemError(f"cannot copy coefficients from L={basis_from.L} to L={basis_to.L}; downsample the volume instead")
    out = np.zeros(basis_to.M)
    n = min(basis_from.M, basis_to.M)
    out[:n] = np.asarray(theta)[:n]
    return out
