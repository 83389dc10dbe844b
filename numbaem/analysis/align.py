"""Alignment of a reconstruction to a reference on coefficients alone (theory section 8).

A volume is recovered only up to a rotation and a reflection. In the Fourier-Bessel basis
(theory section 2) both act block by block on the complex coefficients ``x[l, :, s]``:

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
coefficients would be good only to ``1e-7`` or so. The coarse search runs on the orders
``l <= lmax_search`` (12 by default: its cost grows like ``lmax^3`` per grid rotation);
each candidate is then refined on all orders, so the rotation returned maximises the
correlation of the whole expansions, the quantity the comparison below measures.

Comparing two maps
------------------
Like is compared with like (:func:`align_volumes`): a voxel map has no exact rotation
(resampling interpolates), so both maps are expanded in the largest basis the grid
resolves, ``FBBasis(L, FBBasis.max_lmax(L))`` (:func:`comparison_basis`), whose span every
rotation and the reflection map onto itself exactly; the rotation found is applied to
the estimate's whole expansion and the result is compared with the reference's
expansion, voxel by voxel (relative error) and shell by shell (FSC). A map against
itself gives 0 and a map against a copy rotated in the basis gives 0, to round-off.
The alternatives are not exact: rotating the voxel map by interpolation adds the
interpolation's error (cubic splines: 0.03-0.11 relative at L = 7..21 on the test maps), and
evaluating the DFT's trigonometric interpolant at rotated frequencies is not a group
action on the grid (rotating back does not return the map). The price is that what the
basis does not hold (frequencies beyond ``|k| = 1/2``, density outside radius
``L // 2``) is left out of both maps alike: the fraction kept is reported. An earlier
version compared a truncated (``lmax <= 12``) resynthesis of the estimate with the raw
reference, so a map against itself reported 0.38-0.78 at L = 7..21.
"""
import dataclasses
import functools
import logging
import math

import numpy as np
from scipy.spatial.transform import Rotation

from ..model.basis import C_BAND, FBBasis, expand, resize_theta, synthesize
from ..model.rotations import euler_zyz, geodesic_distance, random_rotations, rotation_grid, wigner_D, wigner_d
from ..runtime.errors import NumbaemError
from ..runtime.validate import check_L, cubic_volume, whole_number
from .fsc import fsc as fsc_curve, relative_error

logger = logging.getLogger(__name__)

__all__ = ["AlignResult", "VolumeAlignment", "rotate_coefficients", "reflect_coefficients", "align", "align_volumes",
           "align_to_reference", "comparison_basis", "reference_rotations", "estimate_directions"]

