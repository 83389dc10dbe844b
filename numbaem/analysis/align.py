"""Alignment of a reconstruction to a reference on coefficients alone (MODEL section 8).

A volume is recovered only up to a rotation and a reflection. In the Fourier-Bessel basis
(MODEL section 2) both act block by block on the complex coefficients ``x[l, :, s]``:

- rotation, ``(R_w f)(r) = f(w^T r)``: its transform is ``F(w^T k)`` and, with
  ``Y_l^m(w^T r) = sum_N D^l_{N,m}(w) Y_l^N(r)``, ``x[l, :, s] -> D^l(w) x[l, :, s]``;
- point reflection, ``f(-r)``: ``Y_l^m(-r) = (-1)^l Y_l^m(r)``, so ``x -> (-1)^l x``, which
  is also ``theta -> (-1)^l theta`` in the real layout. It commutes with every rotation,
  and any mirror is a rotation times it, so {identity, reflection} x SO(3) covers all.

Search
------
Both coefficient vectors are real (``theta``) and ``x = U theta`` with ``U^H U = I``, so the
Fourier-space inner product of two band-limited volumes is ``theta_1 . theta_2`` and

    c(w, e) = < rotate(reflect^e(est), w), ref > = sum_l (+-1)^(e l) Re tr( D^l(w) C_l ),
    C_l = sum_s x_est[l, :, s] conj(x_ref[l, :, s])^T      ((2l+1) x (2l+1), computed once).

:func:`align` evaluates ``c`` for every rotation of a coarse grid (both reflections from the
same traces, ``sum_l (2l+1)^2`` complex products per rotation), keeps the best few
well-separated candidates, and refines each by a Levenberg-Marquardt-damped Newton
iteration on SO(3): with ``w <- exp(v) w`` and the Lie-algebra generators
``G_a = d/dt D^l(exp(t J_a))|_0`` (``D`` is a representation, so ``D^l(exp(v) w) =
exp(sum_a v_a G_a) D^l(w)``), the gradient and Hessian at ``v = 0`` are exact:

    g_a = Re tr(G_a B),   H_ab = Re tr((G_a G_b + G_b G_a) B) / 2,   B = D^l(w) C_l (summed over l).

Newton converges quadratically to round-off; a derivative-free search (Nelder-Mead) stops
at an angle of about ``sqrt(eps)`` because the maximum is quadratic, and its aligned
coefficients would be good only to ``1e-7`` or so.
"""
import dataclasses
import logging
import math
import numbers

import numpy as np
from scipy.spatial.transform import Rotation

from ..model.basis import FBBasis, expand, synthesize
from ..runtime.validate import check_L
from ..runtime.errors import NumbaemError
from ..model.rotations import euler_zyz, geodesic_distance, random_rotations, rotation_grid, wigner_D, wigner_d
from ..runtime.validate import whole_number

logger = logging.getLogger(__name__)

__all__ = ["AlignResult", "rotate_coefficients", "reflect_coefficients", "align", "align_volumes"]

# lmax used by align_volumes when none is given, at most (the search costs
# sum_l (2l+1)^2 per grid rotation; l = 12 resolves rotations to well under a degree).
LMAX_ALIGN_DEFAULT = 12

# Rotations per Wigner-D batch in the coarse search (bounds memory at large lmax).
_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class AlignResult:
    """Outcome of :func:`align`.

    Attributes
    ----------
    theta_aligned : ndarray, shape (M,)
        ``rotate_coefficients(reflect_coefficients(theta_est) if reflected else theta_est,
        rotation)``: the estimate brought onto the reference.
    rotation : ndarray, shape (3, 3)
        The rotation ``w`` found.
    reflected : bool
        Whether the estimate was point-reflected first.
    correlation : float
        ``theta_aligned . theta_ref / (||theta_est|| ||theta_ref||)``, in ``[-1, 1]``.
    """

    theta_aligned: np.ndarray
    rotation: np.ndarray
    reflected: bool
    correlation: float


