"""Coarse-to-fine rotation search on the hierarchical Hopf grid (MODEL sections 5-6; ``docs/theory-search.md``).

The exhaustive E-step scores every patch against every rotation of one grid. Here a stage
has a *coarse* level ``rc`` and a *fine* level ``rf >= rc`` of the Hopf grid
(:mod:`numbaem.model.hopf`, ``72 * 8^r`` rotations at level ``r``, children of a cell
contiguous):

1. Every patch is scored against every rotation of level ``rc`` (the dense direct
   kernels) under the prior ``(1 - upsilon) / ((2L-1)^2 K_rc)`` per state, giving the
   posterior mass ``pi_jk`` of each rotation summed over shifts.
2. A patch whose posterior is *concentrated* -- after dropping the rotations of least mass
   whose total is at most ``eps = prune / (rf - rc)``, at most ``cap`` rotations are
   left -- is *refined*: the rotations left, joined by every rotation of the level within
   ``margin`` grid steps of them (a peak between two centres is refined from both), are
   replaced by their 8 children at the next level, scored under that level's prior (the
   sparse kernels: each patch against its own rotations), and step 2 repeats down to
   ``rf``. The mass dropped is what the patch loses; it is at most ``prune``.
3. A patch whose posterior is diffuse (an empty patch, a projection that barely
   overlaps it) stops refining: its posteriors live on the level it reached, where they
   were just computed in full (nothing is lost). A patch that reaches ``rf`` stops there.
4. Each patch's posteriors, normalised over its final level's states and the empty state,
   feed the sufficient statistics of the rotations of that level (rows keyed by level and
   rotation: :attr:`numbaem.em.estep.SufficientStats.rotations`, see :meth:`SearchModel.rotations`).

With ``prune = 0`` and no ``cap`` every patch reaches ``rf`` having evaluated every
rotation, and the E-step equals the exhaustive one on level ``rf`` to round-off (tested).
The masses dropped estimate the fine posterior mass lost: exact for the coarse
posteriors, and a good estimate where the coarse level resolves the posterior (measured
and tested in ``tests/test_search.py``). Per iteration the search reports the (patch,
rotation) pairs scored at each level, the fraction of patches that reached ``rf``, the
mass dropped (sum and largest per patch) and the seconds of each pass.

Local search (``local > 0``): a patch with a *record* (:class:`numbaem.em.estep.Records`:
the few rotations its posterior held at its last E-step, on whatever grid) is scored at
level ``max(rc, rf - 2)`` only on the rotations within ``local`` degrees of its record;
the rest follows as above. A patch without one (first seen, or diffuse last time: its
posterior needed more than 16 rotations) takes the full level ``rc``.
"""
import dataclasses
import logging
import math
import time

import numpy as np

from ..model import hopf
from ..model.projection import _steer, direction_images
from ..runtime.errors import NumbaemError
from ..runtime.jit import jit
from . import kernels
from .estep import (RECORD_EPS, Records, _no_timer, block_scales, choose_precision, direct_spectra, merge_reports,
                    record_of, shift_index)

logger = logging.getLogger(__name__)

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
    """

    coarse: int
    fine: int
    prune: float = 1e-3
    cap: int = 32
    margin: float = 1.5
    local: float = 0.0

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
        """Mass dropped per refinement step at most."""
        return self.prune / (self.fine - self.coarse)

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
    """

    route = "search"

    def __init__(self, theta, basis, spec, sigma2=None, precision="auto", previous=None, record=False):
        from ..model.projection import project_hopf
        self.theta = np.asarray(theta, dtype=np.float64)
        self.basis = basis
        self.spec = spec
        self.L = basis.L
        coarse = project_hopf(self.theta, basis, spec.coarse)
        self.dtype = choose_precision(coarse, sigma2, precision)
        self.coarse = direct_spectra(coarse, self.dtype)
        self.previous = previous
        self.record = bool(record)
        self.max_pairs = MAX_PAIRS
        self._q = {}

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

    def projections(self, level, idx):
        """Projections (n, L, L) float64 of the rotations ``idx`` of ``level``, steered."""
        idx = np.asarray(idx, dtype=np.int64)
        q = self.direction_images(level)
        pix, _ = hopf.tree_to_cells(level, idx)
        alpha = hopf.euler_angles(level, idx)[:, 0]
        out = np.empty((len(idx), self.L * self.L))
        _steer(q, pix, alpha, self.basis.lmax, out)
        return out.reshape(-1, self.L, self.L)


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


