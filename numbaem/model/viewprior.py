"""A non-uniform prior over viewing directions (theory section 14.1).

The sphere of viewing directions ``v = w^T e_z`` (the third row of a rotation ``w``,
:mod:`numbaem.sim.views`) is cut into the ``B = 12 nside^2`` equal-area cells of the
HEALPix grid at ``nside`` (each direction belongs to the cell of the nearest centre,
:func:`numbaem.model.hopf.healpix_nested_angles`); in-plane angles stay uniform. The
prior is a weight ``q_b > 0`` per cell, a piecewise-constant density of viewing
directions (cells have equal areas, so the probability of cell ``b`` is
``q_b / sum_b' q_b'``). On any rotation grid ``{w_k}`` it gives

    p_k = q_{b(k)} / sum_k' q_{b(k')},

exactly ``1/K`` for uniform ``q``. The E-step adds ``delta_k = log(K p_k)`` to every
score of rotation ``k`` (:func:`log_offsets`); the M-step update is
:func:`update_weights`, made only on grids fine enough to tell the cells apart
(:func:`resolves`).
"""
import functools
import logging
import math

import numpy as np

from ..runtime.errors import NumbaemError
from . import hopf

logger = logging.getLogger(__name__)

#: HEALPix resolution of the default binning: 48 cells of about 29 degrees.
DEFAULT_NSIDE = 2
#: Weight of the uniform distribution mixed into every update (no rotation below FLOOR / K).
DEFAULT_FLOOR = 0.05
#: The weights are updated only on grids whose step is at most this fraction of the cells' size
#: (:func:`resolves`; theory section 14.1).
DEFAULT_GRID_RATIO = 0.6


def check_nside(nside):
    """``nside`` as an int: a power of two from 1 to 16 (one sentence otherwise)."""
    try:
        n = int(nside)
    except (TypeError, ValueError):
        n = 0
    if n != nside or n < 1 or n > 16 or n & (n - 1):
        raise NumbaemError(f"orientation-prior bins nside={nside!r} must be a power of two from 1 to 16 "
                           "(12 nside^2 cells on the sphere), e.g. 2")
    return n


def check_floor(floor):
    """The floor ``lambda`` as a float in (0, 1] (one sentence otherwise)."""
    try:
        lam = float(floor)
    except (TypeError, ValueError):
        lam = float("nan")
    if not 0 < lam <= 1:
        raise NumbaemError(f"orientation-prior floor {floor!r} must lie in (0, 1], e.g. 0.05")
    return lam


def check_grid_ratio(ratio):
    """The grid ratio as a float > 0 (``inf``: update on every grid; one sentence otherwise)."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        r = float("nan")
    if not r > 0:
        raise NumbaemError(f"orientation-prior grid ratio {ratio!r} must be a number > 0 (the finest grid step, "
                           f"as a fraction of the cells' size, on which the prior is updated), e.g. {DEFAULT_GRID_RATIO}")
    return r


def grid_step(K):
    """Angular step in radians of a rotation grid of ``K`` rotations: ``(8 pi^2 / K)^(1/3)``, the
    side of the cube of SO(3)'s volume ``8 pi^2`` per rotation (the Hopf level of step ``s``
    has ``K`` with ``grid_step(K)`` within 2% of ``s``)."""
    return (8 * math.pi ** 2 / K) ** (1 / 3)


def cell_size(nside):
    """Angular size in radians of a HEALPix cell: ``sqrt(4 pi / (12 nside^2))``."""
    return math.sqrt(4 * math.pi / (12 * nside * nside))


def resolves(K, nside, ratio=DEFAULT_GRID_RATIO):
    """Whether a grid of ``K`` rotations is fine enough to update the weights of cells of ``nside``:
    ``grid_step(K) <= ratio * cell_size(nside)``.

    On a coarser grid a particle's posterior mass lands on the few rotations near it, many of
    them in neighbouring cells, and the update smears the distribution of views: with the true
    volume and 1,010 particles of a top-view-rich distribution (L = 11, SNR 1, 48 cells of 29
    degrees) the maximiser over the weights is 0.300 from the truth in total variation on
    ``K = 300`` (step 37 degrees), 0.204 on ``K = 1000`` (25 degrees), 0.141 on ``K = 3000``
    (17 degrees) (theory section 14.1, ``examples/view_grid_bias.py``). On coarser grids than
    the rule allows the weights are held.
    """
    return grid_step(K) <= ratio * cell_size(check_nside(nside))


def nside_of(q):
    """The ``nside`` of a weight vector of ``12 nside^2`` cells."""
    return int(round(math.sqrt(len(q) / 12)))


def check_weights(q, nside=None):
    """Cell weights ``q`` as float64 (B,): ``B = 12 nside^2`` positive finite numbers, with
    ``nside`` (if given) agreeing (one sentence otherwise)."""
    try:
        w = np.asarray(q, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        w = np.zeros(0)
    n = nside_of(w) if len(w) else 0
    if n < 1 or 12 * n * n != len(w) or n & (n - 1) or n > 16:
        raise NumbaemError(f"orientation-prior weights must number 12 nside^2 for nside a power of two from 1 to 16 "
                           f"(12, 48, 192, ...), not {len(w)}")
    if not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise NumbaemError("orientation-prior weights must all be positive and finite; give each HEALPix cell a weight > 0")
    if nside is not None and check_nside(nside) != n:
        raise NumbaemError(f"orientation-prior weights number {len(w)} (nside {n}) but nside={nside} was asked for; "
                           "give one or make them agree")
    return w


@functools.lru_cache(maxsize=8)
def centres(nside):
    """Unit centre directions (12 nside^2, 3) of the HEALPix cells (nested order)."""
    nside = check_nside(nside)
    th, ph = hopf.healpix_nested_angles(nside, np.arange(12 * nside * nside))
    return np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], axis=1)


def bins_of_directions(v, nside):
    """Cell ``b`` (n,) of each unit direction ``v`` (n, 3): the nearest HEALPix centre."""
    v = np.asarray(v, dtype=np.float64).reshape(-1, 3)
    c = centres(nside)
    out = np.empty(len(v), np.int64)
    for i in range(0, len(v), 65536):        # bounded memory for fine grids
        out[i:i + 65536] = np.argmax(v[i:i + 65536] @ c.T, axis=1)
    return out


def bins_of_rotations(rots, nside):
    """Cell of each rotation's viewing direction ``w^T e_z`` (rots (n, 3, 3) -> (n,))."""
    return bins_of_directions(np.asarray(rots)[:, 2, :], nside)