# --------------------------------------------------------------------------- validation


def _check_theta(name, theta, basis):
    theta = np.asarray(theta)
    if np.iscomplexobj(theta) or theta.shape != (basis.M,):
        raise NumbaemError(
            f"{name} has shape {theta.shape} and dtype {theta.dtype}; pass the real coefficient vector "
            f"of shape ({basis.M},) for L={basis.L}, lmax={basis.lmax}")
    theta = theta.astype(np.float64, copy=False)
    if not np.all(np.isfinite(theta)):
        raise NumbaemError(f"{name} has NaN or infinite entries; replace them before aligning")
    return theta


def _check_basis(basis):
    if not isinstance(basis, FBBasis):
        raise NumbaemError(f"basis is a {type(basis).__name__}, not an FBBasis; build one with FBBasis(L, lmax)")


def _check_rotation(rot):
    rot = np.asarray(rot, dtype=np.float64)
    if rot.shape != (3, 3):
        raise NumbaemError(f"rot has shape {rot.shape}; pass one 3 x 3 rotation matrix")
    if not np.all(np.isfinite(rot)) or np.abs(rot.T @ rot - np.eye(3)).max() > 1e-8 \
            or np.linalg.det(rot) < 0:
        raise NumbaemError(
            "rot is not a rotation (it must satisfy rot.T @ rot = I and det = +1 to 1e-8); "
            "orthonormalise it, e.g. with scipy Rotation.from_matrix")
    return rot


# --------------------------------------------------------------------------- blocks


def _blocks(x, basis):
    """Views of the complex layout as ``[(2l+1, S_l) array for l = 0 .. lmax]``."""
    return [x[basis.offsets[l]:basis.offsets[l + 1]].reshape(2 * l + 1, basis.S[l]) for l in range(basis.lmax + 1)]


def _D_block(D, l, lmax):
    return D[..., l, lmax - l:lmax + l + 1, lmax - l:lmax + l + 1]


def _l_signs(basis):
    """``(-1)^l`` for every real coefficient."""
    signs = np.empty(basis.M)
    for l in range(basis.lmax + 1):
        signs[basis.offsets[l]:basis.offsets[l + 1]] = -1.0 if l % 2 else 1.0
    return signs


def rotate_coefficients(theta, basis, rot):
    """Coefficients of the volume rotated by ``rot`` (MODEL sections 2, 3 and 8).

    The rotated volume is ``f(rot^T r)``, whose transform is ``F(rot^T k)``; per ``(l, s)``
    the complex coefficients map as ``x[l, :, s] -> D^l(rot) x[l, :, s]``. Exact (no
    resampling): ``rotate(rotate(t, R1), R2) == rotate(t, R2 @ R1)``.

    Parameters
    ----------
    theta : ndarray, shape (M,)
    basis : FBBasis
    rot : ndarray, shape (3, 3)

    Returns
    -------
    theta_rot : ndarray, shape (M,)
    """
    _check_basis(basis)
    theta = _check_theta("theta", theta, basis)
    rot = _check_rotation(rot)
    D = _wigner_D_one(basis.lmax, rot)
    x = basis.to_complex(theta)
    y = np.empty_like(x)
    for l, (xb, yb) in enumerate(zip(_blocks(x, basis), _blocks(y, basis))):
        yb[...] = _D_block(D, l, basis.lmax) @ xb
    return basis.to_real(y)


def reflect_coefficients(theta, basis):
    """Coefficients of the point-reflected volume ``f(-r)``: ``theta -> (-1)^l theta``.

    Parameters
    ----------
    theta : ndarray, shape (M,)
    basis : FBBasis

    Returns
    -------
    theta_ref : ndarray, shape (M,)
    """
    _check_basis(basis)
    theta = _check_theta("theta", theta, basis)
    return theta * _l_signs(basis)