def prune(ptr, mass, eps):
    """Per patch, keep the states of largest mass, dropping a tail of total mass at most ``eps``.

    Parameters
    ----------
    ptr : ndarray, shape (n + 1,)
        Patch ``j``'s states are ``ptr[j]:ptr[j+1]`` of ``mass``.
    mass : ndarray
        Posterior masses.
    eps : float

    Returns
    -------
    keep : ndarray of bool, like ``mass``
    dropped : ndarray, shape (n,)
        The mass dropped per patch (at most ``eps``).
    """
    n = len(ptr) - 1
    if eps <= 0 or len(mass) == 0:
        return np.ones(len(mass), bool), np.zeros(n)
    seg = np.repeat(np.arange(n), np.diff(ptr))
    order = np.lexsort((mass, seg))                       # per patch, ascending mass
    m = mass[order]
    cs = np.cumsum(m)
    start = ptr[:-1]
    before = np.where(start > 0, cs[np.maximum(start - 1, 0)], 0.0)
    within = cs - before[seg]                             # ascending cumulative mass within the patch
    drop_sorted = within <= eps
    keep = np.ones(len(mass), bool)
    keep[order] = ~drop_sorted
    dropped = np.bincount(seg, weights=np.where(drop_sorted, m, 0.0), minlength=n)
    return keep, dropped


def expand(level, lists, margin):
    """Each patch's rotations joined by their neighbours within ``margin`` steps of ``level`` (sorted)."""
    if margin <= 0:
        return lists
    ptr, nbr = hopf.neighbour_table(level, round(margin * hopf.level_step(level), 9))
    out = []
    for c in lists:
        if len(c) == 0:
            out.append(c)
        else:
            out.append(np.unique(np.concatenate([nbr[ptr[k]:ptr[k + 1]] for k in c])))
    return out


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

    Per level ``r``: ``W[r]`` (K_r, S, S) at the linear shifts and ``g[r]`` (K_r, L, L),
    allocated zero (pages of rotations no patch reaches are never written) and counted
    whole by the memory plan; the dense coarse pass adds into lane-block arrays
    (:class:`numbaem.em.estep.DirectAccumulator` layout) folded in at the end.
    """

    def __init__(self, model):
        L = model.L
        S = 2 * L - 1
        self.model, self.L = model, L
        self.W = {r: np.zeros((hopf.size(r), S, S)) for r in model.spec.levels}
        self.g = {r: np.zeros((hopf.size(r), L, L)) for r in model.spec.levels}
        self.touched = {r: np.zeros(hopf.size(r), bool) for r in model.spec.levels}
        B, _, _, KB = model.coarse.P.shape
        self.Wd = np.zeros((B, S, S, KB))
        self.gd = np.zeros((B, L, L, KB))
        self.n_patches = 0
        self.sum_empty = 0.0
        self.sum_yy = 0.0
        self.loglik = 0.0
        self.report = {}

    def to_stats(self):
        """:class:`SearchStats` of the rows some patch reached (copies of those rows only)."""
        model, L = self.model, self.L
        S = 2 * L - 1
        rc = model.spec.coarse
        Kc = hopf.size(rc)
        Wd = self.Wd.transpose(0, 3, 1, 2).reshape(-1, S, S)[:Kc]
        gd = self.gd.transpose(0, 3, 1, 2).reshape(-1, L, L)[:Kc]
        self.W[rc] += Wd
        self.g[rc] += gd
        self.touched[rc] |= np.any(Wd.reshape(Kc, -1) != 0, axis=1)
        self.Wd[:] = 0.0
        self.gd[:] = 0.0
        rows, Ws, gs = [], [], []
        for r in model.spec.levels:
            t = np.nonzero(self.touched[r])[0]
            rows.append(model.offset(r) + t)
            Ws.append(self.W[r][t])
            gs.append(self.g[r][t])
        return SearchStats(np.concatenate(Ws), np.concatenate(gs), np.concatenate(rows), self.n_patches,
                           self.sum_empty, self.sum_yy, self.loglik, search=dict(self.report))


@dataclasses.dataclass
class SearchStats:
    """Sufficient statistics of a search (MODEL section 6) on the rows some patch reached.

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
        rot = np.union1d(self.rotations, other.rotations)
        W = np.zeros((len(rot),) + self.W.shape[1:])
        g = np.zeros((len(rot),) + self.g.shape[1:])
        for part in (self, other):
            pos = np.searchsorted(rot, part.rotations)
            W[pos] += part.W
            g[pos] += part.g
        self.W, self.g, self.rotations = W, g, rot
        self.n_patches += other.n_patches
        self.sum_empty += other.sum_empty
        self.sum_yy += other.sum_yy
        self.loglik += other.loglik
        self.search = merge_reports(self.search, other.search)
        if other.records is not None:
            self.records = (self.records or Records()).update(other.records)
        return self

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
        rec = None
        if "records_ids" in d:
            rec = Records.from_arrays(d.pop("records_ids"), d.pop("records_ptr"), d.pop("records_quats"))
        return cls(**d, records=rec)