# Highest order of the coarse search when none is given (it costs sum_l (2l+1)^2 per grid
# rotation; l = 12 resolves rotations to well under a degree); the refinement uses all orders.
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
    """Coefficients of the volume rotated by ``rot`` (theory sections 2, 3 and 8).

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


def _generator_bands(G):
    """The three non-zero diagonals of the generators: ``(diag, sup, sub)``, each (3, lmax+1, n).

    ``G_z`` is diagonal and ``G_x``, ``G_y`` are tridiagonal (they change ``m`` by one), so
    ``diag[a,l,N] = G[a,l,N,N]``, ``sup[a,l,N] = G[a,l,N,N+1]`` (last entry 0) and
    ``sub[a,l,N] = G[a,l,N,N-1]`` (first entry 0) hold all of ``G``.
    """
    n = G.shape[-1]
    diag = np.diagonal(G, 0, 2, 3).copy()
    sup = np.zeros_like(diag)
    sub = np.zeros_like(diag)
    sup[..., :n - 1] = np.diagonal(G, 1, 2, 3)
    sub[..., 1:] = np.diagonal(G, -1, 2, 3)
    return diag, sup, sub


def _local_model(rot, C, bands, lmax):
    """Correlation, gradient (3,) and Hessian (3, 3) of ``v -> c(exp(v) rot)`` at ``v = 0``.

    ``c = sum_l Re tr(B_l)``, ``g_a = Re tr(G_a B)``, ``H_ab = Re tr(G_a G_b B)`` symmetrised,
    ``B = D^l(rot) C_l``; the generators act through their three diagonals
    (:func:`_generator_bands`), ``O(lmax^3)`` per call instead of ``O(lmax^4)`` for dense
    products (tested against the dense formulas).
    """
    diag, sup, sub = bands
    D = _wigner_D_one(lmax, rot)
    B = D @ C                                      # D^l C_l, padded (batched over l)
    c = np.trace(B, axis1=1, axis2=2).sum().real
    # X[b] = G_b B: row N of G_b B is diag[N] B[N] + sup[N] B[N+1] + sub[N] B[N-1]
    X = diag[..., None] * B[None]
    X[..., :-1, :] += sup[..., :-1, None] * B[None, :, 1:, :]
    X[..., 1:, :] += sub[..., 1:, None] * B[None, :, :-1, :]
    g = np.trace(X, axis1=2, axis2=3).sum(axis=1).real
    # tr(G_a X_b) = sum_N diag_a[N] X_b[N,N] + sup_a[N] X_b[N+1,N] + sub_a[N] X_b[N-1,N]
    H = (np.einsum("aln,bln->ab", diag, np.diagonal(X, 0, 2, 3))
         + np.einsum("aln,bln->ab", sup[..., :-1], np.diagonal(X, -1, 2, 3))
         + np.einsum("aln,bln->ab", sub[..., 1:], np.diagonal(X, 1, 2, 3))).real
    return c, g, 0.5 * (H + H.T)


def _refine(rot, C, bands, lmax, scale, max_iter=100):
    """Damped Newton ascent of ``c(w) = sum_l Re tr(D^l(w) C_l)`` on SO(3) from ``rot``.

    A step is accepted when it raises ``c``; once steps are below ``1e-6`` rad, where
    changes in ``c`` drown in round-off (``c`` is quadratic at the maximum), when it
    shrinks the gradient instead, so the angle converges to round-off and not to
    ``sqrt(eps)``.
    """
    c, g, H = _local_model(rot, C, bands, lmax)
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
            c_new, g_new, H_new = _local_model(trial, C, bands, lmax)
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


def align(theta_est, theta_ref, basis, *, lmax_search=None, n_coarse=3000, n_refine=5, reflections=True, rng=None):
    """Rotate (and possibly reflect) ``theta_est`` onto ``theta_ref`` (theory section 8).

    Maximises ``<rotate(reflect^e(theta_est), w), theta_ref>`` over ``w`` in SO(3) and
    ``e`` in {0, 1} on coefficients alone. The coarse search runs on the orders
    ``l <= lmax_search`` (a prefix of ``theta``, see :mod:`numbaem.model.basis`): every
    rotation of ``rotation_grid(n_coarse)`` is scored for both reflections, and the
    ``n_refine`` best candidates (kept at least two grid spacings apart) are refined by
    damped Newton on SO(3) (see the module docstring). When ``lmax_search <
    basis.lmax`` each refined candidate is refined again on all orders, so the rotation
    returned maximises the correlation of the whole expansions; the best one wins.

    Parameters
    ----------
    theta_est, theta_ref : ndarray, shape (M,)
        Real coefficients in the same basis.
    basis : FBBasis
    lmax_search : int, optional
        Highest order of the coarse search, at most ``basis.lmax``. Default
        ``min(basis.lmax, LMAX_ALIGN_DEFAULT)`` (12): the coarse search costs
        ``sum_l (2l+1)^2`` per grid rotation, and ``l = 12`` already resolves rotations
        to well under the grid's spacing.
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
    lmax_search = _check_lmax_search(lmax_search, basis.lmax)
    n_coarse = whole_number("n_coarse", n_coarse)
    n_refine = whole_number("n_refine", n_refine)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise NumbaemError(f"rng is a {type(rng).__name__}; pass numpy.random.default_rng(seed) or None")
    norm = np.linalg.norm(theta_est) * np.linalg.norm(theta_ref)
    if norm == 0:
        raise NumbaemError("theta_est or theta_ref is zero, so there is nothing to align; pass non-zero coefficients")

    # coarse search and first refinement on the prefix l <= lmax_search
    small = FBBasis(basis.L, lmax_search)
    pe, pr = theta_est[:small.M], theta_ref[:small.M]
    scale = np.linalg.norm(pe) * np.linalg.norm(pr) or norm
    rots = rotation_grid(n_coarse)
    if rng is not None:
        rots = random_rotations(1, rng)[0] @ rots
    C = _cross_blocks(pe, pr, small)
    T = _traces(rots, C, lmax_search)
    signs = np.array([(-1.0) ** l for l in range(lmax_search + 1)])
    scores = np.stack([T.sum(axis=1), T @ signs]) if reflections else T.sum(axis=1)[None]
    # about twice the grid spacing: the spacing of K near-uniform points on SO(3) (volume pi^2)
    min_sep = 2.0 * (math.pi ** 2 / n_coarse) ** (1.0 / 3.0)
    G = _generator_bands(_generators(lmax_search))
    if lmax_search < basis.lmax:
        C_all = _cross_blocks(theta_est, theta_ref, basis)
        G_all = _generator_bands(_generators(basis.lmax))
        signs_all = np.array([(-1.0) ** l for l in range(basis.lmax + 1)])

    best = None
    for e, k in _select_candidates(scores, rots, n_refine, min_sep):
        rot, c = _refine(rots[k], C * signs[:, None, None] if e else C, G, lmax_search, scale=scale)
        logger.debug("align: candidate reflection=%d coarse %.6f refined %.12f (l <= %d)",
                     e, scores[e, k] / scale, c / scale, lmax_search)
        if lmax_search < basis.lmax:
            rot, c = _refine(rot, C_all * signs_all[:, None, None] if e else C_all, G_all, basis.lmax, scale=norm)
            logger.debug("align: refined on all orders l <= %d: %.12f", basis.lmax, c / norm)
        if best is None or c > best[1]:
            best = (rot, c, bool(e))
    rot, c, reflected = best
    theta = reflect_coefficients(theta_est, basis) if reflected else theta_est
    aligned = rotate_coefficients(theta, basis, rot)
    return AlignResult(theta_aligned=aligned, rotation=rot, reflected=reflected,
                       correlation=float(np.clip(aligned @ theta_ref / norm, -1.0, 1.0)))