# --------------------------------------------------------------------------- search


def _cross_blocks(theta_est, theta_ref, basis):
    """``C_l = sum_s x_est[l,:,s] conj(x_ref[l,:,s])^T``, padded to (lmax+1, 2lmax+1, 2lmax+1)."""
    lmax = basis.lmax
    xe = _blocks(basis.to_complex(theta_est), basis)
    xr = _blocks(basis.to_complex(theta_ref), basis)
    C = np.zeros((lmax + 1, 2 * lmax + 1, 2 * lmax + 1), np.complex128)
    for l in range(lmax + 1):
        C[l, lmax - l:lmax + l + 1, lmax - l:lmax + l + 1] = xe[l] @ xr[l].conj().T
    return C


def _traces(rots, C, lmax):
    """``T[k, l] = Re tr(D^l(rots[k]) C_l)`` for all rotations, in chunks."""
    T = np.empty((len(rots), lmax + 1))
    for i in range(0, len(rots), _CHUNK):
        D = wigner_D(lmax, rots[i:i + _CHUNK])
        T[i:i + _CHUNK] = np.einsum("klnm,lmn->kl", D, C).real
    return T


def _wigner_D_one(lmax, rot):
    """``D[l, N+lmax, m+lmax]`` for one rotation, serially (the batch kernel's thread
    start-up dominates for a single rotation)."""
    alpha, beta, gamma = euler_zyz(rot[None])[0]
    m = np.arange(-lmax, lmax + 1)
    return np.exp(-1j * alpha * m)[None, :, None] * wigner_d(lmax, beta) * np.exp(-1j * gamma * m)[None, None, :]


def _generators(lmax):
    """``G[a, l, N+lmax, m+lmax] = d/dt D^l_{N,m}(exp(t J_a))`` at ``t = 0``, ``a = x, y, z``.

    ``J_z``: ``D^l(R_z(t)) = diag(e^{-i m t})``, so ``G_z = diag(-i m)``. ``J_y``: the
    derivative of small-d at ``beta = 0``,
    ``(sqrt((l+m)(l-m+1)) delta_{N,m-1} - sqrt((l-m)(l+m+1)) delta_{N,m+1}) / 2``
    (``d^1_{1,0} = -sin(beta)/sqrt2`` fixes the sign). ``J_x``: ``R_x(t) = R_z(-pi/2) R_y(t)
    R_z(pi/2)``, so ``G_x[N,m] = i^(N-m) G_y[N,m]``.
    """
    n = 2 * lmax + 1
    G = np.zeros((3, lmax + 1, n, n), np.complex128)
    for l in range(lmax + 1):
        for m in range(-l, l + 1):
            G[2, l, lmax + m, lmax + m] = -1j * m
            if m - 1 >= -l:
                G[1, l, lmax + m - 1, lmax + m] = 0.5 * math.sqrt((l + m) * (l - m + 1))
            if m + 1 <= l:
                G[1, l, lmax + m + 1, lmax + m] = -0.5 * math.sqrt((l - m) * (l + m + 1))
        N = np.arange(-lmax, lmax + 1)
        G[0, l] = (1j ** ((N[:, None] - N[None, :]) % 4)) * G[1, l]
    return G


def _local_model(rot, C, G, lmax):
    """Correlation, gradient (3,) and Hessian (3, 3) of ``v -> c(exp(v) rot)`` at ``v = 0``."""
    D = _wigner_D_one(lmax, rot)
    B = np.einsum("lnm,lmp->lnp", D, C)           # D^l C_l, padded
    c = np.einsum("lnn->", B).real
    GB = np.einsum("alnm,lmp->alnp", G, B)        # G_a B
    g = np.einsum("alnn->a", GB).real
    H = np.einsum("alnm,blmn->ab", G, GB).real     # tr(G_a G_b B)
    return c, g, 0.5 * (H + H.T)