@jit
def _box_sums(W, h):
    """``h[q] = sum_s W[s] [q + s in the box]`` for each row (MODEL section 6's ``h_k = sum_l W_k[l] m_l``).

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


def search_normal_equations(stats, spec, basis, max_block_bytes=16 << 20):
    """``H`` and ``b`` of MODEL section 6 from a search's statistics.

    ``H = sum_k A_k^T diag(h_k) A_k`` and ``b = sum_k A_k^T g_k`` over the rows that carry
    weight (:func:`significant_rows`), with ``A_k`` built for blocks of rows (at most
    ``max_block_bytes`` of ``A``; never all rows at once) and ``h_k`` by :func:`box_sums`.
    """
    from ..model.projection import projection_matrices
    L, M = basis.L, basis.M
    H = np.zeros((M, M))
    b = np.zeros(M)
    keep = significant_rows(stats)
    step = max(1, int(max_block_bytes // (L * L * M * 8)))
    for i in range(0, len(keep), step):
        pos = keep[i:i + step]
        A = projection_matrices(basis, rotations_of_rows(spec, stats.rotations[pos]))
        h = np.sqrt(box_sums(stats.W[pos], L)).reshape(len(pos), L * L)
        B = (h[:, :, None] * A).reshape(-1, M)
        H += B.T @ B
        del B
        b += A.reshape(-1, M).T @ stats.g[pos].reshape(-1)
    return H, b


# --------------------------------------------------------------------------- the passes

def _sparse_level(Y, model, level, ptr, rot, c2, inv, log_prior, log_u, timer):
    """Score each patch against its rotations ``rot[ptr[j]:ptr[j+1]]`` of ``level`` (exponentials kept).

    Returns a dict with the per-pair posterior masses (normalised over the patch's states
    at this level and the empty state), the per-patch ``w_empty`` and log-sum-exp, and
    what the accumulation needs.
    """
    n, L, _ = Y.shape
    S = 2 * L - 1
    U, lanes = np.unique(rot, return_inverse=True)
    lanes = lanes.astype(np.int64).ravel()
    PU64 = model.projections(level, U) if len(U) else np.zeros((0, L, L))
    EU = np.empty((len(U), S, S), model.dtype)
    if len(U):
        kernels.box_energies(PU64, EU)
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
    tsum = np.add.reduceat(lsum, t_start) if T else np.zeros(0)
    bm, col = _patch_matrix(t_patch, bmax + log_prior, n, -np.inf)
    bs, _ = _patch_matrix(t_patch, tsum, n, 0.0)
    f, w_empty, lse = block_scales(bm, bs, log_u)
    f_task = f[t_patch, col] if T else np.zeros(0)
    pair_task = np.repeat(np.arange(T), t_len)
    mass = f_task[pair_task] * lsum if T else np.zeros(0)
    return dict(level=level, mass=mass, w_empty=w_empty, lse=lse, ptr=ptr, rot=rot, U=U, lanes=lanes,
                t_patch=t_patch, t_start=t_start, t_len=t_len, t_off=t_off, buf=buf, f=f_task, pair_task=pair_task)


def _accumulate_sparse(Y, res, stop, acc):
    """The posteriors of the patches ``stop`` (bool, n) from a sparse pass into ``acc`` (their level)."""
    L = Y.shape[1]
    f = np.where(stop[res["t_patch"]], res["f"], 0.0) if len(res["f"]) else res["f"]
    if not np.any(f > 0):
        return
    rot, lanes = res["rot"], res["lanes"]
    t_start, t_len, t_off = res["t_start"], res["t_len"], res["t_off"]
    gbuf = np.empty((len(rot), L, L), Y.dtype)
    kernels.sparse_back(Y, res["t_patch"], t_start, t_len, t_off, f, res["buf"], gbuf)
    pair_task = res["pair_task"]
    pair_lane = (np.arange(len(rot)) - t_start[pair_task]).astype(np.int64)
    order = np.argsort(lanes, kind="stable").astype(np.int64)     # by rotation, patch order within
    r_ptr = np.searchsorted(lanes[order], np.arange(len(res["U"]) + 1)).astype(np.int64)
    level = res["level"]
    kernels.sparse_accumulate(r_ptr, order, res["U"].astype(np.int64), pair_task, pair_lane, t_off, t_len, f,
                              res["buf"], gbuf, acc.W[level], acc.g[level])
    acc.touched[level][res["U"][np.unique(lanes[f[pair_task] > 0])]] = True


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
        Also return the posteriors of the patches that reached the fine level (a dict:
        patch position -> (its fine rotations (m,), their posteriors (m, 2L, 2L) in MODEL's
        layout)), the empty-state posteriors and each patch's final level (tests).
    records : Records, optional
        Receives each patch's record (needs ``patch_ids``).

    Returns
    -------
    loglik : ndarray, shape (n,)
        Each patch's log-likelihood over the states of its final level.
    """
    timer = timer or _no_timer
    spec = model.spec
    n, L, _ = patches.shape
    if L != model.L:
        raise NumbaemError(f"patches are {L}x{L} but the model is for {model.L}x{model.L}; use one patch size")
    if not 0.0 < upsilon < 1.0:
        raise NumbaemError(f"upsilon={upsilon} must lie strictly between 0 and 1")
    if not sigma2 > 0:
        raise NumbaemError(f"sigma2={sigma2} must be positive; give the noise variance of the micrograph pixels")
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

    dropped = np.zeros(n)
    final = np.full(n, -1)
    lse = np.zeros(n)
    w_empty = np.zeros(n)
    rec_mass = [None] * n          # the final states' masses and rotations, for the records
    rec_rot = [None] * n
    post_fine = []

    # ---- level rc: all of it (dense), or near the patch's record (local search)
    prev = model.previous
    local = np.zeros(n, bool)
    if spec.local > 0 and prev is not None and patch_ids is not None:
        local = np.array([prev.has(p) for p in patch_ids], bool)
    Kc = hopf.size(rc)
    t0 = time.perf_counter()
    glob = np.nonzero(~local)[0]
    lists, masses = [np.zeros(0, np.int64)] * n, [np.zeros(0)] * n
    dense = None
    if len(glob):
        cs = model.coarse
        B, KB = cs.P.shape[0], cs.KB
        S = 2 * L - 1
        Yg = np.ascontiguousarray(Y[glob])
        C = np.empty((len(glob), B, S, S, KB), model.dtype)
        bmax = np.empty((len(glob), B))
        lsum = np.empty((len(glob), B, KB))
        with timer("coarse"):
            kernels.dense_scores(Yg, cs.P, cs.E, len(glob), c2, inv, True, C, bmax, lsum)
        f, we, ls = block_scales(bmax + log_state_prior(rc), lsum.sum(axis=2), log_u)
        mass = (f[:, :, None] * lsum).reshape(len(glob), B * KB)[:, :Kc]
        allc = np.arange(Kc, dtype=np.int64)
        for i, j in enumerate(glob):
            lists[j], masses[j] = allc, mass[i]
            lse[j], w_empty[j] = ls[i], we[i]
        dense = dict(Y=Yg, C=C, f=f)
        _report_add(rep, f"pairs_level_{rc}", len(glob) * Kc)
    sparse_rl = None
    loc = np.nonzero(local)[0]
    rl = spec.local_level
    if len(loc):
        sub = [cells_near(rl, prev.quats[int(patch_ids[j])], spec.local) if local[j] else np.zeros(0, np.int64)
               for j in range(n)]
        ptr = _csr([len(c) for c in sub])
        sparse_rl = _sparse_level(Y, model, rl, ptr, np.concatenate(sub), c2, inv, log_state_prior(rl), log_u, timer)
        for j in loc:
            lists[j] = sub[j]
            masses[j] = sparse_rl["mass"][ptr[j]:ptr[j + 1]]
            lse[j], w_empty[j] = sparse_rl["lse"][j], sparse_rl["w_empty"][j]
        _report_add(rep, f"pairs_level_{rl}", int(ptr[-1]))
        _report_add(rep, "patches_local", int(len(loc)))
    _report_add(rep, f"seconds_level_{rc}", time.perf_counter() - t0)

    # ---- each start's decisions, then the refinement of groups of patches (bounded work arrays)
    state = dict(lists=lists, masses=masses, lse=lse, w_empty=w_empty, dropped=dropped, final=final,
                 rec_mass=rec_mass, rec_rot=rec_rot, post_fine=post_fine)
    for level, members in ((rc, ~local), (rl, local)):
        if not members.any():
            continue
        refine = _decide(state, members, level, spec, cap, rep)
        stop = members & ~refine
        t0 = time.perf_counter()
        with timer("accumulate"):
            if level == rc and not members[loc].any() and dense is not None:
                fs = np.where(stop[glob][:, None], dense["f"], 0.0)
                if np.any(fs > 0):
                    kernels.dense_accumulate(dense["Y"], dense["C"], fs, len(glob), acc.Wd, acc.gd)
            if members is local:
                _accumulate_sparse(Y, sparse_rl, stop, acc)
        _report_add(rep, "seconds_accumulate", time.perf_counter() - t0)
        nxt = _next_lists(state, refine, level, spec)
        todo = np.nonzero(refine)[0]
        cost = np.array([len(nxt[j]) for j in todo], np.int64)
        start = 0
        while start < len(todo):
            stop_at = start + max(1, int(np.searchsorted(np.cumsum(cost[start:]), model.max_pairs, side="right")))
            group = todo[start:stop_at]
            _refine(Y, model, group, {j: nxt[j] for j in group}, level, state, acc, c2, inv, log_u,
                    log_state_prior, cap, keep_posteriors, timer)
            start = stop_at
    del dense, sparse_rl

    yy = np.einsum("jab,jab->j", patches, patches)
    loglik = lse - yy / (2.0 * sigma2) - 0.5 * L * L * math.log(2.0 * math.pi * sigma2)
    acc.n_patches += n
    acc.sum_empty += float(w_empty.sum())
    acc.sum_yy += float(yy.sum())
    acc.loglik += float(loglik.sum())
    _report_add(rep, "patches", n)
    _report_add(rep, "mass_pruned", float(dropped.sum()))
    _report_add(rep, "max_mass_pruned", float(dropped.max()) if n else 0.0)
    if records is not None and patch_ids is not None:
        from ..model.rotations import matrices_to_quaternions
        for j in range(n):
            records.quats[int(patch_ids[j])] = record_of(
                rec_mass[j], lambda pos, j=j: matrices_to_quaternions(hopf.rotations(final[j], rec_rot[j][pos])),
                RECORD_EPS)
    if keep_posteriors:
        S = 2 * L - 1
        idx = shift_index(L)
        post = {}
        for r in post_fine:
            for i in range(len(r["t_patch"])):
                j, p0, nb, off = r["t_patch"][i], r["t_start"][i], r["t_len"][i], r["t_off"][i]
                if final[j] != rf:
                    continue
                blk = r["buf"][off:off + S * S * nb].reshape(S, S, nb) * r["f"][i]
                w = np.zeros((nb, 2 * L, 2 * L))
                w[:, idx[:, None], idx[None, :]] = blk.transpose(2, 0, 1)
                rots, ws = post.get(j, (np.zeros(0, np.int64), np.zeros((0, 2 * L, 2 * L))))
                post[j] = (np.concatenate([rots, r["rot"][p0:p0 + nb]]), np.concatenate([ws, w]))
        return loglik, post, w_empty, final
    return loglik


