"""Coarse-to-fine rotation search on the hierarchical Hopf grid (theory sections 5, 6 and 12).

The exhaustive E-step scores every patch against every rotation of one grid. Here a stage
has a *coarse* level ``rc`` and a *fine* level ``rf >= rc`` of the Hopf grid
(:mod:`numbaem.model.hopf`, ``72 * 8^r`` rotations at level ``r``, children of a cell
contiguous):

1. Every patch is scored against every rotation of level ``rc`` (the dense direct
   kernels) under the prior ``(1 - upsilon) / ((2L-1)^2 K_rc)`` per state, giving the
   posterior mass ``pi_jk`` of each rotation summed over shifts.
2. A patch whose posterior is *concentrated* -- after dropping the rotations of least mass
   whose total is at most ``eps = 0.9 prune / (rf - rc)``, at most ``cap`` rotations are
   left -- is *refined*: the rotations left, joined by every rotation of the level within
   ``margin`` grid steps of them (a peak between two centres is refined from both), are
   replaced by their 8 children at the next level, scored under that level's prior (the
   sparse kernels: each patch against its own rotations), and step 2 repeats down to
   ``rf``. The mass dropped is what the patch loses; it is at most ``prune``.
3. A patch whose posterior is diffuse (an empty patch, a projection that barely
   overlaps it) stops refining: its posteriors live on the level it reached, where they
   were just computed in full (nothing is lost). A patch that reaches ``rf`` stops there.
4. Each patch's posteriors, normalised over its final level's states and the empty state,
   less each refinement pass's tail of least mass (at most ``stats_eps``: theory section
   12.9), feed the sufficient statistics of the rotations of that level (rows keyed by level and
   rotation: :attr:`numbaem.em.estep.SufficientStats.rotations`, see :meth:`SearchModel.rotations`).

With ``prune = 0`` and no ``cap`` every patch reaches ``rf`` having evaluated every
rotation, and the E-step equals the exhaustive one on level ``rf`` to round-off (tested).
The masses dropped estimate the fine posterior mass lost: exact for the coarse
posteriors, and a good estimate where the coarse level resolves the posterior (measured
and tested in ``tests/test_search.py``). Per iteration the search reports the (patch,
rotation) pairs scored at each level, the fraction of patches that reached ``rf``, the
mass dropped (sum and largest per patch) and the seconds of each pass.

Branch and bound (``bound``, theory section 12.11): a refined patch also refines every
rotation whose cell's fine-level states could hold more than their share of its posterior,
by a bound on their best score (the centre's residual less the largest distance from the
centre's projection to a descendant's, :meth:`SearchModel.cell_bounds`). It finds the peaks
the masses miss at high SNR, at many times the cost where the coarse cells are wide
against the differences between views.

Local search (``local > 0``): a patch with a *record* (:class:`numbaem.em.estep.Records`:
the few rotations its posterior held at its last E-step, on whatever grid) is scored at
level ``max(rc, rf - 2)`` only on the rotations within ``local`` degrees of its record;
the rest follows as above. A patch without one (first seen, or diffuse last time: its
posterior needed more than 16 rotations even counted at the local level, see
:func:`_write_records`) takes the full level ``rc``.
"""
import copy
import dataclasses
import logging
import math
import time

import numpy as np
from threadpoolctl import threadpool_limits

from ..model import hopf
from ..model.projection import _steer, direction_images, filter_images
from ..runtime.errors import NumbaemError
from ..runtime.jit import jit
from . import kernels
from .estep import (RECORD_EPS, RECORD_MAX, Records, SufficientStats, _no_timer, add_totals, block_scales,
                    check_estep_args, choose_precision, direct_spectra, fold_log_prior, merge_rows, pop_records,
                    shift_index)

logger = logging.getLogger(__name__)

#: The share of a search's ``prune`` that the statistics may leave out (:attr:`SearchSpec.stats_eps`);
#: the rest bounds the mass left unrefined (:attr:`SearchSpec.eps`).
STATS_SHARE = 0.1

#: (patch, rotation) pairs one refinement pass scores at most: the patches of a chunk that
#: refine are taken in groups of about this many (their work arrays stay bounded).
MAX_PAIRS = 1 << 14

@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """The rotation search of a stage (module doc).

    Attributes
    ----------
    coarse : int
        Hopf level every patch is scored on.
    fine : int
        Finest Hopf level (``> coarse``).
    prune : float
        Posterior mass a patch may lose, in ``[0, 1)``, over all its refinement steps.
    cap : int
        A patch is refined while at most this many rotations hold all but its step's
        ``eps`` of its rotation mass (0: no cap, every patch is refined).
    margin : float
        Rotations within ``margin`` grid steps of a refined one are refined too.
    local : float
        Local search radius in degrees (0: every patch scored on all of level ``coarse``).
    bound : bool
        A refined patch also refines every rotation whose cell *could* hold more than its
        share of the fine posterior mass: a bound on the best score among the cell's
        fine-level descendants (branch and bound, theory section 12.11), not its centre's
        mass alone.
    """

    coarse: int
    fine: int
    prune: float = 1e-3
    cap: int = 32
    margin: float = 1.5
    local: float = 0.0
    bound: bool = False

    def __post_init__(self):
        hopf.size(self.coarse)
        hopf.size(self.fine)
        if self.fine <= self.coarse:
            raise NumbaemError(f"the fine step {hopf.level_step(self.fine):g} degrees (Hopf level {self.fine}) of a "
                               f"search must be finer than its coarse step {hopf.level_step(self.coarse):g} degrees "
                               f"(level {self.coarse}); for one grid use the exhaustive search (rotations=K)")
        if not 0.0 <= self.prune < 1.0:
            raise NumbaemError(f"prune={self.prune} must lie in [0, 1): the posterior mass a patch may lose")
        if int(self.cap) != self.cap or self.cap < 0:
            raise NumbaemError(f"cap={self.cap} must be a whole number of rotations >= 0 (0: no cap)")
        for name in ("margin", "local"):
            v = getattr(self, name)
            if not v >= 0 or not math.isfinite(v):
                raise NumbaemError(f"{name}={v} must be a number >= 0")

    @property
    def eps(self):
        """Mass left unrefined per refinement step at most (``1 - STATS_SHARE`` of ``prune`` over the steps)."""
        return self.prune * (1.0 - STATS_SHARE) / (self.fine - self.coarse)

    @property
    def stats_eps(self):
        """Mass a sparse pass may leave out of the statistics per patch (``STATS_SHARE`` of
        ``prune`` over the passes a patch can have): its states of least mass, which would
        otherwise add rows of negligible weight (the neighbours of a sharp peak)."""
        return self.prune * STATS_SHARE / (self.fine - self.coarse + 1)

    @property
    def local_level(self):
        """The level a local search starts at: two above the fine one (or the coarse one)."""
        return max(self.coarse, self.fine - 2)

    @property
    def levels(self):
        return tuple(range(self.coarse, self.fine + 1))