def _refine(rot, C, G, lmax, scale, max_iter=100):
    """Damped Newton ascent of ``c(w) = sum_l Re tr(D^l(w) C_l)`` on SO(3) from ``rot``.

    A step is accepted when it raises ``c``; once steps are below ``1e-6`` rad, where
    changes in ``c`` drown in round-off (``c`` is quadratic at the maximum), when it
    shrinks the gradient instead, so the angle converges to round-off and not to
    ``sqrt(eps)``.
    """
    c, g, H = _local_model(rot, C, G, lmax)
    mu = 1e-6 * scale
    for _ in range(max_iter):
        gnorm = np.linalg.norm(g)
        if gnorm == 0:
            break
        while True:
            v = np.linalg.solve(-H + mu * np.eye(3), g)
            step = np.linalg.norm(v)
            if step > 0.5:  # stay inside the region the quadratic model describes
                v *= 0.5 / step
                step = 0.5
            trial = Rotation.from_rotvec(v).as_matrix() @ rot
            c_new, g_new, H_new = _local_model(trial, C, G, lmax)
            if c_new > c or (step < 1e-6 and np.linalg.norm(g_new) < gnorm):
                break
            if step < 1e-6:  # neither c nor the gradient improves: converged to round-off
                return rot, c
            mu = max(mu * 10.0, 1e-12 * scale)
        rot, c, g, H = trial, c_new, g_new, H_new
        mu = max(mu / 10.0, 1e-14 * scale)
        if step < 1e-15:
            break
    return rot, c


def _select_candidates(scores, rots, n_refine, min_sep):
    """The best ``n_refine`` (rotation, reflection) pairs, at least ``min_sep`` apart per reflection."""
    order = np.argsort(-scores, axis=None, kind="stable")  # ties: unreflected first
    K = scores.shape[1]
    chosen = []
    for flat in order[:max(50 * n_refine, 200)]:
        e, k = divmod(int(flat), K)
        if all(e != e2 or geodesic_distance(rots[k], rots[k2]) > min_sep for e2, k2 in chosen):
            chosen.append((e, k))
            if len(chosen) == n_refine:
                break
    return chosen


def align(theta_est, theta_ref, basis, n_coarse=3000, n_refine=5, reflections=True, rng=None):
    """Rotate (and possibly reflect) ``theta_est`` onto ``theta_ref`` (MODEL section 8).

    Maximises ``<rotate(reflect^e(theta_est), w), theta_ref>`` over ``w`` in SO(3) and
    ``e`` in {0, 1} on coefficients alone: every rotation of ``rotation_grid(n_coarse)``
    is scored for both reflections, the ``n_refine`` best candidates (kept at least two
    grid spacings apart) are refined by damped Newton on SO(3) (see the module
    docstring), and the best refined one wins.

    Parameters
    ----------
    theta_est, theta_ref : ndarray, shape (M,)
        Real coefficients in the same basis.
    basis : FBBasis
    n_coarse : int, optional
        Size of the coarse grid. 3000 super-Fibonacci rotations have a covering
        radius of about 0.28 rad (:func:`numbaem.model.rotations.covering_radius`), inside
        the basin of the true maximum up to ``lmax`` of about 12.
    n_refine : int, optional
        Number of candidates refined.
    reflections : bool, optional
        Whether to try the reflected estimate too.
    rng : numpy.random.Generator, optional
        If given, the coarse grid is turned by a Haar-random rotation (so repeated calls
        see different grids); if None the grid is the deterministic one.

    Returns
    -------
    AlignResult
    """
    _check_basis(basis)
    theta_est = _check_theta("theta_est", theta_est, basis)
    theta_ref = _check_theta("theta_ref", theta_ref, basis)
    n_coarse = whole_number("n_coarse", n_coarse)
    n_refine = whole_number("n_refine", n_refine)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise NumbaemError(f"rng is a {type(rng).__name__}; pass numpy.random.default_rng(seed) or None")
    norm = np.linalg.norm(theta_est) * np.linalg.norm(theta_ref)
    if norm == 0:
        raise NumbaemError("theta_est or theta_ref is zero, so there is nothing to align; pass non-zero coefficients")
    lmax = basis.lmax

    rots = rotation_grid(n_coarse)
    if rng is not None:
        rots = random_rotations(1, rng)[0] @ rots
    C = _cross_blocks(theta_est, theta_ref, basis)
    T = _traces(rots, C, lmax)
    signs = np.array([(-1.0) ** l for l in range(lmax + 1)])
    scores = np.stack([T.sum(axis=1), T @ signs]) if reflections else T.sum(axis=1)[None]
    # about twice the grid spacing: the spacing of K near-uniform points on SO(3) (volume pi^2)
    min_sep = 2.0 * (math.pi ** 2 / n_coarse) ** (1.0 / 3.0)
    G = _generators(lmax)

    best = None
    for e, k in _select_candidates(scores, rots, n_refine, min_sep):
        Ce = C * signs[:, None, None] if e else C
        rot, c = _refine(rots[k], Ce, G, lmax, scale=norm)
        logger.debug("align: candidate reflection=%d coarse %.6f refined %.12f", e, scores[e, k] / norm, c / norm)
        if best is None or c > best[1]:
            best = (rot, c, bool(e))
    rot, c, reflected = best
    theta = reflect_coefficients(theta_est, basis) if reflected else theta_est
    aligned = rotate_coefficients(theta, basis, rot)
    return AlignResult(theta_aligned=aligned, rotation=rot, reflected=reflected,
                       correlation=float(np.clip(aligned @ theta_ref / norm, -1.0, 1.0)))