def log_offsets(q, bins):
    """``delta_k = log(K p_k) = log q_{b(k)} - log(mean_k' q_{b(k')})`` for the grid's cells ``bins`` (K,)."""
    lq = np.log(np.asarray(q, dtype=np.float64))[np.asarray(bins)]
    return lq - math.log(np.mean(np.exp(lq)))


def rotation_mass(W):
    """``N_k``: posterior mass of each rotation summed over patches and shifts.

    ``W`` of shape (K, 2L, 2L) or (G, K, 2L, 2L) (CTF groups) -> (K,).
    """
    W = np.asarray(W)
    s = W.reshape(W.shape[:-2] + (-1,)).sum(axis=-1)
    return s.sum(axis=0) if s.ndim == 2 else s


def update_weights(q, bins, mass, floor=DEFAULT_FLOOR, mass_bins=None):
    """The M-step update of the cell weights from the rotations' posterior masses.

    ``r_b = N_b / n_b`` (``N_b``: mass of the cell's rotations, ``n_b``: their number on
    this grid) maximises the expected complete log-likelihood ``sum_b N_b log q_b - N
    log sum_b n_b q_b``; it is mixed with the uniform distribution on the grid,
    ``p_k = (1 - lambda) r_{b(k)} / sum_k' r_{b(k')} + lambda / K``, so that no rotation
    falls below ``lambda / K``. Cells with no rotation on this grid keep their weight
    relative to the mean. The result is scaled to mean 1 over the cells.

    Parameters
    ----------
    q : ndarray, shape (B,)
        The current weights (only the empty cells' are used).
    bins : ndarray of int, shape (K,)
        The cell of each grid rotation.
    mass : ndarray, shape (K,)
        ``N_k`` (:func:`rotation_mass`).
    floor : float
        ``lambda`` in (0, 1].
    mass_bins : ndarray of int, shape (R,), optional
        The cell of each entry of ``mass`` when those are not the grid's rotations (the
        coarse-to-fine search: rows of several levels, the grid ``bins`` its fine level).

    Returns
    -------
    ndarray, shape (B,)
    """
    q = np.asarray(q, dtype=np.float64)
    bins = np.asarray(bins)
    B, K = len(q), len(bins)
    n_b = np.bincount(bins, minlength=B).astype(np.float64)
    N_b = np.bincount(bins if mass_bins is None else np.asarray(mass_bins),
                      weights=np.asarray(mass, dtype=np.float64), minlength=B)
    occ = n_b > 0
    r = np.where(occ, N_b / np.maximum(n_b, 1), 0.0)
    total = float(np.sum(n_b * r))      # sum_k r_b(k)
    new = np.array(q, dtype=np.float64)
    if not total > 0:
        return new / new.mean()
    # On the grid: p_k = q_new[b(k)] / K with q_new = (1 - lambda) K r_b / sum_k r_b(k) + lambda.
    mean_q_grid = float(np.sum(n_b * q)) / K      # the empty cells keep q_b / (mean on the grid)
    new[occ] = (1 - floor) * K * r[occ] / total + floor
    new[~occ] = q[~occ] / mean_q_grid if mean_q_grid > 0 else 1.0
    return new / new.mean()


def distribution(q):
    """Probability of each cell (B,): ``q_b / sum q`` (equal-area cells)."""
    q = np.asarray(q, dtype=np.float64)
    return q / q.sum()


def tv_distance(p, t):
    """Total variation distance ``(1/2) sum_b |p_b - t_b|`` of two cell distributions."""
    return 0.5 * float(np.sum(np.abs(np.asarray(p, float) - np.asarray(t, float))))