def _decide(state, active, level, spec, cap, rep):
    """Which active patches refine from ``level`` (the rest stop there); records the stops."""
    n = len(active)
    refine = np.zeros(n, bool)
    if level < spec.fine:
        for j in np.nonzero(active)[0]:
            m = state["masses"][j]
            keep, drop = prune(np.array([0, len(m)]), m, spec.eps)
            ok = cap is None or keep.sum() <= cap
            if ok and len(m):
                refine[j] = True
                state["dropped"][j] += drop[0]
                state["lists"][j] = state["lists"][j][keep]
    stop = active & ~refine
    for j in np.nonzero(stop)[0]:
        state["final"][j] = level
        state["rec_mass"][j], state["rec_rot"][j] = state["masses"][j], state["lists"][j]
    _report_add(rep, f"patches_final_level_{level}", int(stop.sum()))
    return refine


def _next_lists(state, refine, level, spec):
    """The rotations each refining patch scores at ``level + 1``: children of its kept ones and their margin."""
    lists = expand(level, [state["lists"][j] if refine[j] else np.zeros(0, np.int64) for j in range(len(refine))],
                   spec.margin)
    return [hopf.children(c).ravel() if refine[j] else np.zeros(0, np.int64) for j, c in enumerate(lists)]


def _refine(Y, model, group, lists, level, state, acc, c2, inv, log_u, log_state_prior, cap, keep_posteriors, timer):
    """Refine the patches ``group`` (positions in the chunk) from ``level`` down to their stop."""
    spec = model.spec
    rep = acc.report
    n = len(Y)
    active = np.zeros(n, bool)
    active[group] = True
    cur = {j: lists[j] for j in group}
    while active.any():
        level += 1
        full = [cur[j] if active[j] else np.zeros(0, np.int64) for j in range(n)]
        ptr = _csr([len(c) for c in full])
        t0 = time.perf_counter()
        res = _sparse_level(Y, model, level, ptr, np.concatenate(full), c2, inv, log_state_prior(level), log_u,
                            timer)
        for j in np.nonzero(active)[0]:
            state["lists"][j] = full[j]
            state["masses"][j] = res["mass"][ptr[j]:ptr[j + 1]]
            state["lse"][j], state["w_empty"][j] = res["lse"][j], res["w_empty"][j]
        _report_add(rep, f"pairs_level_{level}", int(ptr[-1]))
        _report_add(rep, f"seconds_level_{level}", time.perf_counter() - t0)
        refine = _decide(state, active, level, spec, cap, rep)
        stop = active & ~refine
        t0 = time.perf_counter()
        with timer("accumulate"):
            _accumulate_sparse(Y, res, stop, acc)
        _report_add(rep, "seconds_accumulate", time.perf_counter() - t0)
        if keep_posteriors and level == spec.fine:
            state["post_fine"].append(res)
        nxt = _next_lists(state, refine, level, spec)
        cur = {j: nxt[j] for j in np.nonzero(refine)[0]}
        active = refine


# --------------------------------------------------------------------------- a stream of chunks

def search_stats(source, idx, model, upsilon, sigma2, n_chunk, progress=None, timer=None):
    """Coarse-to-fine E-step over the patches ``idx`` of ``source``, chunk by chunk.

    Returns
    -------
    SearchStats
        On the rows reached (``rotations``, numbered over the levels:
        :meth:`SearchModel.rotations`), with the search report (``search``) and, when
        ``model.record``, each patch's record (``records``).
    """
    clock = timer or _no_timer
    L = source.L
    acc = SearchAccumulator(model)
    buf = np.empty((n_chunk, L, L))
    records = Records() if model.record else None
    idx = np.asarray(idx, dtype=np.int64)
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


def accumulator_bytes(spec, L):
    """Bytes of the :class:`SearchAccumulator` of a search (every level dense)."""
    S = 2 * L - 1
    return sum(hopf.size(r) for r in spec.levels) * ((S * S + L * L) * 8 + 1) + hopf.size(spec.coarse) * 8 * (S * S + L * L)


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
