"""M-step (theory section 6): ``upsilon``, ``H``, ``b`` from the sufficient statistics, and the solve.

    upsilon_new = (1/Nd) sum_j w_{j,empty}
    H = sum_k A_k^T diag(h_k) A_k,   h_k = crop_LxL(IFFT2(FFT2(Z 1) conj(FFT2(W_k))))
    b = sum_k A_k^T g_k,             g_k = crop_LxL(IFFT2(G_k))

No per-shift matrix is ever formed: ``(C T_l Z)^T (C T_l Z)`` is the 0/1 mask of the
pixels that stay in the patch, so the sum over shifts collapses into ``h_k``. ``H`` is
accumulated over blocks of rotations as ``B^T B`` with ``B = sqrt(h_k) A_k`` stacked
(one BLAS product per block); ``h_k >= 0`` as a sum of masks with non-negative weights.

CTF groups (theory section 11). With a filter ``Psi_g`` per group and statistics per group,
``A_k`` becomes ``Psi_g A_k`` inside the sums over the patches of group ``g``::

    H = sum_k A_k^T Q_k A_k,   Q_k = sum_g Psi_g^T diag(h_{g,k}) Psi_g     (L^2 x L^2)
    b = sum_k A_k^T u_k,       u_k = sum_g Psi_g^T g_{g,k}

which is ``sum_g sum_k (Psi_g A_k)^T diag(h_{g,k}) (Psi_g A_k)`` regrouped: per rotation,
``Q_k = sum_g Y_g^T Y_g`` with ``Y_g = sqrt(h_{g,k}) Psi_g`` (``G L^6`` multiply-adds), then
``A_k^T (Q_k A_k)`` (``L^4 M + L^2 M^2``), instead of forming
``Psi_g A_k`` for every group (``G (L^4 M + L^2 M^2)``): cheaper from two groups on
whenever ``L^2 M + M^2 > 2 L^4`` (L = 11: from lmax = 6, M = 132, on; at the paper's
lmax = 10, M = 219: 7.4e4 against 2.9e4), and its cost in ``M`` does not grow with ``G``.
The direct route, ``H += B^T B`` with ``B = sqrt(h_{g,k}) Psi_g A_k``, is taken when it
costs less (one group, e.g. whitening without a CTF). A
rotation's groups with no posterior weight (``h_{g,k} = 0``) are skipped.
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


def normal_equations(A_blocks, W, G, L, M, max_block_bytes=16 << 20, filters=None, route=None):
    """``H`` and ``b`` of section 6 (of section 11 with ``filters``).

    Parameters
    ----------
    A_blocks : iterable of (slice, ndarray)
        Blocks of the operator: ``(rotation slice, A[slice])`` with ``A`` of shape
        (K, L^2, M); a generator may build them on demand.
    W : ndarray, shape (K, 2L, 2L), or (n_groups, K, 2L, 2L) with ``filters``
    G : ndarray, complex, shape (K, 2L, L + 1), or (n_groups, K, 2L, L + 1) with ``filters``
    max_block_bytes : int
        ``H`` accumulates ``B^T B`` with ``B = sqrt(h_k) A_k`` over sub-blocks of
        rotations whose copy ``B`` takes at most this many bytes (at least one rotation);
        the memory plan counts it. Not used with ``filters`` (one rotation and group at a
        time: ``2 L^4 + 2 L^2 M`` numbers).
    filters : ndarray, shape (n_groups, L^2, L^2), optional
        ``Psi_g`` of the CTF groups (module doc).
    route : {None, 'gram', 'direct'}
        With ``filters``: the Gram route (``Q_k``) or the direct one (``B^T B``), module doc;
        None takes the cheaper.

    Returns
    -------
    H : ndarray, shape (M, M)
    b : ndarray, shape (M,)
    """
    if filters is not None:
        return _normal_equations_groups(A_blocks, W, G, L, M, max_block_bytes, filters, route)
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


def _normal_equations_groups(A_blocks, W, G, L, M, max_block_bytes, filters, route):
    """``H``, ``b`` with CTF groups (module doc)."""
    filters = np.asarray(filters, dtype=np.float64)
    n_g, P = len(filters), L * L
    if W.ndim != 4 or len(W) != n_g or len(G) != n_g or filters.shape[1:] != (P, P):
        raise NumbaemError(f"statistics of {W.shape[0] if W.ndim == 4 else 'no'} groups and {n_g} group filters "
                           f"of shape {filters.shape[1:]}: give one filter (L^2 x L^2) per group of statistics")
    if route is None:
        route = "direct" if n_g * (P * P * M + P * M * M) <= n_g * P ** 3 + P * P * M + P * M * M else "gram"
    # the sums run in a fixed order (rotations, then groups), so the bits do not depend on threads
    if route not in ("gram", "direct"):
        raise NumbaemError(f"route={route!r} is not 'gram' or 'direct'")
    K = W.shape[1]
    sh = np.empty((n_g, K, P))
    u = np.zeros((K, P))
    for g in range(n_g):
        sh[g] = np.sqrt(mask_weights(W[g], L))
        u += data_images(G[g], L) @ filters[g]           # rows: (Psi_g^T g_{g,k})^T
    live = [np.nonzero(np.any(sh[:, k] > 0, axis=1))[0] for k in range(K)]
    from threadpoolctl import threadpool_limits
    H = np.zeros((M, M))
    b = np.zeros(M)
    Q = np.empty((P, P))
    # The products here are small (L^2 x L^2 by L^2 x M): a multithreaded BLAS spends more on
    # waking its threads than on them (50x slower measured on a loaded 2-core machine); one
    # thread does L = 11, M = 219, 16 groups in about 5 ms per rotation.
    with threadpool_limits(limits=1, user_api="blas"):
        for sl, A in A_blocks:
            k0 = sl.start or 0
            for i in range(len(A)):
                k = k0 + i
                gs = live[k]
                if not len(gs):
                    continue
                if route == "gram":
                    Q[...] = 0.0
                    for g in gs:
                        Y = sh[g, k, :, None] * filters[g]      # diag(sqrt(h_gk)) Psi_g
                        Q += Y.T @ Y
                    H += A[i].T @ (Q @ A[i])
                else:
                    for g in gs:
                        B = filters[g] @ A[i]                   # Psi_g A_k
                        B *= sh[g, k, :, None]
                        H += B.T @ B
            b += A.reshape(-1, M).T @ u[k0:k0 + len(A)].ravel()
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

    ``H`` and ``b`` must be without any Tikhonov term. With the junk field (``stats.junk``,
    theory section 14.4) its patches' share ``sum_j r_j ||y_j||^2`` and ``sum_j r_j`` leave the sums:
    their variances are the field's own.
    """
    yy, n = stats.sum_yy, stats.n_patches
    junk = getattr(stats, "junk", None)
    if junk is not None:     # the junk field's patches carry their own variances (theory section 14.4)
        yy, n = yy - junk[1:].sum(), n - junk[0]
    val = (yy - 2.0 * b @ theta + theta @ H @ theta) / (n * L * L)
    return float(max(val, 1e-300))