def _check_lmax_search(lmax_search, lmax):
    if lmax_search is None:
        return min(lmax, LMAX_ALIGN_DEFAULT)
    lmax_search = whole_number("lmax_search", lmax_search, minimum=0, example=min(lmax, LMAX_ALIGN_DEFAULT))
    if lmax_search > lmax:
        raise NumbaemError(f"lmax_search={lmax_search} is above the expansion's lmax={lmax}; "
                           f"use lmax_search <= {lmax}")
    return lmax_search


# --------------------------------------------------------------------------- viewing directions


_RZ_PI = np.diag([-1.0, -1.0, 1.0])


def reference_rotations(rots, rotation, reflected):
    """The reference's rotations that give the images the estimate gives at ``rots``.

    An alignment (:func:`align`, :class:`VolumeAlignment`) with rotation ``w`` and
    reflection ``e`` says ``rotate(reflect^e(est), w) = ref``, i.e.
    ``est(r) = ref((-1)^e w r)``. numbaem projects a volume at rotation ``Q`` as
    ``P_Q f(x, y) = integral f(Q^T (x, y, z)) dz`` (theory section 1). Then

    - ``e = 0``: ``est(Q^T r) = ref(w Q^T r) = ref((Q w^T)^T r)``, so
      ``P_Q est = P_{Q w^T} ref``;
    - ``e = 1``: ``est(Q^T r) = ref(-w Q^T r)``. Write ``-r = Rz(pi) (x, y, -z)``; the
      integral over ``z`` does not see ``z -> -z``, so
      ``P_Q est (x, y) = integral ref(w Q^T Rz(pi) (x, y, z)) dz = P_{Rz(pi) Q w^T} ref``.

    So ``Q' = Rz(pi)^e Q w^T`` (``P_Q est = P_{Q'} ref`` exactly, for band-limited maps and
    the Fourier-Bessel operator alike). A point reflection turns a projection by 180
    degrees in the plane and nothing else: the handedness of a map is invisible in its
    projections. The viewing direction ``Q'^T e_z = w Q^T e_z`` is therefore ``w v``
    whether or not the estimate is reflected (:func:`estimate_directions` is its inverse).
    A mirror such as ``x -> -x`` is a point reflection times a half turn
    (``diag(-1, 1, 1) = -Rx(pi)``), which the alignment puts into ``w``; mirroring the
    direction itself (``v -> diag(-1, 1, 1) v``) would give the antipode of the right
    one, whose projection is the mirror image, not the same image.

    Parameters
    ----------
    rots : ndarray, shape (n, 3, 3) or (3, 3)
        Rotations ``Q`` at which the estimate is projected.
    rotation : ndarray, shape (3, 3)
        The alignment's rotation ``w``.
    reflected : bool
        The alignment's reflection ``e``.

    Returns
    -------
    ndarray, the shape of ``rots``
        ``Q' = Rz(pi)^e Q w^T``.
    """
    w = _check_rotation(rotation)
    out = np.asarray(rots, dtype=np.float64) @ w.T
    return _RZ_PI @ out if reflected else out