def align_volumes(est_vol, ref_vol, lmax=None, n_coarse=3000, n_refine=5, reflections=True, rng=None):
    """Align a volume to a reference through their Fourier-Bessel coefficients.

    Both volumes are expanded (:func:`numbaem.model.basis.expand`) in ``FBBasis(L, lmax)``,
    aligned with :func:`align`, and the aligned coefficients are synthesised. The part of
    ``est_vol`` outside the basis's span is not carried over.

    Parameters
    ----------
    est_vol, ref_vol : ndarray, shape (L, L, L)
        ``L`` odd.
    lmax : int, optional
        Default: the highest ``l`` with a radial function below Nyquist, capped at
        ``LMAX_ALIGN_DEFAULT`` (12) for speed.
    n_coarse, n_refine, reflections, rng
        As in :func:`align`.

    Returns
    -------
    vol_aligned : ndarray, shape (L, L, L)
        ``synthesize(result.theta_aligned)``.
    result : AlignResult
    """
    est_vol = np.asarray(est_vol)
    ref_vol = np.asarray(ref_vol)
    if est_vol.ndim != 3 or len(set(est_vol.shape)) != 1:
        raise NumbaemError(f"est_vol has shape {est_vol.shape}; pass a cubic volume of shape (L, L, L)")
    if ref_vol.shape != est_vol.shape:
        raise NumbaemError(
            f"ref_vol has shape {ref_vol.shape} but est_vol has shape {est_vol.shape}; resample them to the same grid")
    L = check_L(est_vol.shape[0], "L (the side of est_vol)")
    top = FBBasis.max_lmax(L)
    if lmax is None:
        lmax = min(top, LMAX_ALIGN_DEFAULT)
    else:
        lmax = whole_number("lmax", lmax, minimum=0)
        if lmax > top:
            raise NumbaemError(f"lmax={lmax} is too high for L={L}: no radial function of that order; use lmax <= {top}")
    basis = FBBasis(L, lmax)
    result = align(expand(est_vol, basis), expand(ref_vol, basis), basis,
                   n_coarse=n_coarse, n_refine=n_refine, reflections=reflections, rng=rng)
    return synthesize(result.theta_aligned, basis), result