class SearchModel:
    """What the coarse-to-fine E-step needs of the current volume (in place of the spectra).

    Holds the coefficients, the coarse level's spectra (dense lane blocks) and, built on
    first use in each process, per level the direction images of
    :func:`numbaem.model.projection.direction_images` from which the projection of any
    rotation of the level is steered (``(2 lmax + 1) L^2`` complex numbers per viewing
    direction, ``12 * 4^r`` directions at level ``r``).

    Rows of the statistics are numbered over the levels: rotation ``k`` of level ``r``
    is row ``offset(r) + k`` (:meth:`rotations` turns rows into matrices).

    Parameters
    ----------
    theta : ndarray, shape (M,)
    basis : FBBasis
    spec : SearchSpec
    sigma2 : float, optional
        For the precision (:func:`numbaem.em.estep.choose_precision`).
    precision : str
    previous : Records, optional
        The patches' records of earlier iterations (local search).
    record : bool
        Write each patch's record (for a later local search).
    filt : ndarray, shape (L^2, L^2), optional
        A CTF group's ``Psi_g`` (theory section 11): every projection is ``Psi_g A_k x``
        (:meth:`for_group` makes the model of each group, sharing the direction images).
    view_weights : ndarray, shape (12 nside^2,), optional
        An orientation prior's cell weights (:mod:`numbaem.model.viewprior`): the
        rotations of level ``r`` get ``p_k = q_{b(k)} / sum_{k'} q_{b(k')}`` over that
        level, folded into the energies of every pass (:meth:`view_offsets`).
    """

    route = "search"

    def __init__(self, theta, basis, spec, sigma2=None, precision="auto", previous=None, record=False, filt=None,
                 view_weights=None):
        from ..model.projection import project_hopf
        self.theta = np.asarray(theta, dtype=np.float64)
        self.basis = basis
        self.spec = spec
        self.L = basis.L
        self.filt = None if filt is None else np.asarray(filt, dtype=np.float64)
        self._coarse_raw = project_hopf(self.theta, basis, spec.coarse)
        coarse = self._filtered(self._coarse_raw)
        self.sigma2, self.precision = sigma2, precision
        self.dtype = choose_precision(coarse, sigma2, precision)
        self.coarse = direct_spectra(coarse, self.dtype)
        self.previous = previous
        self.record = bool(record)
        self.max_pairs = MAX_PAIRS
        self.max_rows = None         # rows the accumulator may hold (the memory plan's; None: every rotation)
        self._q = {}
        self._bounds = {}
        self.view_weights = None if view_weights is None else np.asarray(view_weights, dtype=np.float64)
        self._view_log_mean = {}

    def view_offsets(self, level, idx):
        """``delta_k = log(K_r p_k)`` (n,) of the rotations ``idx`` of ``level`` under the
        orientation prior (zeros without one; :func:`numbaem.model.viewprior.log_offsets`
        over the whole level)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.view_weights is None:
            return np.zeros(len(idx))
        from ..model import viewprior
        nside = viewprior.nside_of(self.view_weights)
        lm = self._view_log_mean.get(level)
        if lm is None:
            b = viewprior.bins_of_rotations(hopf.rotations(level), nside)
            lm = self._view_log_mean[level] = math.log(np.mean(self.view_weights[b]))
        b = viewprior.bins_of_rotations(hopf.rotations(level, idx), nside)
        return np.log(self.view_weights[b]) - lm

    def stream_stats(self, source, idx, upsilon, sigma2, n_chunk, progress=None, timer=None):
        """:func:`search_stats` with this model (what :func:`numbaem.em.estep.stream_stats` calls)."""
        return search_stats(source, idx, self, upsilon, sigma2, n_chunk, progress, timer)

    def _filtered(self, proj):
        if self.filt is None:
            return proj
        n, L, _ = proj.shape
        out = np.empty((n, L * L))
        filter_images(np.ascontiguousarray(proj, dtype=np.float64).reshape(n, L * L),
                      np.ascontiguousarray(self.filt.T), out)
        return out.reshape(n, L, L)

    def for_group(self, filt):
        """The model of a CTF group: projections ``Psi_g A_k x`` (same coefficients, levels and
        direction images; the coarse level's spectra made for the group, in this model's precision)."""
        other = copy.copy(self)
        other.filt = np.asarray(filt, dtype=np.float64)
        other._bounds = {}      # the group's own projections
        other.coarse = direct_spectra(other._filtered(self._coarse_raw), self.dtype)
        return other

    @property
    def K(self):
        """Rows of the statistics (every rotation of every level of the search)."""
        return sum(hopf.size(r) for r in self.spec.levels)

    def offset(self, level):
        return sum(hopf.size(r) for r in range(self.spec.coarse, level))

    def rotations(self, rows):
        """Rotation matrices (n, 3, 3) of statistics rows."""
        return rotations_of_rows(self.spec, rows)

    @property
    def nbytes(self):
        prev = self.previous.nbytes if self.previous is not None else 0
        return self.coarse.nbytes + self.theta.nbytes + sum(q.nbytes for q in self._q.values()) + prev

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_q"] = {}            # rebuilt where it is used (a Dask worker), not sent
        d["_bounds"] = {}
        return d

    def direction_images(self, level):
        q = self._q.get(level)
        if q is None:
            n_dir = hopf.N_BASE_PIX * 4 ** level
            rows = hopf.cells_to_tree(level, np.arange(n_dir), np.zeros(n_dir, np.int64))
            ang = hopf.euler_angles(level, rows)
            q = direction_images(self.theta, self.basis, ang[:, 1], ang[:, 2])
            self._q[level] = q
        return q

    def cell_bounds(self, level):
        """``(B, log_w)`` over the rotations of ``level`` (below the fine one) for the bound of
        :attr:`SearchSpec.bound` (theory section 12.11): ``B[c]`` the largest distance
        ``||P_d - P_c||`` from rotation ``c``'s projection to those of its descendants ``d`` on
        the fine level (filtered, whole images); ``log_w[c]`` the log of the mean prior weight
        ``exp(delta_d)`` of those descendants less ``delta_c`` (zeros without an orientation
        prior). Built for every level on first use (one sweep over the fine level)."""
        if level not in self._bounds:
            self._bounds.update(_cell_bounds(self))
        return self._bounds[level]

    def projections(self, level, idx):
        """Projections (n, L, L) float64 of the rotations ``idx`` of ``level``, steered."""
        idx = np.asarray(idx, dtype=np.int64)
        q = self.direction_images(level)
        pix, _ = hopf.tree_to_cells(level, idx)
        alpha = hopf.euler_angles(level, idx)[:, 0]
        out = np.empty((len(idx), self.L * self.L))
        _steer(q, pix, alpha, self.basis.lmax, out)
        return self._filtered(out.reshape(-1, self.L, self.L))


#: Fine-level rotations projected at once while the cell bounds are built.
BOUND_BLOCK = 1 << 12


def _cell_bounds(model):
    """:meth:`SearchModel.cell_bounds` of every level from ``coarse`` to ``fine - 1``."""
    spec = model.spec
    rf = spec.fine
    levels = range(spec.coarse, rf)
    dist = {r: np.zeros(hopf.size(r)) for r in levels}
    wsum = {r: np.zeros(hopf.size(r)) for r in levels}
    prior = model.view_weights is not None
    n = hopf.size(rf)
    for i0 in range(0, n, BOUND_BLOCK):
        d = np.arange(i0, min(n, i0 + BOUND_BLOCK))
        Pd = model.projections(rf, d).reshape(len(d), -1)
        wd = np.exp(model.view_offsets(rf, d)) if prior else None
        for r in levels:
            par = hopf.parent(d, rf - r)
            cells, first, inv = np.unique(par, return_index=True, return_inverse=True)    # par is sorted
            Pc = model.projections(r, cells).reshape(len(cells), -1)
            far = np.sqrt(np.sum((Pd - Pc[inv.ravel()]) ** 2, axis=1))
            dist[r][cells] = np.maximum(dist[r][cells], np.maximum.reduceat(far, first))
            if prior:
                wsum[r][cells] += np.add.reduceat(wd, first)
    out = {}
    for r in levels:
        log_w = np.zeros(hopf.size(r))
        if prior:
            log_w = np.log(wsum[r] / float(hopf.CHILDREN) ** (rf - r)) - model.view_offsets(r, np.arange(hopf.size(r)))
        out[r] = (dist[r], log_w)
    return out


def rotations_of_rows(spec, rows):
    """Rotation matrices of statistics rows numbered over the search's levels (:class:`SearchModel`)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), 3, 3))
    start = 0
    for r in spec.levels:
        K = hopf.size(r)
        sel = (rows >= start) & (rows < start + K)
        if sel.any():
            out[sel] = hopf.rotations(r, rows[sel] - start)
        start += K
    return out


def direction_bytes(level, L, lmax):
    """Bytes of one level's direction images (:meth:`SearchModel.direction_images`)."""
    return hopf.N_BASE_PIX * 4 ** level * (2 * lmax + 1) * L * L * 16


# --------------------------------------------------------------------------- helpers

def _csr(counts):
    ptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr


@jit
def _tail(m, eps):
    """The tail of least mass of ``m`` whose sum stays within ``eps``: ``(asc, n, c)``, the
    positions in ascending order of mass (ties in position order), the tail's length (the
    first ``n`` of ``asc``) and its mass ``c``. ``eps = 0`` drops nothing: a mass of 0 here
    is a state more than ``exp(-50)`` below its block's best, whose children need not be
    (at high SNR a coarse cell's centre can score far below the fine rotations inside it)."""
    asc = np.argsort(m, kind="mergesort")
    c = 0.0
    n = 0
    if not eps > 0:
        return asc, n, c
    for t in range(m.shape[0]):
        if c + m[asc[t]] > eps:
            break
        c += m[asc[t]]
        n = t + 1
    return asc, n, c


def cells_near(level, quats, radius_deg):
    """Rotations of ``level`` within ``radius_deg`` of any of the unit quaternions ``quats`` (m, 4),
    and the nearest one to each (so never none), sorted."""
    if len(quats) == 0:
        return np.zeros(0, np.int64)
    tree = hopf._kdtree(level)
    q = np.asarray(quats, np.float64)
    both = np.concatenate([q, -q])
    chord = 2.0 * math.sin(math.radians(radius_deg) / 4.0)
    hits = tree.query_ball_point(both, chord)
    d, nearest = tree.query(both)
    m = len(q)
    nearest = np.where(d[:m] <= d[m:], nearest[:m], nearest[m:])
    return np.unique(np.concatenate([np.asarray(h, np.int64) for h in hits] + [nearest.astype(np.int64)]))