def estimate_directions(v, rotation, reflected):
    """Viewing directions of the reference carried into the estimate's frame: ``w^T v``.

    The inverse of the map of directions of :func:`reference_rotations`: a particle that
    the reference sees along ``v`` (``v = W^T e_z`` for the reference's rotation ``W``,
    :mod:`numbaem.sim.views`) is seen by the estimate along ``w^T v``, for either value of
    ``reflected`` (a point reflection only turns the projection in the plane). Use it to
    compare a distribution of viewing directions estimated on the estimate's rotation grid
    with the truth's.

    Parameters
    ----------
    v : ndarray, shape (n, 3)
        Unit directions in the reference's frame.
    rotation : ndarray, shape (3, 3)
        The alignment's rotation ``w``.
    reflected : bool
        The alignment's reflection (it does not change the result; taken so that callers
        pass the whole alignment and need not know that).

    Returns
    -------
    ndarray, shape (n, 3)
    """
    w = _check_rotation(rotation)
    del reflected            # see the docstring: P_Q of the reflected map is P_Q turned by pi in the plane
    return np.asarray(v, dtype=np.float64).reshape(-1, 3) @ w     # rows v^T w = (w^T v)^T


# --------------------------------------------------------------------------- volumes


@dataclasses.dataclass(frozen=True)
class VolumeAlignment:
    """Two maps brought into one representation and aligned (:func:`align_volumes`).

    ``estimate`` and ``reference`` are the pair to compare: measure them with
    :func:`numbaem.analysis.fsc.fsc` and :func:`numbaem.analysis.fsc.relative_error`
    (or :meth:`fsc` and :attr:`relative_error`), never ``estimate`` against the raw
    reference map.

    Attributes
    ----------
    estimate : ndarray, shape (L, L, L)
        The estimate's expansion in ``basis``, reflected if ``reflected``, rotated by
        ``rotation`` exactly (Wigner D), synthesised.
    reference : ndarray, shape (L, L, L)
        The reference's expansion in ``basis``, synthesised.
    rotation : ndarray, shape (3, 3)
        The rotation ``w`` found: ``estimate(r) = est(w^T r)`` (after the reflection).
    reflected : bool
        Whether the estimate was point-reflected, ``est(-r)``, before the rotation.
    correlation : float
        Of the aligned coefficient vectors, in ``[-1, 1]`` (Fourier-space inner product
        over the ball, theory section 2).
    relative_error : float
        ``||estimate - reference|| / ||reference||`` over the voxels.
    basis : FBBasis
        The basis of the comparison, ``FBBasis(L, FBBasis.max_lmax(L))`` for
        :func:`align_volumes`.
    lmax_search : int
        Highest order of the coarse rotation search.
    held_estimate, held_reference : float
        ``||synthesize(expand(v))|| / ||v||`` for each input map ``v``: the part of its
        norm that the compared representation holds (1 for a map in the span, and for
        an estimate given as coefficients to :func:`align_to_reference`).
    """

    estimate: np.ndarray
    reference: np.ndarray
    rotation: np.ndarray
    reflected: bool
    correlation: float
    relative_error: float
    basis: FBBasis
    lmax_search: int
    held_estimate: float
    held_reference: float

    def fsc(self):
        """FSC of the compared pair: ``(freq, curve)`` as :func:`numbaem.analysis.fsc.fsc` returns it."""
        return fsc_curve(self.estimate, self.reference)

    def describe(self):
        """One sentence saying what was compared (for logs, JSON and figure notes)."""
        b = self.basis
        return (f"both maps expanded in the Fourier-Bessel basis L={b.L}, lmax={b.lmax} ({b.M} coefficients: "
                f"band-limited to the ball |k| <= {C_BAND:g} cycle/pixel, density within {b.R} pixels of the "
                f"centre), the estimate's expansion {'point-reflected and ' if self.reflected else ''}rotated "
                "exactly (Wigner D) onto the reference's")


