"""M-step (MODEL section 6): ``upsilon``, ``H``, ``b`` from the sufficient statistics, and the solve.

    upsilon_new = (1/Nd) sum_j w_{j,empty}
    H = sum_k A_k^T diag(h_k) A_k,   h_k = crop_LxL(IFFT2(FFT2(Z 1) conj(FFT2(W_k))))
    b = sum_k A_k^T g_k,             g_k = crop_LxL(IFFT2(G_k))

No per-shift matrix is ever formed: ``(C T_l Z)^T (C T_l Z)`` is the 0/1 mask of the
pixels that stay in the patch, so the sum over shifts collapses into ``h_k``. ``H`` is
accumulated over blocks of rotations as ``B^T B`` with ``B = sqrt(h_k) A_k`` stacked
(one BLAS product per block); ``h_k >= 0`` as a sum of masks with non-negative weights.
"""
import dataclasses
import logging
import math

import numpy as np
from scipy import linalg

from ..runtime import fft
from .estep import box_spectrum
from ..runtime.errors import NumbaemError

logger = logging.getLogger(__name__)


def mask_weights(W, L):
    """``h_k = sum_l W_k[l] m_l`` for every rotation: (K, 2L, 2L) -> (K, L^2).

    Computed in one ``(K, 2L, 2L)`` transform workspace (the same one as
    :func:`data_images` and the projection spectra); only the result is allocated.
    """
    K = len(W)
    ws = fft.workspace((K, 2 * L, 2 * L))
    ws.real[...] = W
    spec = ws.forward()
    np.conjugate(spec, out=spec)
    spec *= box_spectrum(L)[None]
    h = ws.backward()[:, :L, :L].reshape(K, L * L)
    return np.maximum(h, 0.0)  # a copy; clips round-off below 0 (h >= 0 exactly)


def data_images(G, L):
    """``g_k = crop(IFFT2(G_k))``: (K, 2L, L+1) -> (K, L^2), through the same workspace."""
    K = len(G)
    ws = fft.workspace((K, 2 * L, 2 * L))
    ws.spec[...] = G
    return ws.backward()[:, :L, :L].reshape(K, L * L).copy()


def normal_equations(A_blocks, W, G, L, M, max_block_bytes=16 << 20):
    """``H`` and ``b`` of section 6.

    Parameters
    ----------
    A_blocks : iterable of (slice, ndarray)
        Blocks of the operator: ``(rotation slice, A[slice])`` with ``A`` of shape
        (K, L^2, M); a generator may build them on demand.
    W : ndarray, shape (K, 2L, 2L)
    G : ndarray, complex, shape (K, 2L, L + 1)
    max_block_bytes : int
        ``H`` accumulates ``B^T B`` with ``B = sqrt(h_k) A_k`` over sub-blocks of
        rotations whose copy ``B`` takes at most this many bytes (at least one rotation);
        the memory plan counts it.

    Returns
    -------
    H : ndarray, shape (M, M)
    b : ndarray, shape (M,)
    """
    h = np.sqrt(mask_weights(W, L))
    g = data_images(G, L)
    H = np.zeros((M, M))
    b = np.zeros(M)
    per_rot = L * L * M * 8
    step = max(1, int(max_block_bytes // per_rot))
    for sl, A in A_blocks:
        k0 = sl.start or 0
        for i in range(0, len(A), step):
            Ab = A[i:i + step]
            B = (h[k0 + i:k0 + i + len(Ab), :, None] * Ab).reshape(-1, M)
            H += B.T @ B
            del B
            b += Ab.reshape(-1, M).T @ g[k0 + i:k0 + i + len(Ab)].ravel()
    return H, b


@dataclasses.dataclass
class Solution:
    """Result of the linear solve.

    Attributes
    ----------
    theta : ndarray, shape (M,)
    tikhonov : float
        The ``lambda`` actually used (0 when none was needed or asked).
    cond : float
        Estimated condition number of ``H`` (ratio of extreme diagonal of the Cholesky
        factor squared; a cheap lower bound).
    """

    theta: np.ndarray
    tikhonov: float
    cond: float


def solve(H, b, tikhonov=0.0):
    """Solve ``(H + lambda I) theta = b`` by Cholesky.

    If ``H + lambda I`` is not positive definite (too few patches, or ``lmax`` too high
    for the data), ``lambda`` is raised to ``1e-10 trace(H)/M`` and then by factors of
    10 until Cholesky succeeds; the value used is logged as a warning and returned.
    """
    M = len(b)
    if tikhonov < 0 or not math.isfinite(tikhonov):
        raise NumbaemError(f"tikhonov={tikhonov} must be a finite number >= 0")
    if not (np.all(np.isfinite(H)) and np.all(np.isfinite(b))):
        raise NumbaemError("the normal equations contain NaN or infinite values; check the micrographs and the noise variance")
    lam = float(tikhonov)
    scale = max(np.trace(H) / M, np.finfo(float).tiny)
    for attempt in range(16):
        try:
            cf = linalg.cho_factor(H + lam * np.eye(M), lower=False, check_finite=False)
            dg = np.abs(np.diag(cf[0]))
            if dg.min() <= 1e-7 * dg.max():
                raise linalg.LinAlgError("numerically singular")
            break
        except linalg.LinAlgError:
            new = 1e-10 * scale if lam == 0 else lam * 10
            logger.warning("H is singular or not positive definite (too few patches or lmax too high); "
                           "adding Tikhonov lambda=%.3g", new)
            lam = new
    else:
        raise NumbaemError("the normal equations stayed singular even with strong Tikhonov regularisation; "
                           "use more patches or a lower lmax")
    theta = linalg.cho_solve(cf, b, check_finite=False)
    return Solution(theta, lam, float((dg.max() / dg.min()) ** 2))


def update_upsilon(stats, floor=1e-6):
    """``upsilon_new = sum_j w_{j,empty} / Nd``, kept inside ``[floor, 1 - floor]``.

    The clamp only guards ``log upsilon`` of the next E-step when every patch is
    certainly empty or certainly occupied.
    """
    if stats.n_patches == 0:
        raise NumbaemError("no patches were processed; the micrographs are smaller than one patch")
    u = stats.sum_empty / stats.n_patches
    return float(min(max(u, floor), 1 - floor))


def update_sigma2(stats, H, b, theta, L):
    """EM update of the noise variance (section 6):
    ``(sum_j ||y_j||^2 - 2 b^T theta + theta^T H theta) / (Nd L^2)``.

    ``H`` and ``b`` must be without any Tikhonov term.
    """
    val = (stats.sum_yy - 2.0 * b @ theta + theta @ H @ theta) / (stats.n_patches * L * L)
    return float(max(val, 1e-300))