def _tasks(ptr, max_block):
    """Split each patch's lanes into tasks of at most ``max_block``: (patch, start, length) arrays."""
    counts = np.diff(ptr)
    per = -(-counts // max_block)
    t_patch = np.repeat(np.arange(len(counts), dtype=np.int64), per)
    first = _csr(per)
    k = np.arange(len(t_patch)) - first[t_patch]
    t_start = ptr[t_patch] + k * max_block
    t_len = np.minimum(max_block, ptr[t_patch + 1] - t_start)
    return t_patch, t_start.astype(np.int64), t_len.astype(np.int64)


def _patch_matrix(t_patch, values, n, fill):
    """(n, tasks per patch) matrix of per-task ``values`` (``fill`` elsewhere), and each task's column."""
    counts = np.bincount(t_patch, minlength=n)
    width = max(1, int(counts.max()) if len(counts) else 1)
    col = np.arange(len(t_patch)) - _csr(counts)[t_patch]
    out = np.full((n, width), fill)
    out[t_patch, col] = values
    return out, col


def _report_add(rep, key, value):
    if key.startswith("max_"):
        rep[key] = max(rep.get(key, value), value)
    else:
        rep[key] = rep.get(key, 0) + value


class SearchAccumulator:
    """Sums over patches of a search, by level and rotation (float64), until they become statistics.

    Only the rotations some patch reaches hold sums: per level ``r`` a table ``slot[r]``
    (K_r,) gives each reached rotation its row in ``W[r]`` (rows, S, S) at the linear
    shifts and ``g[r]`` (rows, L, L), which grow as rows are reached (so a fine level of
    millions of rotations costs its table and the rows reached, not every rotation). The
    dense coarse pass adds into lane-block arrays (:class:`numbaem.em.estep.DirectAccumulator`
    layout) folded in at the end. Rows are assigned in the order the passes reach them and
    every sum runs in patch order: the bits do not depend on the thread count.

    ``model.max_rows`` (the memory plan's ``max_rows``; None: no bound) bounds the rows
    held over all levels, spare capacity included (:meth:`_capped`): the coarse level's are
    reserved, the finer levels share the rest, and a search whose patches reach more stops
    with an error naming the budget.
    """

    def __init__(self, model):
        L = model.L
        self.max_rows = model.max_rows
        S = 2 * L - 1
        self.model, self.L = model, L
        self.slot = {r: np.full(hopf.size(r), -1, np.int64) for r in model.spec.levels}
        self.n_rows = {r: 0 for r in model.spec.levels}
        self.W = {r: np.zeros((0, S, S)) for r in model.spec.levels}
        self.g = {r: np.zeros((0, L, L)) for r in model.spec.levels}
        B, _, _, KB = model.coarse.P.shape
        self.Wd = np.zeros((B, S, S, KB))
        self.gd = np.zeros((B, L, L, KB))
        self.n_patches = 0
        self.sum_empty = 0.0
        self.sum_yy = 0.0
        self.loglik = 0.0
        self.report = {}

    def rows_of(self, level, rot):
        """The rows (into ``W[level]``, ``g[level]``) of the rotations ``rot`` of ``level``, new
        ones assigned in the order given (the arrays grow by doubling)."""
        rot = np.asarray(rot, dtype=np.int64)
        slot = self.slot[level]
        new = rot[slot[rot] < 0]
        if len(new):
            new = new[np.sort(np.unique(new, return_index=True)[1])]
            n0 = self.n_rows[level]
            n1 = n0 + len(new)
            if n1 > len(self.W[level]):
                size = min(max(n1, 2 * len(self.W[level]), 64), hopf.size(level))
                if self.max_rows is not None:
                    size = self._capped(level, n1, size)
                for arr in (self.W, self.g):
                    grown = np.zeros((size,) + arr[level].shape[1:])
                    grown[:n0] = arr[level][:n0]
                    arr[level] = grown
            slot[new] = n0 + np.arange(len(new))
            self.n_rows[level] = n1
        return slot[rot]

    def _capped(self, level, n1, size):
        """``size`` rows for ``level`` (which needs ``n1``) within :attr:`max_rows` over all
        levels' arrays. The coarse level's rows stay reserved (the fold of its lane-block
        sums in :meth:`to_stats` always fits); the finer levels share the rest, the others'
        spare rows given back before the budget is called short."""
        rc = self.model.spec.coarse
        if level == rc:
            return size
        cap = self.max_rows - hopf.size(rc)
        others = [r for r in self.W if r not in (level, rc)]
        used = sum(self.n_rows[r] for r in others) + n1
        if used > cap:
            raise NumbaemError(f"the search reached more rotations ({used} on its finer levels) than the memory "
                               f"budget holds sums for ({cap}); raise --memory or use a coarser fine step")
        if sum(len(self.W[r]) for r in others) + size > cap:
            for r in others:
                if len(self.W[r]) > self.n_rows[r]:
                    self.W[r] = self.W[r][:self.n_rows[r]].copy()
                    self.g[r] = self.g[r][:self.n_rows[r]].copy()
        return max(n1, min(size, cap - sum(len(self.W[r]) for r in others)))

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.slot.values()) + sum(a.nbytes for a in self.W.values()) + \
            sum(a.nbytes for a in self.g.values()) + self.Wd.nbytes + self.gd.nbytes

    def to_stats(self):
        """:class:`SearchStats` of the rows some patch reached (copies of those rows, sorted)."""
        model, L = self.model, self.L
        S = 2 * L - 1
        rc = model.spec.coarse
        Kc = hopf.size(rc)
        Wd = self.Wd.transpose(0, 3, 1, 2).reshape(-1, S, S)[:Kc]
        gd = self.gd.transpose(0, 3, 1, 2).reshape(-1, L, L)[:Kc]
        hit = np.nonzero(np.any(Wd.reshape(Kc, -1) != 0, axis=1))[0]
        if len(hit):
            rows = self.rows_of(rc, hit)
            self.W[rc][rows] += Wd[hit]
            self.g[rc][rows] += gd[hit]
        self.Wd[:] = 0.0
        self.gd[:] = 0.0
        n = sum(self.n_rows.values())
        W, g, rows = np.empty((n, S, S)), np.empty((n, L, L)), np.empty(n, np.int64)
        at = 0
        for r in model.spec.levels:       # one copy of the sums at a time beside the accumulator's
            t = np.nonzero(self.slot[r] >= 0)[0]           # sorted rotations reached
            pos = self.slot[r][t]
            rows[at:at + len(t)] = model.offset(r) + t
            W[at:at + len(t)] = self.W[r][pos]
            g[at:at + len(t)] = self.g[r][pos]
            at += len(t)
        return SearchStats(W, g, rows, self.n_patches, self.sum_empty, self.sum_yy, self.loglik,
                           search=dict(self.report))


@dataclasses.dataclass
class SearchStats:
    """Sufficient statistics of a search (theory section 6) on the rows some patch reached.

    The layout of the direct route (:mod:`numbaem.em.kernels`): ``W`` at the linear
    shifts, and the data images ``g`` themselves (no transform is needed to reach them).

    Attributes
    ----------
    W : ndarray, shape (R, S, S)
        ``sum_j w_jks`` at the linear shifts ``s = i - (L-1)`` (``S = 2L - 1``).
    g : ndarray, shape (R, L, L)
        ``g_k = sum_j sum_s w_jks (C T_s Z)^T y_j``.
    rotations : ndarray of int, shape (R,)
        The rows' numbers over the search's levels (:meth:`SearchModel.rotations`), sorted.
    n_patches, sum_empty, sum_yy, loglik :
        As in :class:`numbaem.em.estep.SufficientStats`.
    search : dict
        The report (additive; ``max_`` keys take the maximum).
    records : Records, optional
    """

    W: np.ndarray
    g: np.ndarray
    rotations: np.ndarray
    n_patches: int = 0
    sum_empty: float = 0.0
    sum_yy: float = 0.0
    loglik: float = 0.0
    search: dict = None
    records: Records = None

    def add(self, other):
        """In-place sum, merged by row (the result's rows sorted)."""
        self.rotations, (self.W, self.g) = merge_rows(self.rotations, (self.W, self.g), other.rotations,
                                                      (other.W, other.g))
        return add_totals(self, other)

    @property
    def nbytes(self):
        return self.W.nbytes + self.g.nbytes + self.rotations.nbytes

    def to_arrays(self):
        out = dict(W=self.W, g=self.g, rotations=self.rotations, n_patches=self.n_patches,
                   sum_empty=self.sum_empty, sum_yy=self.sum_yy, loglik=self.loglik, search=dict(self.search or {}))
        if self.records is not None:
            out["records_ids"], out["records_ptr"], out["records_quats"] = self.records.to_arrays()
        return out

    @classmethod
    def from_arrays(cls, d):
        d = dict(d)
        records = pop_records(d)
        return cls(**d, records=records)


@jit
def _box_sums(W, h):
    """``h[q] = sum_s W[s] [q + s in the box]`` for each row (theory section 6's ``h_k = sum_l W_k[l] m_l``).

    W : (R, S, S) at the linear shifts; h : (R, L, L). Pixel ``q`` of a projection shifted
    by ``s`` lands on ``q + s``, inside iff ``-q <= s <= L - 1 - q``: a rectangle of
    shifts, summed from a table of prefix sums.
    """
    R, S, _ = W.shape
    L = h.shape[1]
    cs = np.zeros((S + 1, S + 1))
    for r in range(R):
        for i in range(S):
            for k in range(S):
                cs[i + 1, k + 1] = cs[i, k + 1] + cs[i + 1, k] - cs[i, k] + W[r, i, k]
        for q1 in range(L):
            lo1 = L - 1 - q1            # s1 = -q1  -> index L - 1 - q1
            hi1 = lo1 + L               # s1 = L - 1 - q1 -> index 2L - 2 - q1, exclusive end + 1
            for q2 in range(L):
                lo2 = L - 1 - q2
                hi2 = lo2 + L
                h[r, q1, q2] = cs[hi1, hi2] - cs[lo1, hi2] - cs[hi1, lo2] + cs[lo1, lo2]