# Largest complex design matrix (grid points in the ball x M) that align_volumes builds: at
# 16 bytes per entry L = 25 needs 0.43 GiB (twice that while it is built, and about 40 s
# on two cores for its Gram matrix), L = 27 0.69 GiB.
MAX_DESIGN_BYTES = 1 << 29


@functools.lru_cache(maxsize=2)
def comparison_basis(L):
    """``FBBasis(L, FBBasis.max_lmax(L))``, built once per ``L`` (its design matrix and Gram
    factor are cached on the instance and reused by every comparison at that size).

    Raises
    ------
    NumbaemError
        If its design matrix would exceed ``MAX_DESIGN_BYTES``.
    """
    L = check_L(L, "L (the side of the maps)")
    need, n_in, M = _design_bytes(L)
    if need > MAX_DESIGN_BYTES:
        fit = 5
        while _design_bytes(fit + 2)[0] <= MAX_DESIGN_BYTES:
            fit += 2
        raise NumbaemError(
            f"aligning maps of side {L} needs a {need / 2 ** 30:.1f} GiB Fourier-Bessel design matrix "
            f"({n_in} frequencies x {M} coefficients), more than the {MAX_DESIGN_BYTES / 2 ** 30:g} GiB allowed; "
            f"Fourier-crop both maps to a side of at most {fit} first (numbaem fsc --size {fit})")
    return FBBasis(L, FBBasis.max_lmax(L))


def _design_bytes(L):
    """Bytes of the comparison basis's complex design matrix for side ``L``, with its shape."""
    basis = FBBasis(L, FBBasis.max_lmax(L))
    R = L // 2
    t = (np.arange(L) - R) ** 2
    n_in = int(np.count_nonzero(t[:, None, None] + t[None, :, None] + t[None, None, :] <= (L / 2) ** 2))
    return 16 * n_in * basis.M, n_in, basis.M


def _synthesize_pair(theta_ref, basis, result, lmax_search, held):
    est = synthesize(result.theta_aligned, basis)
    ref = synthesize(theta_ref, basis)
    return VolumeAlignment(estimate=est, reference=ref, rotation=result.rotation, reflected=result.reflected,
                           correlation=result.correlation, relative_error=relative_error(est, ref), basis=basis,
                           lmax_search=lmax_search, held_estimate=float(held[0]), held_reference=float(held[1]))