def box_sums(W, L):
    """``h`` (R, L, L) of :func:`_box_sums` (clipped at 0: a sum of non-negative weights)."""
    h = np.empty((len(W), L, L))
    if len(W):
        _box_sums(np.ascontiguousarray(W), h)
    return np.maximum(h, 0.0)


#: The M-step leaves out the rows of least weight whose weights sum to at most this
#: fraction of the total: their share of ``H`` and ``b`` is below round-off.
NEGLIGIBLE_ROW_WEIGHT = 1e-13


def significant_rows(stats, tol=NEGLIGIBLE_ROW_WEIGHT):
    """Positions of the rows that carry all but ``tol`` of the statistics' total weight ``sum W``.

    A row's part of ``H`` is ``A_k^T diag(h_k) A_k`` with ``h_k <= sum_s W_k[s]``, so
    leaving out rows of total weight ``tol sum_k sum_s W_k[s]`` changes ``H`` (and ``b``
    likewise) by at most ``tol`` relative (with ``||A_k||`` bounded): round-off. At high
    SNR most rows a search reaches hold exponentially small posteriors.
    """
    w = stats.W.reshape(len(stats.W), -1).sum(axis=1)
    total = w.sum()
    if not total > 0:
        return np.zeros(0, np.int64)
    order = np.argsort(w, kind="stable")
    drop = np.cumsum(w[order]) <= tol * total
    return np.sort(order[~drop])


def search_normal_equations(stats, spec, basis, max_block_bytes=16 << 20, filters=None):
    """``H`` and ``b`` of theory section 6 from a search's statistics.

    ``H = sum_k A_k^T diag(h_k) A_k`` and ``b = sum_k A_k^T g_k`` over the rows that carry
    weight (:func:`significant_rows`), with ``A_k`` built for blocks of rows (at most
    ``max_block_bytes`` of ``A``; never all rows at once) and ``h_k`` by :func:`box_sums`.
    Rows are left out up to a total weight of ``1e-3 prune`` of the whole (the search
    already lets each patch lose up to ``prune``; without pruning, only round-off:
    :data:`NEGLIGIBLE_ROW_WEIGHT`).

    With CTF groups (:class:`GroupSearchStats` and ``filters`` ``Psi_g``, theory section 11)
    ``A_k`` becomes ``Psi_g A_k`` in each group's sums: ``H = sum_g sum_k (Psi_g A_k)^T
    diag(h_gk) (Psi_g A_k)``, ``b = sum_g sum_k (Psi_g A_k)^T g_gk``.
    """
    M = basis.M
    if isinstance(stats, GroupSearchStats):
        if filters is None or len(filters) != len(stats.parts):
            raise NumbaemError(f"statistics of {len(stats.parts)} CTF groups need one filter per group")
        H = np.zeros((M, M))
        b = np.zeros(M)
        for part, filt in zip(stats.parts, filters):
            if part is not None:
                Hg, bg = _search_normal_equations(part, spec, basis, max_block_bytes, filt)
                H += Hg
                b += bg
        return H, b
    return _search_normal_equations(stats, spec, basis, max_block_bytes, None)


def _search_normal_equations(stats, spec, basis, max_block_bytes, filt):
    import numba
    from ..model.projection import projection_matrices
    from ..runtime.threads import kernel_guard
    L, M = basis.L, basis.M
    keep = significant_rows(stats, max(NEGLIGIBLE_ROW_WEIGHT, 1e-3 * spec.prune))
    # Blocks of rows run on as many threads as numba has, each block's products on one BLAS
    # thread (they are skinny, M x M from a block: a multithreaded BLAS spent 50x longer on
    # them on a busy 2-core machine, 0.61 s against 0.012 s for a block at L = 7, M = 34),
    # at most MSTEP_WORKERS blocks in flight, each holding 1/MSTEP_WORKERS of the bytes (the
    # plan's bound holds), whatever the thread count; the blocks' sums are added in block
    # order: the bits depend on neither thread count.
    workers = max(1, min(numba.get_num_threads(), MSTEP_WORKERS))
    step = max(1, int(max_block_bytes // MSTEP_WORKERS // (L * L * M * 8)))

    def block(i):
        pos = keep[i:i + step]
        with kernel_guard():
            A = projection_matrices(basis, rotations_of_rows(spec, stats.rotations[pos]))
            h = np.sqrt(box_sums(stats.W[pos], L)).reshape(len(pos), L * L)
        if filt is not None:
            A = np.matmul(filt, A)                      # Psi_g A_k, block by block
        B = (h[:, :, None] * A).reshape(-1, M)
        return B.T @ B, A.reshape(-1, M).T @ stats.g[pos].reshape(-1)

    H = np.zeros((M, M))
    b = np.zeros(M)
    starts = range(0, len(keep), step)
    with threadpool_limits(limits=1, user_api="blas"):
        if workers == 1 or len(starts) == 1:
            parts = map(block, starts)
        else:
            from concurrent.futures import ThreadPoolExecutor
            pool = ThreadPoolExecutor(workers)
            parts = pool.map(block, starts)
        try:
            for Hb, bb in parts:                        # in block order
                H += Hb
                b += bb
        finally:
            if workers > 1 and len(starts) > 1:
                pool.shutdown()
    return H, b


#: Blocks of rows the search's M-step runs at once at most (each of ``max_block_bytes / 8``).
MSTEP_WORKERS = 8


# --------------------------------------------------------------------------- the passes

class _Pass:
    """The scores of one pass over some (patch, rotation) pairs of one level, kept until the
    patches' normalisers are known.

    ``bm`` holds each block's largest log-probability (log prior included), ``lsum`` each
    pair's sum of ``exp(logp - bm)`` over the shifts, ``keep`` whether the pair's states
    count in the patch's posterior (a refined rotation is replaced by its children, a
    dropped one is lost), ``mass`` each pair's posterior mass among this pass's states.
    Dense (every rotation of the level, lane-block layout ``(n_g, B, KB)``, patches
    ``rows`` of the chunk) or sparse (tasks of a patch's own rotations, pair-major).
    """

    def __init__(self, level, dense, **kw):
        self.level, self.dense = level, dense
        self.__dict__.update(kw)

    def terms(self):
        """``(patch, bm, kept sum)`` per block: what the patches' normalisers add up."""
        if self.dense:
            kept = (self.lsum * self.keep).sum(axis=2)
            return np.repeat(self.rows, self.bm.shape[1]), self.bm.ravel(), kept.ravel()
        kept = np.bincount(self.pair_task, weights=self.lsum * self.keep, minlength=len(self.t_patch))
        return self.t_patch, self.bm, kept


def _dense_pass(Y, model, rows, c2, inv, log_prior, log_u, timer):
    """Every rotation of the coarse level against the chunk's patches ``rows`` (exponentials kept)."""
    cs = model.coarse
    if model.view_weights is not None:      # the orientation prior folded into the energies
        cs = fold_log_prior(cs, model.view_offsets(model.spec.coarse, np.arange(cs.K)), 1.0 / (2.0 * float(inv)))
    B, KB = cs.P.shape[0], cs.KB
    L = Y.shape[1]
    S = 2 * L - 1
    Yg = np.ascontiguousarray(Y[rows])
    C = np.empty((len(rows), B, S, S, KB), model.dtype)
    bmax = np.empty((len(rows), B))
    lsum = np.empty((len(rows), B, KB))
    with timer("coarse"):
        kernels.dense_scores(Yg, cs.P, cs.E, len(rows), c2, inv, True, C, bmax, lsum)
    bm = bmax + log_prior
    f, _, lse = block_scales(bm, lsum.sum(axis=2), log_u)
    mass = (f[:, :, None] * lsum).reshape(len(rows), B * KB)[:, :cs.K]
    pos = {int(j): i for i, j in enumerate(rows)}
    return _Pass(model.spec.coarse, True, rows=np.asarray(rows), pos=pos, Y=Yg, C=C, bm=bm, lsum=lsum,
                 keep=np.ones(lsum.shape, bool), mass=mass, K=cs.K, lse=lse, log_prior=log_prior)


def _sparse_pass(Y, model, level, ptr, rot, c2, inv, log_prior, log_u, timer):
    """Each patch against its rotations ``rot[ptr[j]:ptr[j+1]]`` of ``level`` (exponentials kept)."""
    n, L, _ = Y.shape
    S = 2 * L - 1
    U, lanes = np.unique(rot, return_inverse=True)
    lanes = lanes.astype(np.int64).ravel()
    PU64 = model.projections(level, U) if len(U) else np.zeros((0, L, L))
    EU = np.empty((len(U), S, S), model.dtype)
    if len(U):
        kernels.box_energies(PU64, EU)
        if model.view_weights is not None:  # the orientation prior folded into the energies
            EU -= (model.view_offsets(level, U) / float(inv)).astype(EU.dtype)[:, None, None]
    PU = np.ascontiguousarray(PU64, dtype=model.dtype)
    t_patch, t_start, t_len = _tasks(ptr, kernels.MAX_BLOCK)
    T = len(t_patch)
    t_off = np.zeros(T, np.int64)
    if T:
        t_off[1:] = np.cumsum(t_len[:-1] * S * S)
    buf = np.empty(max(1, int(len(rot)) * S * S), model.dtype)
    bmax = np.empty(T)
    lsum = np.empty(len(rot))
    with timer(f"level_{level}"):
        if T:
            kernels.sparse_scores(Y, PU, EU, lanes, t_patch, t_start, t_len, t_off, c2, inv, buf, bmax, lsum)
    bm = bmax + log_prior
    pair_task = np.repeat(np.arange(T), t_len)
    tsum = np.bincount(pair_task, weights=lsum, minlength=T) if T else np.zeros(0)
    bmm, col = _patch_matrix(t_patch, bm, n, -np.inf)
    bs, _ = _patch_matrix(t_patch, tsum, n, 0.0)
    f, _, lse = block_scales(bmm, bs, log_u)
    mass = f[t_patch, col][pair_task] * lsum if T else np.zeros(0)
    return _Pass(level, False, ptr=ptr, rot=rot, U=U, lanes=lanes, t_patch=t_patch, t_start=t_start, t_len=t_len,
                 t_off=t_off, buf=buf, bm=bm, lsum=lsum, keep=np.ones(len(rot), bool), mass=mass,
                 pair_task=pair_task, lse=lse, log_prior=log_prior)


def bound_log_mass(model, level, rot, lhat, lse, yy, sigma2, log_prior):
    """Per (patch, rotation) pair: the log of an upper bound on the share of the patch's
    posterior that the states of the rotation's fine-level descendants can hold (theory
    section 12.11).

    Parameters
    ----------
    model : SearchModel
    level : int
        The level of the rotations ``rot``.
    rot : ndarray of int, shape (m,)
    lhat : ndarray, shape (m,)
        An upper bound on each pair's best log-probability over the shifts (log prior of
        the state included): its log of the sum over the shifts, at least.
    lse, yy : ndarray, shape (m,)
        The pair's patch's log normaliser (this pass's states and the empty state) and
        ``||y||^2``.
    sigma2 : float
        The noise variance the scores use.
    log_prior : float
        The log prior of one state at ``level`` (without the orientation prior's offset).
    """
    L = model.L
    B, log_w = model.cell_bounds(level)
    rot = np.asarray(rot, dtype=np.int64)
    x = lhat - log_prior - model.view_offsets(level, rot)        # (yy - r^2) / (2 sigma^2) at the best shift
    with np.errstate(invalid="ignore"):
        r2 = np.maximum(yy - 2.0 * sigma2 * x, 0.0)                  # r^2 at the best shift, at least
        r = np.sqrt(r2)
        gain = (r2 - np.maximum(r - B[rot], 0.0) ** 2) / (2.0 * sigma2)
        out = math.log((2 * L - 1) ** 2) + lhat + gain + log_w[rot] - lse
    return np.where(np.isfinite(lhat), out, -np.inf)


def _pair_lhat(bm_of_pair, lsum):
    """An upper bound on a pair's best state's log-probability: its block's best plus the log
    of its sum over the shifts (a sum the kernels cut to 0 below ``LOG_NEGLIGIBLE``)."""
    return bm_of_pair + np.log(np.maximum(lsum, math.exp(kernels.LOG_NEGLIGIBLE)))


def _normalisers(passes, patches, n, log_u):
    """Per chunk patch: ``(mx, Z)`` over the kept states of ``passes`` and the empty state (for ``patches``)."""
    P, BM, KS = [], [], []
    for ps in passes:
        p, bm, ks = ps.terms()
        P.append(p)
        BM.append(bm)
        KS.append(ks)
    p, bm, ks = np.concatenate(P), np.concatenate(BM), np.concatenate(KS)
    sel = np.isin(p, patches) & (ks > 0)
    p, bm, ks = p[sel], bm[sel], ks[sel]
    mx = np.full(n, log_u)
    np.maximum.at(mx, p, bm)
    Z = np.exp(log_u - mx)
    rel = bm - mx[p]
    np.add.at(Z, p, np.where(rel > kernels.LOG_NEGLIGIBLE, np.exp(np.maximum(rel, kernels.LOG_NEGLIGIBLE)), 0.0) * ks)
    return mx, Z


@jit
def _drop_tails(ptr, mass, todo, eps, fp, dropped):
    """Per patch ``j`` with ``todo[j]`` (pairs ``ptr[j]:ptr[j+1]``): the pairs of least ``mass``
    whose sum stays within ``eps`` get ``fp = 0``; ``dropped[j]`` adds their mass."""
    for j in range(ptr.shape[0] - 1):
        a, b = ptr[j], ptr[j + 1]
        if not todo[j] or b == a:
            continue
        order, nd, c = _tail(mass[a:b], eps)
        for t in range(nd):
            fp[a + order[t]] = 0.0
        dropped[j] += c


def _accumulate_pass(ps, Y, mx, Z, patches, acc, stats_eps=0.0, dropped=None):
    """A pass's kept states of the chunk patches ``patches`` into ``acc``, scaled by their posteriors.

    In a refinement (sparse) pass each patch's states of least mass, at most
    ``stats_eps`` in all, are left out (``dropped`` adds their mass)."""
    sel = np.zeros(len(mx), bool)
    sel[patches] = True
    if ps.dense:
        use = sel[ps.rows]
        rel = ps.bm - mx[ps.rows][:, None]
        f = np.where(rel > kernels.LOG_NEGLIGIBLE, np.exp(np.maximum(rel, kernels.LOG_NEGLIGIBLE)), 0.0)
        f = f / Z[ps.rows][:, None]
        fl = np.where(use[:, None, None] & ps.keep, f[:, :, None], 0.0)
        if np.any(fl > 0):
            kernels.dense_accumulate(ps.Y, ps.C, np.ascontiguousarray(fl), len(ps.rows), acc.Wd, acc.gd)
        return
    if not len(ps.rot):
        return
    tp = ps.t_patch
    rel = ps.bm - mx[tp]
    ft = np.where(rel > kernels.LOG_NEGLIGIBLE, np.exp(np.maximum(rel, kernels.LOG_NEGLIGIBLE)), 0.0) / Z[tp]
    fp = np.where(sel[tp][ps.pair_task] & ps.keep, ft[ps.pair_task], 0.0)
    if stats_eps > 0:
        _drop_tails(ps.ptr, fp * ps.lsum, sel, float(stats_eps), fp, dropped)
    if not np.any(fp > 0):
        return
    L = acc.L
    gbuf = np.empty((len(ps.rot), L, L), ps.buf.dtype)
    kernels.sparse_back(Y, tp, ps.t_start, ps.t_len, ps.t_off, fp, ps.buf, gbuf)
    pair_lane = (np.arange(len(ps.rot)) - ps.t_start[ps.pair_task]).astype(np.int64)
    order = np.argsort(ps.lanes, kind="stable").astype(np.int64)       # by rotation, patch order within
    r_ptr = np.searchsorted(ps.lanes[order], np.arange(len(ps.U) + 1)).astype(np.int64)
    used = np.zeros(len(ps.U), bool)
    used[ps.lanes[fp > 0]] = True
    r_rows = np.full(len(ps.U), -1, np.int64)
    r_rows[used] = acc.rows_of(ps.level, ps.U[used])
    kernels.sparse_accumulate(r_ptr, order, r_rows, ps.pair_task, pair_lane, ps.t_off, ps.t_len, fp,
                              ps.buf, gbuf, acc.W[ps.level], acc.g[ps.level])




@jit
def _mark(kk, j, mark, ridx, cnt):
    """Rotation ``kk`` joins patch ``j``'s refined ones (``ridx[:cnt]``, grown as needed) unless
    ``mark`` has it already; returns ``(ridx, cnt)``."""
    if mark[kk] < 0:
        mark[kk] = j
        if cnt == ridx.shape[0]:
            grown = np.empty(2 * cnt, np.int64)
            grown[:cnt] = ridx[:cnt]
            ridx = grown
        ridx[cnt] = kk
        cnt += 1
    return ridx, cnt


@jit
def _decide_kernel(ptr, rot, mass, todo, eps, cap, share, nb_ptr, nb, margin, mark, keep, dropped, partial, ub,
                   use_ub):
    """:func:`decide` for every patch ``j`` with ``todo[j]``; returns the CSR ``(rptr, ridx)``
    of the rotations each refines (sorted). ``mark`` (K_level,) int64 is scratch, all -1
    (left so). With ``use_ub`` a refined patch also refines every rotation outside the tail
    (at most ``eps``) of the bounds ``exp(ub)``."""
    n = ptr.shape[0] - 1
    rptr = np.zeros(n + 1, np.int64)
    ridx = np.empty(1024, np.int64)
    cnt = 0
    for j in range(n):
        rptr[j] = cnt
        a = ptr[j]
        b = ptr[j + 1]
        if not todo[j] or b == a:
            continue
        m = mass[a:b]
        tot = 0.0
        for t in range(b - a):
            tot += m[t]
        if not tot > 0:
            continue
        asc, ndrop, _ = _tail(m, eps)
        part = False
        if cap <= 0 or (b - a) - ndrop <= cap:
            top = asc[ndrop:]
        else:
            desc = np.argsort(-m, kind="mergesort")
            c = 0.0
            need = 0
            for t in range(b - a):
                c += m[desc[t]]
                need += 1
                if c >= share * tot:
                    break
            if need > cap:
                continue
            top = desc[:need]
            part = True
        start = cnt
        for p in top:
            k = rot[a + p]
            lo, hi = (nb_ptr[k], nb_ptr[k + 1]) if margin else (0, 1)
            for q in range(lo, hi):
                ridx, cnt = _mark(nb[q] if margin else k, j, mark, ridx, cnt)
        if use_ub:
            u = np.exp(np.minimum(ub[a:b], 700.0))
            asc_u, nd_u, _ = _tail(u, eps)
            for t in range(nd_u, b - a):
                ridx, cnt = _mark(rot[a + asc_u[t]], j, mark, ridx, cnt)
        ridx[start:cnt] = np.sort(ridx[start:cnt])
        left = 0.0
        for t in range(a, b):
            if mark[rot[t]] >= 0:
                keep[t] = False
            else:
                left += mass[t]
        for t in range(start, cnt):
            mark[ridx[t]] = -1
        if part:
            partial[j] = True
        else:
            dropped[j] += left
    rptr[n] = cnt
    return rptr, ridx[:cnt]


def decide(level, ptr, rot, mass, todo, spec, cap, keep, dropped, partial, ub=None):
    """Which rotations each patch refines from a pass at ``level`` (all patches at once).

    Patch ``j``'s pairs are ``ptr[j]:ptr[j+1]`` of ``rot`` and ``mass``; only patches with
    ``todo[j]`` decide. Below the fine level, with ``eps`` the step's share of ``prune``:

    - *concentrated* -- dropping the tail of least mass (at most ``eps``) leaves at most
      ``cap`` rotations: those and every rotation within the margin are refined (their
      states here are replaced by their children: ``keep`` set False); the tail stays
      here, at this level's resolution (``dropped[j]`` adds its mass: what the search
      leaves unrefined, at most ``eps`` per step);
    - *partly concentrated* -- at most ``cap`` rotations hold ``REFINE_SHARE`` of the mass
      (a projection's rotation with a diffuse share from shifts that leave little of it
      in the patch): those and their margin are refined, the rest stays here
      (``partial[j]`` is set);
    - *diffuse*: nothing is refined.

    With ``ub`` (per pair, :func:`bound_log_mass`) a refined patch also refines every
    rotation outside the tail of least bound (their bounds summing to at most ``eps``):
    rotations whose cells could hold a peak their centres miss.

    No state is ever dropped: a rotation not refined keeps its state at its level (it is
    computed already), so the posterior is a quadrature on an adaptive grid. Ties in mass
    are ordered by position (stable sorts). Returns the CSR ``(rptr, ridx)`` of the
    refined rotations, sorted per patch.
    """
    if spec.margin > 0:
        nb_ptr, nb = hopf.neighbour_table(level, round(spec.margin * hopf.level_step(level), 9))
    else:
        nb_ptr, nb = np.zeros(1, np.int64), np.zeros(0, np.int64)
    mark = np.full(hopf.size(level), -1, np.int64)
    use_ub = ub is not None
    ub = np.ascontiguousarray(ub, np.float64) if use_ub else np.zeros(0)
    return _decide_kernel(np.asarray(ptr, np.int64), np.asarray(rot, np.int64), np.asarray(mass, np.float64),
                          np.asarray(todo, np.bool_), float(spec.eps), int(cap or 0), REFINE_SHARE,
                          nb_ptr, nb, spec.margin > 0, mark, keep, dropped, partial, ub, use_ub)


def _decide_pass(ps, patches, spec, cap, dropped, partial, bound=None):
    """:func:`decide` on pass ``ps`` for the chunk patches ``patches``; returns ``{j: refined rotations}``.

    ``bound``: ``(model, yy, sigma2)`` (``yy`` per chunk patch) for the bound of
    :attr:`SearchSpec.bound`, or None."""
    n = len(dropped)
    if ps.dense:
        ng, K = len(ps.rows), ps.K
        todo = np.zeros(ng, bool)
        todo[[ps.pos[int(j)] for j in patches]] = True
        ptr = np.arange(ng + 1, dtype=np.int64) * K
        rot = np.tile(np.arange(K, dtype=np.int64), ng)
        keep = np.ones(ng * K, bool)
        dsub = dropped[ps.rows].copy()
        psub = partial[ps.rows].copy()
        ub = None
        if bound is not None:
            model, yy, sigma2 = bound
            KB = ps.lsum.shape[2]
            lhat = _pair_lhat(np.repeat(ps.bm, KB, axis=1)[:, :K], ps.lsum.reshape(ng, -1)[:, :K])
            ub = bound_log_mass(model, ps.level, rot, lhat.ravel(), np.repeat(ps.lse, K), np.repeat(yy[ps.rows], K),
                                sigma2, ps.log_prior)
        rptr, ridx = decide(ps.level, ptr, rot, np.ascontiguousarray(ps.mass).ravel(), todo, spec, cap, keep, dsub,
                            psub, ub)
        ps.keep.reshape(ng, -1)[:, :K] &= keep.reshape(ng, K)
        dropped[ps.rows] = dsub
        partial[ps.rows] = psub
        owner = ps.rows
    else:
        todo = np.zeros(n, bool)
        todo[np.asarray(patches, np.int64)] = True
        ub = None
        if bound is not None and len(ps.rot):
            model, yy, sigma2 = bound
            pp = ps.t_patch[ps.pair_task]
            ub = bound_log_mass(model, ps.level, ps.rot, _pair_lhat(ps.bm[ps.pair_task], ps.lsum), ps.lse[pp], yy[pp],
                                sigma2, ps.log_prior)
        rptr, ridx = decide(ps.level, ps.ptr, ps.rot, ps.mass, todo, spec, cap, ps.keep, dropped, partial, ub)
        owner = np.arange(n)
    counts = np.diff(rptr)
    return {int(owner[i]): ridx[rptr[i]:rptr[i + 1]] for i in np.nonzero(counts)[0]}


#: A partly concentrated patch refines the fewest rotations holding this share of its
#: rotation mass (and their margin); the rest of its states stay where they are.
REFINE_SHARE = 0.9


def search_chunk(patches, model, upsilon, sigma2, acc, patch_ids=None, timer=None, keep_posteriors=False,
                 records=None):
    """The coarse-to-fine E-step on one chunk of patches (module doc); adds into ``acc``.

    Parameters
    ----------
    patches : ndarray, shape (n, L, L)
    model : SearchModel
    upsilon, sigma2 : float
    acc : SearchAccumulator
    patch_ids : ndarray of int, optional
        Global patch numbers: the keys of the records read (local search) and written.
    timer : callable(name) -> context manager, optional
        Wraps ``coarse`` (the dense pass), ``level_<r>`` (each sparse pass) and ``accumulate``.
    keep_posteriors : bool
        Also return each patch's posteriors (a dict: patch position -> list of
        ``(level, rotations (m,), posteriors (m, 2L, 2L))`` in the theory's layout), the
        empty-state posteriors and each patch's finest level (tests).
    records : Records, optional
        Receives each patch's record (needs ``patch_ids``).

    Returns
    -------
    loglik : ndarray, shape (n,)
        Each patch's log-likelihood over the states its posterior counts.
    """
    timer = timer or _no_timer
    spec = model.spec
    n, L, _ = patches.shape
    check_estep_args(L, model.L, upsilon, sigma2, "the model is for")
    dt = model.dtype.type
    Y = np.ascontiguousarray(patches, dtype=model.dtype)
    inv2s2 = 1.0 / (2.0 * sigma2)
    c2, inv = dt(2.0 * inv2s2), dt(inv2s2)
    log_u = math.log(upsilon)
    rep = acc.report
    rc, rf = spec.coarse, spec.fine
    cap = spec.cap if spec.cap > 0 else None

    def log_state_prior(level):
        return math.log1p(-upsilon) - math.log((2 * L - 1) ** 2 * hopf.size(level))

    yy = np.einsum("jab,jab->j", patches, patches)
    dropped = np.zeros(n)          # mass a concentrated patch leaves unrefined (at most prune)
    partial = np.zeros(n, bool)    # patches refined in part only
    finest = np.full(n, -1)
    mx = np.zeros(n)
    Z = np.ones(n)
    kept_posts = {}
    kept_mass = []                 # (patch, level, rotation, mass) arrays of the kept states, for records

    # ---- the start: every rotation of rc (dense), or near the patch's record at rl (local search)
    prev = model.previous
    local = np.zeros(n, bool)
    if spec.local > 0 and prev is not None and patch_ids is not None:
        local = np.array([prev.has(p) for p in patch_ids], bool)
    bound = (model, yy, sigma2) if spec.bound else None
    starts = []
    t0 = time.perf_counter()
    glob = np.nonzero(~local)[0]
    if len(glob):
        starts.append(_dense_pass(Y, model, glob, c2, inv, log_state_prior(rc), log_u, timer))
        _report_add(rep, f"pairs_level_{rc}", len(glob) * hopf.size(rc))
    loc = np.nonzero(local)[0]
    rl = spec.local_level
    if len(loc):
        sub = [cells_near(rl, prev.quats[int(patch_ids[j])], spec.local) if local[j] else np.zeros(0, np.int64)
               for j in range(n)]
        ptr = _csr([len(c) for c in sub])
        starts.append(_sparse_pass(Y, model, rl, ptr, np.concatenate(sub), c2, inv, log_state_prior(rl), log_u,
                                   timer))
        _report_add(rep, f"pairs_level_{rl}", int(ptr[-1]))
        _report_add(rep, "patches_local", int(len(loc)))
    _report_add(rep, f"seconds_level_{rc}", time.perf_counter() - t0)

    # ---- decisions at the start; the refining patches go on in groups (bounded work arrays)
    nxt = {}
    for ps in starts:
        members = ps.rows if ps.dense else loc
        finest[members] = ps.level
        if ps.level < rf:
            nxt.update({j: (ps.level, r)
                        for j, r in _decide_pass(ps, members, spec, cap, dropped, partial, bound).items()})
    todo = np.array(sorted(nxt), np.int64)
    cost = np.array([8 * len(nxt[j][1]) for j in todo], np.int64)
    start = 0
    while start < len(todo):
        stop_at = start + max(1, int(np.searchsorted(np.cumsum(cost[start:]), model.max_pairs, side="right")))
        group = todo[start:stop_at]
        passes = _refine(Y, model, group, nxt, spec, cap, c2, inv, log_u, log_state_prior, dropped, partial, finest,
                         rep, timer, bound)
        gmx, gZ = _normalisers(starts + passes, group, n, log_u)
        mx[group], Z[group] = gmx[group], gZ[group]
        t0 = time.perf_counter()
        with timer("accumulate"):
            for ps in passes:
                _accumulate_pass(ps, Y, mx, Z, group, acc, spec.stats_eps, dropped)
        _report_add(rep, "seconds_accumulate", time.perf_counter() - t0)
        if keep_posteriors:
            _collect(passes, group, mx, Z, kept_posts, L)
        if records is not None:
            _final_masses(passes, group, mx, Z, kept_mass)
        start = stop_at
    others = np.setdiff1d(np.arange(n), todo)
    if len(others):
        omx, oZ = _normalisers(starts, others, n, log_u)
        mx[others], Z[others] = omx[others], oZ[others]
    t0 = time.perf_counter()
    with timer("accumulate"):
        for ps in starts:
            _accumulate_pass(ps, Y, mx, Z, np.arange(n), acc, spec.stats_eps, dropped)
    _report_add(rep, "seconds_accumulate", time.perf_counter() - t0)
    if keep_posteriors:
        _collect(starts, np.arange(n), mx, Z, kept_posts, L)
    if records is not None:
        _final_masses(starts, np.arange(n), mx, Z, kept_mass)
    del starts

    lse = mx + np.log(Z)
    w_empty = np.exp(log_u - mx) / Z
    loglik = lse - yy / (2.0 * sigma2) - 0.5 * L * L * math.log(2.0 * math.pi * sigma2)
    acc.n_patches += n
    acc.sum_empty += float(w_empty.sum())
    acc.sum_yy += float(yy.sum())
    acc.loglik += float(loglik.sum())
    _report_add(rep, "patches", n)
    _report_add(rep, "mass_pruned", float(dropped.sum()))
    _report_add(rep, "max_mass_pruned", float(dropped.max()) if n else 0.0)
    _report_add(rep, "patches_partly_refined", int(partial.sum()))
    for r in spec.levels:
        _report_add(rep, f"patches_final_level_{r}", int(np.sum(finest == r)))
    if records is not None and patch_ids is not None:
        _write_records(kept_mass, n, patch_ids, records, spec.local_level)
    if keep_posteriors:
        return loglik, kept_posts, w_empty, finest
    return loglik


def _refine(Y, model, group, nxt, spec, cap, c2, inv, log_u, log_state_prior, dropped, partial, finest, rep, timer,
            bound=None):
    """Refine the patches ``group`` (positions in the chunk) level by level; returns their passes."""
    n = len(Y)
    passes = []
    cur = {int(j): nxt[j] for j in group}
    while cur:
        level = min(lv for lv, _ in cur.values()) + 1
        now = sorted(j for j, (lv, _) in cur.items() if lv + 1 == level)
        counts = np.zeros(n, np.int64)
        counts[now] = [8 * len(cur[j][1]) for j in now]
        ptr = _csr(counts)
        rot = hopf.children(np.concatenate([cur[j][1] for j in now])).ravel()
        t0 = time.perf_counter()
        ps = _sparse_pass(Y, model, level, ptr, rot, c2, inv, log_state_prior(level), log_u, timer)
        _report_add(rep, f"pairs_level_{level}", int(ptr[-1]))
        finest[now] = level
        for j in now:
            del cur[j]
        if level < spec.fine:
            cur.update({j: (level, r) for j, r in _decide_pass(ps, now, spec, cap, dropped, partial, bound).items()})
        _report_add(rep, f"seconds_level_{level}", time.perf_counter() - t0)
        passes.append(ps)
    return passes


def _final_masses(passes, patches, mx, Z, out):
    """The posterior mass of each kept state of ``patches`` in ``passes``: appends
    ``(patch, level, rotation, mass)`` arrays (states of mass 0 left out) to ``out``."""
    want = np.zeros(len(mx), bool)
    want[np.asarray(patches, np.int64)] = True
    for ps in passes:
        if ps.dense:
            use = want[ps.rows]
            rel = ps.bm - mx[ps.rows][:, None]
            f = np.where(rel > kernels.LOG_NEGLIGIBLE, np.exp(np.maximum(rel, kernels.LOG_NEGLIGIBLE)), 0.0)
            f = f / Z[ps.rows][:, None]
            m = (f[:, :, None] * ps.lsum * ps.keep).reshape(len(ps.rows), -1)[:, :ps.K] * use[:, None]
            i, lane = np.nonzero(m > 0)
            out.append((ps.rows[i], np.full(len(i), ps.level), lane.astype(np.int64), m[i, lane]))
            continue
        rel = ps.bm - mx[ps.t_patch]
        ft = np.where(rel > kernels.LOG_NEGLIGIBLE, np.exp(np.maximum(rel, kernels.LOG_NEGLIGIBLE)), 0.0)
        m = (ft / Z[ps.t_patch])[ps.pair_task] * ps.lsum * ps.keep
        owner = ps.t_patch[ps.pair_task]
        sel = np.nonzero((m > 0) & want[owner])[0]
        out.append((owner[sel], np.full(len(sel), ps.level), ps.rot[sel], m[sel]))


@jit
def _top_states(ptr, mass, eps, most):
    """Per patch (states ``ptr[j]:ptr[j+1]``): positions of its states of largest mass holding
    all but ``eps`` of its mass (ties in position order), none when more than ``most`` are
    needed. Returns the CSR ``(sptr, pos)``."""
    n = ptr.shape[0] - 1
    sptr = np.zeros(n + 1, np.int64)
    pos = np.empty(n * most, np.int64)
    cnt = 0
    for j in range(n):
        sptr[j] = cnt
        a, b = ptr[j], ptr[j + 1]
        tot = 0.0
        for t in range(a, b):
            tot += mass[t]
        if b == a or not tot > 0:
            continue
        desc = np.argsort(-mass[a:b], kind="mergesort")
        c = 0.0
        need = 0
        for t in range(b - a):
            c += mass[a + desc[t]]
            need += 1
            if c >= (1.0 - eps) * tot:
                break
        if need > most:
            continue
        for t in range(need):
            pos[cnt] = a + desc[t]
            cnt += 1
    sptr[n] = cnt
    return sptr, pos[:cnt]


def _coarsened(P, LV, R, Mm, level):
    """States finer than ``level`` as their ancestors there, masses summed (in the order given);
    sorted by patch, level and rotation."""
    R = hopf.parent(R, np.maximum(LV - level, 0))
    LV = np.minimum(LV, level)
    order = np.lexsort((R, LV, P))                                      # stable: equal states in the order given
    P, LV, R, Mm = P[order], LV[order], R[order], Mm[order]
    new = np.ones(len(P), bool)
    new[1:] = (P[1:] != P[:-1]) | (LV[1:] != LV[:-1]) | (R[1:] != R[:-1])
    start = np.nonzero(new)[0]
    return P[start], LV[start], R[start], (np.add.reduceat(Mm, start) if len(start) else Mm)


def _write_records(kept, n, patch_ids, records, level=None):
    """Each patch's record (:func:`numbaem.em.estep.record_of`'s rule) from its kept states' masses.

    With ``level``, a patch whose states need more than :data:`numbaem.em.estep.RECORD_MAX`
    rotations (a peak on a fine level: at 1.875 degrees and SNR 100 most do) is recorded one
    level coarser, its states counted as their parents there (masses summed), and so on
    down to ``level`` (the local search's start level, :attr:`SearchSpec.local_level`): a
    posterior as concentrated in angle has a record on any fine grid, as precise as the
    record rule allows.
    """
    from ..model.rotations import matrices_to_quaternions
    if kept:
        P, LV, R, Mm = (np.concatenate(x) for x in zip(*kept))
    else:
        P, LV, R, Mm = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    order = np.argsort(P, kind="stable")
    P, LV, R, Mm = P[order], LV[order], R[order], Mm[order]
    done = np.zeros(n, bool)
    top = int(LV.max()) if len(LV) else 0
    tries = [None] + (list(range(top - 1, level - 1, -1)) if level is not None else [])
    for lv_try in tries:
        sel = ~done[P]
        p, lv, r, m = P[sel], LV[sel], R[sel], Mm[sel]
        if lv_try is not None:
            if not np.any(lv > lv_try):
                continue
            p, lv, r, m = _coarsened(p, lv, r, m, lv_try)
        ptr = np.searchsorted(p, np.arange(n + 1)).astype(np.int64)
        sptr, pos = _top_states(ptr, np.ascontiguousarray(m, np.float64), RECORD_EPS, RECORD_MAX)
        q = np.zeros((len(pos), 4), np.float32)
        for v in np.unique(lv[pos]):
            at = np.nonzero(lv[pos] == v)[0]
            q[at] = matrices_to_quaternions(hopf.rotations(int(v), r[pos[at]]))
        for j in np.nonzero(~done)[0]:
            rec = q[sptr[j]:sptr[j + 1]]
            if lv_try is None or len(rec):          # every patch gets one (empty: no local search)
                records.quats[int(patch_ids[j])] = rec
            done[j] = len(rec) > 0 or not ptr[j + 1] > ptr[j]
        if done.all():
            break


def _collect(passes, patches, mx, Z, out, L):
    """The kept posteriors of ``patches`` in ``passes`` (the theory's layout), into ``out[j]``."""
    S = 2 * L - 1
    idx = shift_index(L)
    want = set(int(j) for j in patches)
    for ps in passes:
        if ps.dense:
            for i, j in enumerate(ps.rows):
                if int(j) not in want:
                    continue
                f = np.exp(np.maximum(ps.bm[i] - mx[j], kernels.LOG_NEGLIGIBLE)) / Z[j]
                f = np.where(ps.bm[i] - mx[j] > kernels.LOG_NEGLIGIBLE, f, 0.0)
                lanes = (ps.C[i] * f[:, None, None, None]).transpose(0, 3, 1, 2).reshape(-1, S, S)[:ps.K]
                keep = ps.keep[i].reshape(-1)[:ps.K]
                lane = np.nonzero(keep)[0]
                if not len(lane):
                    continue
                w = np.zeros((len(lane), 2 * L, 2 * L))
                w[:, idx[:, None], idx[None, :]] = lanes[lane]
                out.setdefault(int(j), []).append((ps.level, lane, w))
            continue
        for i in range(len(ps.t_patch)):
            j = int(ps.t_patch[i])
            if j not in want:
                continue
            p0, nb, off = ps.t_start[i], ps.t_len[i], ps.t_off[i]
            rel = ps.bm[i] - mx[j]
            f = math.exp(max(rel, kernels.LOG_NEGLIGIBLE)) / Z[j] if rel > kernels.LOG_NEGLIGIBLE else 0.0
            blk = ps.buf[off:off + S * S * nb].reshape(S, S, nb).transpose(2, 0, 1) * f
            keep = ps.keep[p0:p0 + nb]
            if not keep.any():
                continue
            w = np.zeros((int(keep.sum()), 2 * L, 2 * L))
            w[:, idx[:, None], idx[None, :]] = blk[keep]
            out.setdefault(j, []).append((ps.level, ps.rot[p0:p0 + nb][keep], w))


# --------------------------------------------------------------------------- a stream of chunks

def search_stats(source, idx, model, upsilon, sigma2, n_chunk, progress=None, timer=None):
    """Coarse-to-fine E-step over the patches ``idx`` of ``source``, chunk by chunk.

    With CTF groups (``source.filter_matrices()``, theory section 11) the patches of each
    group are searched against that group's filtered projections (:meth:`SearchModel.for_group`)
    and the result is a :class:`GroupSearchStats`.

    Returns
    -------
    SearchStats or GroupSearchStats
        On the rows reached (``rotations``, numbered over the levels:
        :meth:`SearchModel.rotations`), with the search report (``search``) and, when
        ``model.record``, each patch's record (``records``).
    """
    idx = np.asarray(idx, dtype=np.int64)
    get = getattr(source, "filter_matrices", None)
    filters = get() if get is not None else None
    if filters is None or model.filt is not None:
        return _search_stats(source, idx, model, upsilon, sigma2, n_chunk, progress, timer)
    groups = source.patch_groups(idx)
    parts = []
    for g in range(len(filters)):
        sel = idx[groups == g]
        part = model.for_group(filters[g])
        if model.max_rows is not None and model.max_rows < model.K:   # a binding bound: the groups'
            part.max_rows = max(hopf.size(model.spec.coarse), model.max_rows // len(filters))  # statistics add up
        parts.append(_search_stats(source, sel, part, upsilon, sigma2, n_chunk, progress, timer) if len(sel) else None)
    return GroupSearchStats(parts, model)


def _search_stats(source, idx, model, upsilon, sigma2, n_chunk, progress=None, timer=None):
    clock = timer or _no_timer
    L = source.L
    acc = SearchAccumulator(model)
    buf = np.empty((n_chunk, L, L))
    records = Records() if model.record else None
    for i in range(0, len(idx), n_chunk):
        sel = idx[i:i + n_chunk]
        with clock("read_patches"):
            patches = source.get(sel, out=buf[:len(sel)])
        search_chunk(patches, model, upsilon, sigma2, acc, patch_ids=sel, timer=timer, records=records)
        if progress is not None:
            progress(len(sel))
    with clock("rest"):
        stats = acc.to_stats()
    stats.records = records
    return stats


def stats_from_arrays(d):
    """Statistics from their ``to_arrays`` dict: :class:`SufficientStats`, or a search's
    :class:`numbaem.em.search.SearchStats` (which has data images ``g``)."""
    if "g" in d:
        return SearchStats.from_arrays(d)
    return SufficientStats.from_arrays(d)


def add_stat_arrays(a, b):
    """``a + b`` of two statistics' ``to_arrays`` dicts into new arrays (inputs untouched)."""
    plain = ("W", "G", "n_patches", "sum_empty", "sum_yy", "loglik")
    if set(a) == set(b) == set(plain):
        return {k: a[k] + b[k] for k in a}
    sa = stats_from_arrays({k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in a.items()})
    return sa.add(stats_from_arrays(b)).to_arrays()


class GroupSearchStats:
    """A search's statistics per CTF group (``parts[g]``: :class:`SearchStats`, or None for a
    group with no patch in the minibatch), with the totals of :class:`SearchStats`."""

    def __init__(self, parts, model=None):
        self.parts = list(parts)
        live = [p for p in self.parts if p is not None]
        self.n_patches, self.sum_empty, self.sum_yy, self.loglik = 0, 0.0, 0.0, 0.0
        self.search = None
        self.records = None
        for p in live:
            add_totals(self, p)
        self.rotations = np.unique(np.concatenate([p.rotations for p in live])) if live else np.zeros(0, np.int64)

    @property
    def nbytes(self):
        return sum(p.nbytes for p in self.parts if p is not None)


def chunk_bytes(n_chunk, spec, L, itemsize):
    """Bytes of a chunk's work arrays in a search (an upper bound).

    The dense pass at level ``coarse`` keeps its exponentials (as the exhaustive direct
    route: ``(2L-1)^2`` per pair) and per pair a lane sum and a mass. The refining patches
    are scored in groups of at most :data:`MAX_PAIRS` pairs (or one patch's, if more:
    ``8 cap`` times the cells within the margin, or a whole level without a cap), each
    pair with its exponentials, back-correlation, indices, and a projection and energies
    of its rotation.
    """
    S = 2 * L - 1
    Kc = hopf.size(spec.coarse)
    dense = n_chunk * Kc * (S * S * itemsize + 3 * 8)
    one = max(hopf.size(r) if spec.cap == 0 else min(hopf.size(r), 8 * spec.cap * _margin_cells(spec.margin))
              for r in spec.levels[1:])
    pairs = max(MAX_PAIRS, one)
    group = pairs * ((S * S + 2 * L * L) * itemsize + 8 * 8 + L * L * 8)
    return dense + group + n_chunk * L * L * (itemsize + 3 * 8) + kernels.MAX_BLOCK * (S * S + 2 * L * L) * 8


def _margin_cells(margin):
    """Cells within ``margin`` steps of one cell, at most (measured at levels 1-3: 17 at 1.5, 13 at 1.25)."""
    return 1 if margin <= 0 else int(max(1, math.ceil(8 * margin ** 3 + 1)))