def align_volumes(estimate, reference, lmax_search=None, n_coarse=3000, n_refine=5, reflections=True, rng=None):
    """Align a map to a reference and return the pair to compare (theory sections 2, 8, 9).

    A voxel map cannot be rotated exactly (resampling interpolates), so both maps are
    first brought into one representation on which rotations and the reflection act
    exactly: their least-squares expansions (:func:`numbaem.model.basis.expand`) in
    ``FBBasis(L, FBBasis.max_lmax(L))``, the largest basis the grid resolves. Its span is
    mapped onto itself by every rotation and by the reflection (block by block, Wigner D
    and ``(-1)^l``, isometries of the coefficients), so rotating the estimate adds no
    error of its own, and the expansion is the orthogonal projection ``P`` of a voxel map
    onto that span (least squares on the grid samples, Parseval). The rotation is found
    on the orders ``l <= lmax_search`` and refined on all orders (:func:`align`), then
    applied to the estimate's whole expansion; the result is compared with the
    reference's expansion:

        relative_error = || P(est) rotated - P(ref) || / || P(ref) ||.

    Hence a map against itself gives 0, and a map against a copy rotated exactly in the
    basis gives 0, to round-off; a copy rotated by interpolation gives the interpolation
    error as seen in the span. What the span does not hold (frequencies beyond
    ``|k| = 1/2``, and density farther than ``L // 2`` from the centre, which no
    reconstruction in this basis holds either) is left out of both maps alike; how much
    of each map that is is reported in ``held_estimate`` and ``held_reference``.

    Parameters
    ----------
    estimate, reference : ndarray, shape (L, L, L)
        Real maps on the same grid, ``L`` odd.
    lmax_search : int, optional
        Highest order of the coarse search (default ``min(12, lmax)``, see :func:`align`).
    n_coarse, n_refine, reflections, rng
        As in :func:`align`.

    Returns
    -------
    VolumeAlignment
        ``.estimate`` and ``.reference`` are the pair to compare; ``.relative_error`` and
        ``.fsc()`` measure it.
    """
    estimate = cubic_volume("estimate", estimate, "align")
    reference = cubic_volume("reference", reference, "align")
    if reference.shape != estimate.shape:
        raise NumbaemError(f"reference has shape {reference.shape} but estimate has shape {estimate.shape}; "
                           "Fourier-crop them to the same size first")
    basis = comparison_basis(check_L(estimate.shape[0], "L (the side of the maps)"))
    lmax_search = _check_lmax_search(lmax_search, basis.lmax)
    theta_est = expand(estimate, basis)
    theta_ref = expand(reference, basis)
    held = [_held(theta, vol, basis) for theta, vol in ((theta_est, estimate), (theta_ref, reference))]
    result = align(theta_est, theta_ref, basis, lmax_search=lmax_search, n_coarse=n_coarse, n_refine=n_refine,
                   reflections=reflections, rng=rng)
    return _synthesize_pair(theta_ref, basis, result, lmax_search, held)


def align_to_reference(theta, basis, reference, lmax_search=None, n_coarse=3000, n_refine=5, reflections=True,
                       rng=None):
    """:func:`align_volumes` for an estimate given as coefficients in a basis of the same ``L``.

    ``theta`` lies in the span already: it is copied into the comparison basis (higher
    orders zero, :func:`numbaem.model.basis.resize_theta`), so the estimate is compared
    as it is, and only ``reference`` is expanded.

    Parameters
    ----------
    theta : ndarray, shape (basis.M,)
    basis : FBBasis
    reference : ndarray, shape (basis.L, basis.L, basis.L)
    lmax_search : int, optional
        Default ``min(12, basis.lmax)``: the estimate has no higher orders to search on.
    n_coarse, n_refine, reflections, rng
        As in :func:`align`.

    Returns
    -------
    VolumeAlignment
        ``held_estimate`` is 1.
    """
    _check_basis(basis)
    theta = _check_theta("theta", theta, basis)
    reference = cubic_volume("reference", reference, "compare against")
    if reference.shape != (basis.L,) * 3:
        raise NumbaemError(f"reference has shape {reference.shape} but the estimate's basis is for L={basis.L}; "
                           f"Fourier-crop the reference to ({basis.L}, {basis.L}, {basis.L})")
    top = comparison_basis(basis.L)
    lmax_search = _check_lmax_search(lmax_search, basis.lmax)
    theta_ref = expand(reference, top)
    held = (1.0, _held(theta_ref, reference, top))
    # The estimate has no orders above basis.lmax, so the correlation involves only the
    # reference's prefix (C_l = 0 beyond): align in the estimate's basis, then copy.
    found = align(theta, theta_ref[:basis.M], basis, lmax_search=lmax_search, n_coarse=n_coarse,
                  n_refine=n_refine, reflections=reflections, rng=rng)
    aligned = resize_theta(found.theta_aligned, basis, top)
    norm = np.linalg.norm(theta) * np.linalg.norm(theta_ref)
    result = dataclasses.replace(found, theta_aligned=aligned,
                                 correlation=float(np.clip(aligned @ theta_ref / norm, -1.0, 1.0)))
    return _synthesize_pair(theta_ref, top, result, lmax_search, held)


def _held(theta, vol, basis):
    norm = np.linalg.norm(vol)
    return np.linalg.norm(synthesize(theta, basis)) / norm if norm > 0 else math.nan
