"""E-step (theory sections 4 and 5) and the sufficient statistics it feeds to the M-step (section 6).

For patch ``j``, rotation ``k`` and non-empty shift ``l``:

    ||y_j - C T_l Z p_k||^2 = ||y_j||^2 - 2 c_jk[l] + e_k[l],
    c_jk = IFFT2(FFT2(Z y_j) conj(FFT2(Z p_k))),   e_k = IFFT2(FFT2(Z 1) conj(FFT2(Z p_k^2))).

The state scores are ``log upsilon`` (empty, counted once) and
``log((1 - upsilon) / ((2L-1)^2 K)) + (2 c_jk[l] - e_k[l]) / (2 sigma^2)``; the common
``-||y_j||^2 / (2 sigma^2) - (L^2/2) log(2 pi sigma^2)`` is added back for the
log-likelihood. Posteriors come from a log-sum-exp (no patch underflows).

A chunk of patches is processed at a time and only its sufficient statistics are kept:

    W[k, l] += sum_j w_jkl                               (2L x 2L per rotation)
    G[k]    += sum_j FFT2(Z y_j) conj(FFT2(w_jk))         (half spectrum per rotation)

plus the sums of the empty-state posteriors, of ``||y_j||^2`` and of the log-likelihood.
Nothing of size (patches x rotations x shifts) outlives one chunk.

Two routes compute the same numbers (:func:`projection_spectra` picks one per stage):

- the *direct* route (:mod:`numbaem.em.kernels`, for ``L <= DIRECT_MAX_L``): the
  correlations over shifts as sums over pixels, ``L^4`` multiply-adds per (patch,
  rotation) pair, over blocks of rotations in SIMD lanes, in single precision where
  that is proven accurate enough (:func:`choose_precision`) and double otherwise, with
  the sums over patches in double precision;
- the *FFT* route (the kernels of this module): two ``2L x 2L`` transforms per pair.

CTF groups (theory section 11). With a filter ``Psi_g`` per group of micrographs, a patch
of group ``g`` is scored against the filtered projections ``Psi_g p_k``: everything above
holds per group with ``p_k`` replaced by ``Psi_g p_k``. :class:`GroupSpectra` makes the
spectra of one group at a time, :func:`stream_stats` runs the chunks of each group
against its own spectra (a chunk never mixes groups), and the statistics ``W``, ``G``
gain a leading group axis. The kernels are the same, on either route.

Kernels split their work over patches (scoring) or over rotations (accumulation), in
an order that does not depend on the thread count, so 1 and N threads give the same bits.
"""
import contextlib
import dataclasses
import functools
import logging
import math

import numpy as np
from numba import prange

from ..model.ctf import apply_filter
from ..runtime import fft
from ..runtime.jit import jit, pjit
from ..runtime.errors import NumbaemError
from . import kernels

logger = logging.getLogger(__name__)


#: Rotations a patch's record keeps at most (the top of a concentrated posterior).
RECORD_MAX = 16

#: A record holds all but this much of its patch's rotation mass (or the patch has none).
RECORD_EPS = 1e-3


class Records:
    """The rotations each patch's posterior held at its last E-step (what a local search starts from).

    ``quats[patch]`` is a (m, 4) float32 array of unit quaternions ``(w, x, y, z)``: the
    ``m <= RECORD_MAX`` rotations of largest posterior mass that hold all but ``eps`` of
    the patch's rotation mass, or empty when more are needed (a diffuse posterior: no
    local search for that patch). Any grid can write a record; any level can be searched
    near one.
    """

    def __init__(self, quats=None):
        self.quats = {} if quats is None else quats

    def update(self, other):
        if other is not None:
            self.quats.update(other.quats)
        return self

    def __len__(self):
        return len(self.quats)

    def has(self, patch):
        q = self.quats.get(int(patch))
        return q is not None and len(q) > 0

    @property
    def nbytes(self):
        return sum(q.nbytes + 96 for q in self.quats.values())

    def to_arrays(self):
        """``ids (N,), ptr (N + 1,), quats (Q, 4)`` sorted by patch (for saving and sending)."""
        ids = np.array(sorted(self.quats), dtype=np.int64)
        counts = np.array([len(self.quats[int(i)]) for i in ids], np.int64)
        ptr = _counts_to_ptr(counts)
        q = np.concatenate([self.quats[int(i)] for i in ids]) if len(ids) else np.zeros((0, 4))
        return ids, ptr, np.asarray(q, np.float32).reshape(-1, 4)

    @classmethod
    def from_arrays(cls, ids, ptr, quats):
        return cls({int(i): np.asarray(quats[ptr[k]:ptr[k + 1]], np.float32) for k, i in enumerate(ids)})


def record_of(mass, rotations, eps):
    """The record of one patch: quaternions of its top rotations holding all but ``eps`` of its rotation mass.

    Parameters
    ----------
    mass : ndarray, shape (m,)
        Posterior masses of the patch's states' rotations.
    rotations : callable(positions) -> ndarray (k, 4)
        The unit quaternions of some of them (called for the few recorded only).
    eps : float

    Returns
    -------
    ndarray, float32, shape (k, 4)
        Empty when more than :data:`RECORD_MAX` rotations are needed (a diffuse posterior).
    """
    mass = np.asarray(mass, dtype=np.float64)
    total = mass.sum()
    if len(mass) == 0 or not total > 0:
        return np.zeros((0, 4), np.float32)
    k = min(len(mass), RECORD_MAX + 1)
    if len(mass) > k:        # the k largest without sorting them all (ties: as argpartition leaves them)
        cand = np.argpartition(-mass, k - 1)[:k]
        top = cand[np.argsort(-mass[cand], kind="stable")]
    else:
        top = np.argsort(-mass, kind="stable")
    need = int(np.searchsorted(np.cumsum(mass[top]), (1.0 - eps) * total, side="left")) + 1
    if need > RECORD_MAX:
        return np.zeros((0, 4), np.float32)
    return np.asarray(rotations(top[:need]), np.float32).reshape(-1, 4)


def _counts_to_ptr(counts):
    ptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr


@dataclasses.dataclass
class SufficientStats:
    """Per-iteration sums over patches (theory section 6); additive over chunks.

    Attributes
    ----------
    W : ndarray, shape (K, 2L, 2L)
        ``sum_j w_jkl`` (zero at the dropped and the empty shift).
    G : ndarray, complex, shape (K, 2L, L + 1)
        A real-FFT half spectrum whose inverse, cropped to ``L x L``, is the data image
        ``g_k = sum_j sum_l w_jkl (C T_l Z)^T y_j`` of theory section 6: the FFT route
        accumulates ``sum_j FFT2(Z y_j) conj(FFT2(w_jk))``, the direct route computes
        ``g_k`` itself and stores ``FFT2(Z g_k)``. Only ``crop(IFFT2(G_k))`` is used
        (:func:`numbaem.em.mstep.data_images`).
    n_patches : int
    sum_empty : float
        ``sum_j w_{j,empty}``.
    sum_yy : float
        ``sum_j ||y_j||^2``.
    loglik : float
        ``sum_j log p(y_j)``, the approximate log-likelihood (section 4) of the patches seen.
    rotations : ndarray of int, optional
        The rotations (rows of the stage's grid) the rows of ``W`` and ``G`` belong to,
        when not all of them are present (the coarse-to-fine search, :mod:`numbaem.em.search`).
    search : dict, optional
        The search's report (pairs per level, mass dropped, seconds per pass), additive.
    records : Records, optional
        The patches' records (what a later local search starts from).
    junk : ndarray, shape (1 + n_shells,), optional
        With the junk field (:class:`Background`, theory section 14.4): ``sum_j r_j`` and
        ``sum_j r_j p_js``, the junk posteriors and their shell powers; ``sum_empty`` then
        holds the empty state's posteriors only.
    """

    W: np.ndarray
    G: np.ndarray
    n_patches: int = 0
    sum_empty: float = 0.0
    sum_yy: float = 0.0
    loglik: float = 0.0
    rotations: np.ndarray = None
    search: dict = None
    records: "Records" = None
    junk: np.ndarray = None

    @classmethod
    def zeros(cls, K, L, n_groups=None):
        """Empty statistics; with ``n_groups``, ``W`` and ``G`` get a leading group axis
        (shapes ``(n_groups, K, 2L, 2L)`` and ``(n_groups, K, 2L, L + 1)``, theory section 11)."""
        lead = () if n_groups is None else (int(n_groups),)
        return cls(np.zeros(lead + (K, 2 * L, 2 * L)), np.zeros(lead + (K, 2 * L, L + 1), np.complex128))

    @property
    def n_groups(self):
        """Number of CTF groups, or None for statistics without a group axis."""
        return self.W.shape[0] if self.W.ndim == 4 else None

    def add(self, other):
        """In-place sum (chunks, or workers' partial results).

        Statistics on rows of a grid (``rotations`` set: the coarse-to-fine search keeps
        only the rotations some patch reached) are merged by rotation; the result's rows
        are sorted by rotation, so the sum does not depend on which side held a row.
        """
        if self.rotations is not None or other.rotations is not None:
            if self.rotations is None or other.rotations is None:
                raise NumbaemError("cannot add statistics of a whole grid to statistics of some of its rotations")
            self.rotations, (self.W, self.G) = merge_rows(self.rotations, (self.W, self.G),
                                                          other.rotations, (other.W, other.G))
        else:
            self.W += other.W
            self.G += other.G
        return add_totals(self, other)

    @property
    def nbytes(self):
        return self.W.nbytes + self.G.nbytes

    def to_arrays(self):
        """Plain dict of arrays and floats (for sending or saving)."""
        out = dict(W=self.W, G=self.G, n_patches=self.n_patches, sum_empty=self.sum_empty,
                   sum_yy=self.sum_yy, loglik=self.loglik)
        if self.junk is not None:
            out["junk"] = self.junk
        if self.rotations is not None:
            out["rotations"] = self.rotations
        if self.search is not None:
            out["search"] = dict(self.search)
        if self.records is not None:
            out["records_ids"], out["records_ptr"], out["records_quats"] = self.records.to_arrays()
        return out

    @classmethod
    def from_arrays(cls, d):
        """Inverse of :meth:`to_arrays`."""
        d = dict(d)
        records = pop_records(d)
        return cls(**d, records=records)


def add_junk(a, b):
    """Sum of two junk-field sums (:attr:`SufficientStats.junk`), either of which may be None."""
    if b is None:
        return a
    return np.array(b, dtype=np.float64) if a is None else a + b


@dataclasses.dataclass(frozen=True)
class Background:
    """The patch states other than the molecule with the junk class as a field (theory 14.4):
    empty with prior ``upsilon``, junk with prior ``varsigma`` and shell variances ``lam``.

    Passed to the E-step in place of the float ``upsilon``; the molecule's states then share
    ``1 - upsilon - varsigma``.
    """
    upsilon: float
    varsigma: float
    lam: np.ndarray

    def terms(self, patches, sigma2):
        """``(log_mol, log_bg, share, p)`` for patches (n, L, L): the log prior mass of the
        molecule's states, each patch's ``log(upsilon + varsigma exp(llr_j))`` (the background
        states' weight relative to the empty patch's likelihood), the junk's share ``r_j / (r_j +
        e_j)`` of it, and the shell powers."""
        from ..model.junkfield import log_ratio, shell_powers
        p = shell_powers(patches)
        log_j = math.log(self.varsigma) + log_ratio(p, self.lam, sigma2, patches.shape[1])
        log_bg = np.logaddexp(math.log(self.upsilon), log_j)
        return math.log(1.0 - self.upsilon - self.varsigma), log_bg, np.exp(log_j - log_bg), p


def _background(upsilon, patches, sigma2, n_pad=None):
    """``(log_mol, log_bg, share, p)`` of :meth:`Background.terms`, or for a float ``upsilon``
    ``(log(1 - upsilon), log(upsilon), None, None)`` (the model without the junk field, the
    same bits as before it existed). ``n_pad``: pad ``log_bg`` to this many rows (zeros)."""
    if not isinstance(upsilon, Background):
        return math.log1p(-upsilon), math.log(upsilon), None, None
    log_mol, log_bg, share, p = upsilon.terms(patches, sigma2)
    if n_pad is not None and n_pad > len(log_bg):
        log_bg = np.concatenate([log_bg, np.zeros(n_pad - len(log_bg))])
    return log_mol, log_bg, share, p


def _add_background(acc, w_bg, share, p):
    """Split the background posteriors ``w_bg`` (n,) into empty and junk and add their sums."""
    if share is None:
        acc.sum_empty += float(w_bg.sum())
        return
    r = w_bg * share
    acc.sum_empty += float((w_bg - r).sum())
    acc.junk = add_junk(acc.junk, np.concatenate([[r.sum()], r @ p]))


def merge_rows(rows_a, arrays_a, rows_b, arrays_b):
    """Sums of statistics kept on some rows of a grid: the union of the rows (sorted, so the
    result does not depend on which side held a row) and each array summed by row."""
    rows = np.union1d(rows_a, rows_b)
    pos_a, pos_b = np.searchsorted(rows, rows_a), np.searchsorted(rows, rows_b)
    out = []
    for xa, xb in zip(arrays_a, arrays_b):
        x = np.zeros((len(rows),) + xa.shape[1:], xa.dtype)
        x[pos_a] += xa
        x[pos_b] += xb
        out.append(x)
    return rows, out


def add_totals(stats, other):
    """Add ``other``'s patch count, sums, log-likelihood, search report and records into ``stats``."""
    stats.n_patches += other.n_patches
    stats.sum_empty += other.sum_empty
    stats.sum_yy += other.sum_yy
    stats.loglik += other.loglik
    junk = add_junk(getattr(stats, "junk", None), getattr(other, "junk", None))
    if junk is not None:
        stats.junk = junk
    stats.search = merge_reports(stats.search, other.search)
    if other.records is not None:
        stats.records = (stats.records or Records()).update(other.records)
    return stats


def pop_records(d):
    """The :class:`Records` packed into a ``to_arrays`` dict (removed from it), or None."""
    if "records_ids" not in d:
        return None
    return Records.from_arrays(d.pop("records_ids"), d.pop("records_ptr"), d.pop("records_quats"))


def merge_reports(a, b):
    """Sum two search reports (dicts of numbers); keys starting with ``max_`` take the maximum."""
    if a is None or b is None:
        return b if a is None else a
    out = dict(a)
    for k, v in b.items():
        out[k] = (max(out[k], v) if k.startswith("max_") else out[k] + v) if k in out else v
    return out


#: The direct route (:mod:`numbaem.em.kernels`) runs up to this patch size; above it the
#: FFT route is faster (``L^4`` sums against ``2L x 2L`` transforms).
DIRECT_MAX_L = 13

#: Single precision is used (``precision='auto'``) when the estimated rounding error of a
#: score, in nats, stays below this (:func:`choose_precision`).
SINGLE_SCORE_TOLERANCE = 1e-3


@dataclasses.dataclass
class ProjectionSpectra:
    """What the FFT route of the E-step needs of the current volume: ``conj(FFT2(Z p_k))`` and ``e_k``.

    Attributes
    ----------
    Pc : ndarray, complex, shape (K, 2L, L + 1)
    e : ndarray, shape (K, 2L, 2L)
        ``+inf`` at shifts that are ruled out (:func:`restrict_shifts`): their score is
        ``-inf`` and their posterior 0.
    L : int
    log_shift_offset : float
        Added to every non-empty state's log prior: ``log((2L-1)^2 / n_allowed)`` when
        only ``n_allowed`` shifts are allowed, so that the prior still sums to one.
    """

    Pc: np.ndarray
    e: np.ndarray
    L: int
    log_shift_offset: float = 0.0

    route = "fft"
    dtype = np.dtype(np.float64)

    @property
    def K(self):
        return self.Pc.shape[0]

    @property
    def nbytes(self):
        return self.Pc.nbytes + self.e.nbytes

class GroupSpectra:
    """The projections and the groups' filters: per-group :class:`ProjectionSpectra` on demand.

    The E-step of a patch of group ``g`` uses the spectra of ``Psi_g p_k`` (theory section
    11). Only one group's spectra need exist at a time, so memory does not grow with the
    number of groups; this object itself holds ``K L^2 + G L^4`` numbers, which is what
    the Dask executor sends to its workers instead of ``G`` sets of spectra.

    Parameters
    ----------
    proj : ndarray, shape (K, L, L)
        The projections ``p_k = A_k x``.
    filters : ndarray, shape (G, L^2, L^2)
        ``Psi_g`` (:func:`numbaem.model.ctf.filter_matrices`).
    window : int, optional
        Shifts restricted to ``|l_0|, |l_1| <= window`` in every group (:func:`restrict_shifts`).
    route, precision, sigma2
        As for :func:`projection_spectra`: each group's spectra are made for that route.
    """

    def __init__(self, proj, filters, window=None, route=None, precision="auto", sigma2=None, log_prior=None):
        self.proj = np.asarray(proj, dtype=np.float64)
        self.window = window
        self.log_prior = log_prior    # (delta_k, sigma_eff^2) folded into each group's energies, or None
        self.route, self.precision, self.sigma2 = route, precision, sigma2
        self.filters = np.asarray(filters, dtype=np.float64)
        K, L, _ = self.proj.shape
        if self.filters.ndim != 3 or self.filters.shape[1:] != (L * L, L * L):
            raise NumbaemError(f"the group filters have shape {self.filters.shape}; expected (G, {L * L}, {L * L}) "
                               f"for {L}x{L} projections")
        self.L = L

    @property
    def K(self):
        return self.proj.shape[0]

    @property
    def n_groups(self):
        return self.filters.shape[0]

    @property
    def nbytes(self):
        return self.proj.nbytes + self.filters.nbytes

    route = "groups"

    def group(self, g):
        """The spectra (:func:`projection_spectra`) of the filtered projections ``Psi_g p_k``."""
        spectra = projection_spectra(apply_filter(self.filters[g], self.proj), self.route, self.precision,
                                     self.sigma2)
        if self.log_prior is not None:
            spectra = fold_log_prior(spectra, *self.log_prior)
        return spectra if self.window is None else restrict_shifts(spectra, self.window)



@dataclasses.dataclass
class DirectSpectra:
    """What the direct route of the E-step needs of the current volume (:mod:`numbaem.em.kernels`).

    Attributes
    ----------
    P : ndarray, shape (B, L, L, KB)
        The projections ``p_k``, rotation ``k = b KB + t`` at ``P[b, :, :, t]``.
    E : ndarray, shape (B, S, S, KB), ``S = 2L - 1``
        ``e_k`` at the linear shifts ``s = i - (L - 1)``; ``+inf`` in the padding lanes.
    K, L : int
    """

    P: np.ndarray
    E: np.ndarray
    K: int
    L: int
    quats: np.ndarray = None     # (K, 4) unit quaternions of the rotations: set to write records
    log_shift_offset: float = 0.0   # as ProjectionSpectra's (restrict_shifts)

    route = "direct"

    @property
    def dtype(self):
        return self.P.dtype

    @property
    def KB(self):
        return self.P.shape[3]

    @property
    def nbytes(self):
        return self.P.nbytes + self.E.nbytes


def choose_route(L):
    """``'direct'`` for ``L <= DIRECT_MAX_L``, else ``'fft'`` (``NUMBAEM_ROUTE=fft|direct`` forces one:
    the benchmarks compare the routes in one run)."""
    import os
    forced = os.environ.get("NUMBAEM_ROUTE")
    if forced in ("fft", "direct"):
        return forced
    return "direct" if int(L) <= DIRECT_MAX_L else "fft"


def score_rounding(proj, sigma2):
    """Estimated rounding error (nats) of a single-precision score of the direct route.

    A score is ``(2 c - e) / (2 sigma^2)`` with ``|c| <= ||y|| ||p||`` and ``e <= ||p||^2``;
    with ``||y||^2 ~ ||p||^2 + L^2 sigma^2`` (a projection in noise) and ``P = max_k
    ||p_k||^2 / sigma^2`` it is at most ``sqrt(P (P + L^2)) + P / 2``. Each of its ``L^2``
    products and sums rounds at ``2^-24`` relative; the error grows like ``sqrt(L^2) = L``
    for round-to-nearest. Returns ``2^-24 L (sqrt(P (P + L^2)) + P / 2)``.
    """
    proj = np.asarray(proj)
    L = proj.shape[-1]
    P = float(np.max(np.sum(proj.astype(np.float64) ** 2, axis=(-2, -1)))) / float(sigma2)
    return 2.0 ** -24 * L * (math.sqrt(P * (P + L * L)) + 0.5 * P)


def choose_precision(proj, sigma2=None, precision="auto"):
    """The floating-point type of the direct route's scores: float32 or float64.

    ``'auto'`` takes float32 when :func:`score_rounding` is at most
    :data:`SINGLE_SCORE_TOLERANCE` (1e-3 nats: the posteriors move by at most 0.1%
    relative; the EM stays within 1e-4 of the float64 run, ``tests/test_search.py``), and
    float64 otherwise or when ``sigma2`` is unknown. ``'float32'`` / ``'float64'`` force it.
    """
    if precision in ("float32", "single"):
        return np.dtype(np.float32)
    if precision in ("float64", "double") or sigma2 is None:
        return np.dtype(np.float64)
    if precision != "auto":
        raise NumbaemError(f"precision={precision!r} is not one of 'auto', 'float32', 'float64'")
    return np.dtype(np.float32 if score_rounding(proj, sigma2) <= SINGLE_SCORE_TOLERANCE else np.float64)


def direct_spectra(proj, dtype=np.float64):
    """:class:`DirectSpectra` of the projections ``proj`` (K, L, L) in lane blocks (:func:`numbaem.em.kernels.lane_blocks`)."""
    proj = np.asarray(proj, dtype=np.float64)
    K, L, _ = proj.shape
    S = 2 * L - 1
    dtype = np.dtype(dtype)
    KB, B = kernels.lane_blocks(K)
    P = np.zeros((B, L, L, KB), dtype)
    E = np.full((B, S, S, KB), np.inf, dtype)
    e = np.empty((K, S, S))
    kernels.box_energies(proj, e)
    for b in range(B):
        k0, k1 = b * KB, min(K, (b + 1) * KB)
        P[b, :, :, :k1 - k0] = proj[k0:k1].transpose(1, 2, 0)
        E[b, :, :, :k1 - k0] = e[k0:k1].transpose(1, 2, 0)
    return DirectSpectra(P, E, K, L)


def projection_spectra(proj, route=None, precision="auto", sigma2=None):
    """What the E-step needs of the projections ``p_k`` (section 5), for the route that will run.

    Parameters
    ----------
    proj : ndarray, shape (K, L, L)
    route : {'direct', 'fft'}, optional
        Default :func:`choose_route` of ``L``.
    precision : {'auto', 'float32', 'float64'}
        The direct route's floating-point type (:func:`choose_precision`; the FFT route
        is float64).
    sigma2 : float, optional
        The noise variance, for ``precision='auto'`` (without it: float64).

    Returns
    -------
    DirectSpectra or ProjectionSpectra
        The FFT route's: ``conj(FFT2(Z p_k))`` and ``e_k``, made in one transform
        workspace of shape ``(K, 2L, 2L)`` (:func:`numbaem.em.plan.plan_iteration`
        counts exactly it and the two results).
    """
    proj = np.asarray(proj, dtype=np.float64)
    K, L, _ = proj.shape
    route = choose_route(L) if route is None else route
    if route == "direct":
        return direct_spectra(proj, choose_precision(proj, sigma2, precision))
    if route != "fft":
        raise NumbaemError(f"route={route!r} is not 'direct' or 'fft'")
    ws = fft.workspace((K, 2 * L, 2 * L))
    ws.real[...] = 0.0
    ws.real[:, :L, :L] = proj
    Pc = np.conj(ws.forward())
    ws.real[...] = 0.0
    ws.real[:, :L, :L] = proj
    ws.real[:, :L, :L] **= 2
    spec = ws.forward()
    np.conjugate(spec, out=spec)
    spec *= box_spectrum(L)[None]
    e = ws.backward().copy()
    return ProjectionSpectra(Pc, e, L)


def fold_log_prior(spectra, delta, sigma2):
    """Spectra whose every score of rotation ``k`` gains ``delta_k`` (a per-rotation log prior).

    A score is ``log_shift_prior + (2 c - e_k) / (2 sigma^2)``, so ``e_k -> e_k - 2 sigma^2
    delta_k`` adds ``delta_k`` to it with no change to the kernels (theory section 14,
    section 1): the orientation prior ``p_k = exp(delta_k) / K`` in place of ``1/K``, and
    the junk row's prior. ``+inf`` (ruled-out shifts) stays ``+inf``.

    Parameters
    ----------
    spectra : ProjectionSpectra, DirectSpectra or GroupSpectra
    delta : ndarray, shape (K,)
        Log prior offsets; finite.
    sigma2 : float
        The noise variance the E-step uses (annealing temperature included).

    Returns
    -------
    The same kind of spectra (new arrays; the argument is unchanged).
    """
    delta = np.asarray(delta, dtype=np.float64)
    if delta.shape != (spectra.K,) or not np.all(np.isfinite(delta)):
        raise NumbaemError(f"log prior offsets of shape {delta.shape} for {spectra.K} rotations; expected finite "
                           f"({spectra.K},)")
    shift = 2.0 * float(sigma2) * delta
    if isinstance(spectra, GroupSpectra):
        if spectra.log_prior is not None:
            delta = delta + spectra.log_prior[0]
        return GroupSpectra(spectra.proj, spectra.filters, spectra.window, spectra.route, spectra.precision,
                            spectra.sigma2, (delta, float(sigma2)))
    if spectra.route == "direct":
        E = spectra.E.copy()
        KB = spectra.KB
        for b in range(E.shape[0]):
            k0, k1 = b * KB, min(spectra.K, (b + 1) * KB)
            E[b, :, :, :k1 - k0] -= shift[k0:k1].astype(E.dtype)[None, None, :]
        return dataclasses.replace(spectra, E=E)
    if spectra.route != "fft":
        raise NumbaemError(f"cannot fold a log prior into spectra of route {spectra.route!r}")
    return ProjectionSpectra(spectra.Pc, spectra.e - shift[:, None, None], spectra.L, spectra.log_shift_offset)


def signed_shifts(L):
    """The shift ``l`` of each of the ``2L`` indices per axis as a signed offset (section 4).

    Index ``l < L`` moves the projection by ``+l``; ``l > L`` wraps to ``l - 2L`` (the
    projection starts above / left of the patch); index ``L`` (dropped) maps to ``L``.
    """
    l = np.arange(2 * L)
    return np.where(l > L, l - 2 * L, l)


def restrict_shifts(spectra, window):
    """Spectra whose E-step only considers shifts ``|l_0|, |l_1| <= window`` (signed).

    For boxes cut around picks (:class:`numbaem.data.boxes.BoxSource`): ``e`` becomes
    ``+inf`` at the other shifts (their posterior is then exactly 0) and the prior of each
    allowed shift becomes ``(1 - upsilon) / ((2 window + 1)^2 K)`` through
    ``log_shift_offset``. The empty state is unchanged.

    Parameters
    ----------
    spectra : ProjectionSpectra or GroupSpectra
    window : int
        ``0 <= window < L``.

    Returns
    -------
    ProjectionSpectra or GroupSpectra
    """
    L = spectra.L
    w = int(window)
    if not 0 <= w < L:
        raise NumbaemError(f"shift window {window} must lie in 0 .. {L - 1} for L={L}")
    if isinstance(spectra, GroupSpectra):      # each group's spectra are restricted as they are made
        return GroupSpectra(spectra.proj, spectra.filters, w, spectra.route, spectra.precision, spectra.sigma2,
                            spectra.log_prior)
    offset = spectra.log_shift_offset + math.log((2 * L - 1) ** 2 / (2 * w + 1) ** 2)
    if spectra.route == "direct":              # E at the linear shifts s = -(L-1) .. L-1
        s = np.abs(np.arange(-(L - 1), L)) <= w
        E = spectra.E.copy()
        E[:, ~(s[:, None] & s[None, :]), :] = np.inf
        return dataclasses.replace(spectra, E=E, log_shift_offset=offset)
    if spectra.route != "fft":
        raise NumbaemError("boxes around picks (a shift window) run with an exhaustive rotation search; give the "
                           "schedule's stages rotations=K instead of fine=STEP")
    sl = np.abs(signed_shifts(L)) <= w
    allowed = sl[:, None] & sl[None, :]
    e = spectra.e.copy()
    e[:, ~allowed] = np.inf
    return ProjectionSpectra(spectra.Pc, e, L, offset)


def best_states(post, w_empty):
    """Per patch: the most likely shift (rotations summed out) and, at it, the most likely rotation.

    Parameters
    ----------
    post : ndarray, shape (n, K, 2L, 2L)
        Posteriors of the non-empty states (normalised with the empty one).
    w_empty : ndarray, shape (n,)

    Returns
    -------
    dict of ndarray (n,): ``occupied`` (``1 - w_empty``), ``shift0``, ``shift1`` (signed,
    :func:`signed_shifts`), ``shift_probability`` (posterior of that shift),
    ``rotation`` (grid index).
    """
    n, K, n2, _ = post.shape
    L = n2 // 2
    per_shift = post.sum(axis=1).reshape(n, n2 * n2)
    flat = np.argmax(per_shift, axis=1)
    l0, l1 = np.divmod(flat, n2)
    rows = np.arange(n)
    rot = np.argmax(post[rows, :, l0, l1], axis=1)
    sh = signed_shifts(L)
    return dict(occupied=1.0 - w_empty, shift0=sh[l0], shift1=sh[l1], shift_probability=per_shift[rows, flat],
                rotation=rot)


@functools.lru_cache(maxsize=8)
def _box_spectrum(L):
    one = np.zeros((2 * L, 2 * L))
    one[:L, :L] = 1.0
    out = np.fft.rfft2(one)
    out.setflags(write=False)
    return out


def box_spectrum(L):
    """``FFT2(Z 1_{LxL})``, the half spectrum of the zero-padded ``L x L`` box (read-only)."""
    return _box_spectrum(int(L))


def patch_spectra(patches):
    """``FFT2(Z y_j)`` for a stack of patches (n, L, L) -> (n, 2L, L + 1)."""
    n, L, _ = patches.shape
    z = np.zeros((n, 2 * L, 2 * L))
    z[:, :L, :L] = patches
    return fft.rfft2(z)


@pjit
def _products(Yh, Pc, n_valid, Q):
    """``Q[j, k] = Yh[j] * Pc[k]`` for ``j < n_valid``; zero for the padding rows."""
    n, K, n0, n1 = Q.shape
    for k in prange(K):  # over rotations: a chunk of few patches still uses every thread
        for j in range(n):
            if j < n_valid:
                for a in range(n0):
                    for b in range(n1):
                        Q[j, k, a, b] = Yh[j, a, b] * Pc[k, a, b]
            else:
                Q[j, k] = 0.0


# exp(-50) = 2e-22: a state scoring 50 below the best adds less than round-off to the
# normaliser of any patch with fewer than 1e5 states, so its exp is skipped (posterior 0).
_LOG_NEGLIGIBLE = -50.0
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00


@jit(inline="always")
def _exp_neg(d):
    """``exp(d)`` for ``-50 <= d <= 0`` to 1 ulp (relative error below 4e-16).

    Cody-Waite reduction ``d = k ln2 + r``, ``|r| <= ln2/2``, a degree-12 Taylor
    polynomial for ``exp(r)`` (truncation below 1e-17) and ``2^k`` assembled from the
    bits of ``-k`` by selects. It calls no libm function, so the loops that use it
    vectorise (numba's ``math.exp`` is a scalar libm call, about 4x slower here).
    """
    k = math.floor(d * _INV_LN2 + 0.5)
    r = (d - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    m = -k
    f = 1.0
    f *= 0.5 if (m % 2) >= 1 else 1.0
    f *= 0.25 if (m % 4) >= 2 else 1.0
    f *= 0.0625 if (m % 8) >= 4 else 1.0
    f *= 0.00390625 if (m % 16) >= 8 else 1.0
    f *= 1.52587890625e-05 if (m % 32) >= 16 else 1.0
    f *= 2.3283064365386963e-10 if (m % 64) >= 32 else 1.0
    f *= 5.421010862427522e-20 if (m % 128) >= 64 else 1.0
    return p * f


@jit(inline="always")
def _row_max(row, lo, hi, mx):
    m0 = mx
    m1 = mx
    b = lo
    while b + 1 < hi:
        m0 = max(m0, row[b])
        m1 = max(m1, row[b + 1])
        b += 2
    if b < hi:
        m0 = max(m0, row[b])
    return max(m0, m1)


@jit(inline="always")
def _row_sum(row, n):
    t0 = 0.0
    t1 = 0.0
    t2 = 0.0
    t3 = 0.0
    b = 0
    while b + 3 < n:
        t0 += row[b]
        t1 += row[b + 1]
        t2 += row[b + 2]
        t3 += row[b + 3]
        b += 4
    while b < n:
        t0 += row[b]
        b += 1
    return (t0 + t1) + (t2 + t3)


@pjit
def _scores(C, e, n_valid, L, c2, log_shift_prior, inv2s2, mxk):
    """Scores in place of ``C`` (n, K, 2L, 2L) and their maximum per (patch, rotation).

    ``C`` holds ``c_jk / cscale`` (the raw backward FFT) and ``c2 = 2 cscale / (2 sigma^2)``.
    Each (patch, rotation) block is one flat loop (it vectorises); the dropped shifts
    (row and column ``L``, the empty shift among them) are then set to ``-inf``. Parallel
    over rotations, so a chunk of even one patch keeps every thread busy. Padding
    patches (``j >= n_valid``) are skipped.
    """
    K, n2 = C.shape[1], C.shape[2]
    for k in prange(K):
        ef = e[k].reshape(n2 * n2)
        for j in range(n_valid):
            blk = C[j, k].reshape(n2 * n2)
            for q in range(n2 * n2):
                blk[q] = log_shift_prior + c2 * blk[q] - ef[q] * inv2s2
            for t in range(n2):
                C[j, k, L, t] = -np.inf
                C[j, k, t, L] = -np.inf
            mxk[j, k] = _row_max(blk, 0, n2 * n2, -np.inf)


@pjit
def _exponentiate(C, n_valid, mx, mxk, sumk):
    """``C = exp(scores - mx_j)`` (0 below ``exp(-50)``, so 0 at the ``-inf`` dropped shifts), sums per (j, k).

    A (patch, rotation) block whose best score ``mxk[j, k]`` is already 50 below the
    patch's best is all zeros and skips its exponentials (the same numbers, less work:
    at useful SNR most rotations of a patch are such blocks). Parallel over rotations;
    each (j, k) block is summed in a fixed order, so the result does not depend on the
    thread count.
    """
    K, n2 = C.shape[1], C.shape[2]
    for k in prange(K):
        for j in range(n_valid):
            m = mx[j]
            blk = C[j, k].reshape(n2 * n2)
            if mxk[j, k] - m <= _LOG_NEGLIGIBLE:
                blk[:] = 0.0
                sumk[j, k] = 0.0
                continue
            for q in range(n2 * n2):
                d = blk[q] - m
                v = _exp_neg(max(d, _LOG_NEGLIGIBLE))
                blk[q] = v if d > _LOG_NEGLIGIBLE else 0.0
            sumk[j, k] = _row_sum(blk, n2 * n2)


def _posteriors(C, e, n_valid, L, cscale, log_shift_prior, log_upsilon, inv2s2):
    """Scores -> unnormalised posteriors in place of ``C`` (n, K, 2L, 2L).

    On return ``C[j] * norm[j]`` are the posteriors of patch ``j`` (the normalisation is
    folded into the accumulation, saving a pass over ``C``). Returns ``(w_empty, lse,
    norm)`` per patch: the empty-state posterior, the log-sum-exp of the scores (empty
    state counted once) and ``1 / sum``. ``log_upsilon``: a float, or one per row of ``C``
    (the background states' weight, :class:`Background`). The per-rotation maxima and sums are combined
    in NumPy in a fixed order.
    """
    n, K = C.shape[0], C.shape[1]
    mxk = np.full((n, K), -np.inf)
    _scores(C, e, n_valid, L, 2.0 * cscale * inv2s2, log_shift_prior, inv2s2, mxk)
    mx = np.maximum(mxk.max(axis=1), log_upsilon)
    mx[n_valid:] = 0.0
    sumk = np.zeros((n, K))
    _exponentiate(C, n_valid, mx, mxk, sumk)
    tot = np.exp(log_upsilon - mx) + sumk.sum(axis=1)
    lse = mx + np.log(tot)
    norm = 1.0 / tot
    w_empty = np.exp(log_upsilon - lse)
    lse[n_valid:] = 0.0
    norm[n_valid:] = 0.0
    w_empty[n_valid:] = 0.0
    return w_empty, lse, norm


@pjit
def _accumulate(C, Yh, Q, norm, n_valid, W, G):
    """``W[k] += sum_j norm_j C[j, k]`` and ``G[k] += sum_j norm_j Yh[j] conj(Q[j, k])``.

    Parallel over rotations; each rotation sums its patches in order, so the result does
    not depend on the thread count. ``Q`` is the forward transform of the unnormalised
    ``C``, so ``norm_j`` applies to both.
    """
    K, n0, n1 = W.shape
    m1 = G.shape[2]
    for k in prange(K):
        for j in range(n_valid):
            s = norm[j]
            for a in range(n0):
                for b in range(n1):
                    W[k, a, b] += s * C[j, k, a, b]
            for a in range(n0):
                for b in range(m1):
                    q = Q[j, k, a, b]
                    G[k, a, b] += s * (Yh[j, a, b] * complex(q.real, -q.imag))


def chunk_bytes(n_chunk, K, L, route="fft", itemsize=8):
    """Bytes of the per-chunk work arrays for ``n_chunk`` patches and ``K`` rotations.

    FFT route: per (patch, rotation), the ``2L x 2L`` scores and their half spectrum
    (the chunk's FFT workspace) and two numbers (block maximum and sum); per patch, its
    spectrum workspace, the patch buffer and the temporaries of reading it, and the
    per-patch vectors of the posteriors. Direct route (``itemsize`` of its precision):
    per pair the ``(2L-1)^2`` exponentials, a lane sum and a block scale; per patch the
    patch in that precision, the buffer and the temporaries of reading it, and per task
    its scratch (a block of ``KB`` lanes of projections' energies and back-correlations).
    """
    if route == "direct":
        S = 2 * L - 1
        KB = kernels.MAX_BLOCK
        per_pair = S * S * itemsize + 8 + 16
        per_patch = L * L * (itemsize + 3 * 8) + 128
        scratch = KB * (S * S + 2 * L * L) * itemsize
        return n_chunk * (K * per_pair + per_patch) + scratch
    per_pair = (2 * L) * (2 * L) * 8 + (2 * L) * (L + 1) * 16 + 16
    per_patch = (2 * L) * (L + 1) * 16 + (2 * L) ** 2 * 8 + 3 * L * L * 8 + 128
    return n_chunk * (K * per_pair + per_patch)


def shift_index(L):
    """the theory's circular shift index ``l = s mod 2L`` of the linear shifts ``s = -(L-1) .. L-1``."""
    return np.arange(-(L - 1), L) % (2 * L)


class DirectAccumulator:
    """The direct route's sums over patches, in its lane-block layout, until they are added to statistics.

    ``W[b, i1, i2, t]`` and ``g[b, q1, q2, t]`` (float64) for rotation ``b KB + t``;
    :meth:`add_to` converts them to the layout of :class:`SufficientStats` (``W`` at the
    circular shifts, ``G = FFT2(Z g)``) once, after every chunk has been added.
    """

    def __init__(self, spectra):
        B, L, _, KB = spectra.P.shape
        S = 2 * L - 1
        self.K, self.L = spectra.K, L
        self.W = np.zeros((B, S, S, KB))
        self.g = np.zeros((B, L, L, KB))
        self.n_patches = 0
        self.sum_empty = 0.0
        self.sum_yy = 0.0
        self.loglik = 0.0
        self.junk = None

    @property
    def nbytes(self):
        return self.W.nbytes + self.g.nbytes

    def add_to(self, stats):
        """Add into ``stats`` (a :class:`SufficientStats` of ``K`` rotations)."""
        K, L = self.K, self.L
        S = 2 * L - 1
        W = self.W.transpose(0, 3, 1, 2).reshape(-1, S, S)[:K]
        g = self.g.transpose(0, 3, 1, 2).reshape(-1, L, L)[:K]
        idx = shift_index(L)
        stats.W[:, idx[:, None], idx[None, :]] += W
        add_data_images(stats.G, g)
        stats.n_patches += self.n_patches
        stats.sum_empty += self.sum_empty
        stats.sum_yy += self.sum_yy
        stats.loglik += self.loglik
        stats.junk = add_junk(stats.junk, self.junk)
        return stats


def add_data_images(G, g):
    """``G += FFT2(Z g)`` for data images ``g`` (K, L, L): the half spectrum whose crop is ``g``."""
    K, L, _ = g.shape
    ws = fft.workspace((K, 2 * L, 2 * L))
    ws.real[...] = 0.0
    ws.real[:, :L, :L] = g
    G += ws.forward()


def check_estep_args(L, L_model, upsilon, sigma2, what):
    """One sentence for an E-step's bad arguments: patch size against the model's, upsilon, sigma^2."""
    if L != L_model:
        raise NumbaemError(f"patches are {L}x{L} but {what} {L_model}x{L_model}; use one patch size")
    if isinstance(upsilon, Background):
        if not (0.0 < upsilon.upsilon and 0.0 < upsilon.varsigma and upsilon.upsilon + upsilon.varsigma < 1.0):
            raise NumbaemError(f"upsilon={upsilon.upsilon} and varsigma={upsilon.varsigma} must be positive with a "
                               "sum below 1")
    elif not 0.0 < upsilon < 1.0:
        raise NumbaemError(f"upsilon={upsilon} must lie strictly between 0 and 1")
    if not sigma2 > 0:
        raise NumbaemError(f"sigma2={sigma2} must be positive; give the noise variance of the micrograph pixels")


def _no_timer(name):
    return contextlib.nullcontext()


def e_step_chunk(patches, spectra, upsilon, sigma2, stats, n_chunk=None, keep_posteriors=False, timer=None,
                 return_best=False):
    """E-step on one chunk of patches; adds its sufficient statistics into ``stats``.

    Parameters
    ----------
    patches : ndarray, shape (n, L, L)
        ``n <= n_chunk``; the FFT plans are sized for ``n_chunk`` patches (padding rows
        are zero and do not count), so every chunk of a run reuses the same plans.
    spectra : DirectSpectra or ProjectionSpectra
        From :func:`projection_spectra`; its type selects the route.
    upsilon : float
        Prior probability of an empty patch, in (0, 1).
    sigma2 : float
        Noise variance, > 0.
    stats : SufficientStats
        Accumulated in place.
    n_chunk : int, optional
        Plan size; default ``n``.
    keep_posteriors : bool
        Also return the posteriors (n, K, 2L, 2L) and the empty-state posteriors (n,)
        (tests only: this is the array the streaming design never keeps).
    timer : callable(name) -> context manager, optional
        Wraps each step; the bench uses it to time the steps of this very code path.
        FFT route: ``patch_spectra``, ``products``, ``fft_backward``, ``posteriors``,
        ``fft_forward``, ``accumulate``, ``rest``. Direct route: ``scores``
        (correlations, scores, exponentials), ``posteriors`` (normalisation),
        ``accumulate`` and ``rest``.
    return_best : bool
        Also return :func:`best_states` of the chunk's patches (posterior picks).

    Returns
    -------
    loglik : ndarray, shape (n,)
        Log-likelihood of each patch under the model of section 4.
    (w, w_empty) when ``keep_posteriors``.
    best : dict when ``return_best`` (last).
    """
    patches = np.asarray(patches, dtype=np.float64)
    n, L, _ = patches.shape
    check_estep_args(L, spectra.L, upsilon, sigma2, "the projections are")
    n_chunk = n if n_chunk is None else int(n_chunk)
    if n > n_chunk:
        raise NumbaemError(f"chunk of {n} patches exceeds the planned chunk size {n_chunk}")
    K = spectra.K
    timer = timer or _no_timer
    if spectra.route == "direct":
        acc = DirectAccumulator(spectra)
        res = _direct_chunk(patches, spectra, upsilon, sigma2, acc, keep_posteriors or return_best, timer)
        with timer("rest"):
            acc.add_to(stats)
        if not (keep_posteriors or return_best):
            return res
        loglik, post, w_empty = res
        out = (loglik,)
        if keep_posteriors:
            out += (post, w_empty)
        if return_best:
            out += (best_states(post, w_empty),)
        return out if len(out) > 1 else loglik
    with timer("patch_spectra"):
        wp = fft.workspace((n_chunk, 2 * L, 2 * L))   # FFT2(Z y_j), padding rows zero
        wp.real[...] = 0.0
        wp.real[:n, :L, :L] = patches
        Yh = wp.forward()
    ws = fft.workspace((n_chunk, K, 2 * L, 2 * L))
    with timer("products"):
        _products(Yh, spectra.Pc, n, ws.spec)
    with timer("fft_backward"):
        C = ws.backward(normalise=False)
    log_mol, log_bg, share, pw = _background(upsilon, patches, sigma2, n_pad=C.shape[0])
    log_shift_prior = log_mol - math.log((2 * L - 1) ** 2 * K) + spectra.log_shift_offset
    with timer("posteriors"):
        w_empty, lse, norm = _posteriors(C, spectra.e, n, L, 1.0 / (2 * L) ** 2, log_shift_prior,
                                         log_bg, 1.0 / (2.0 * sigma2))
    post = C[:n] * norm[:n, None, None, None] if keep_posteriors else None
    best = best_states(C[:n] * norm[:n, None, None, None], w_empty[:n]) if return_best else None
    with timer("fft_forward"):
        Q = ws.forward()
    with timer("accumulate"):
        _accumulate(C, Yh, Q, norm, n, stats.W, stats.G)
    with timer("rest"):
        yy = np.einsum("jab,jab->j", patches, patches)
        loglik = lse[:n] - yy / (2.0 * sigma2) - 0.5 * L * L * math.log(2.0 * math.pi * sigma2)
        stats.n_patches += n
        _add_background(stats, w_empty[:n], share, pw)
        stats.sum_yy += float(yy.sum())
        stats.loglik += float(loglik.sum())
    out = (loglik,)
    if keep_posteriors:
        out += (post, w_empty[:n].copy())
    if return_best:
        out += (best,)
    return out if len(out) > 1 else loglik


def _direct_chunk(patches, spectra, upsilon, sigma2, acc, keep_posteriors=False, timer=None, patch_ids=None,
                  records=None):
    """The direct route on one chunk: adds into the :class:`DirectAccumulator` ``acc``.

    Scores of a (patch, lane block) are exponentiated against the block's own maximum
    (so a block is done in one visit); the patch's normaliser then combines the blocks,
    ``tot_j = upsilon' + sum_b exp(bmax_jb - mx_j) sum_t lsum_jbt`` (empty state counted
    once, ``upsilon'`` its relative weight), and block ``b``'s posteriors are its
    exponentials times ``f_jb = exp(bmax_jb - mx_j) / tot_j``, a factor the accumulation
    applies. Returns the per-patch log-likelihood (and posteriors in the theory's layout when
    ``keep_posteriors``).
    """
    timer = timer or _no_timer
    n, L, _ = patches.shape
    K, S = spectra.K, 2 * L - 1
    B, KB = spectra.P.shape[0], spectra.KB
    dt = spectra.dtype.type
    Y = np.ascontiguousarray(patches, dtype=spectra.dtype)
    C = np.empty((n, B, S, S, KB), spectra.dtype)
    bmax = np.empty((n, B))
    lsum = np.empty((n, B, KB))
    inv2s2 = 1.0 / (2.0 * sigma2)
    with timer("scores"):
        kernels.dense_scores(Y, spectra.P, spectra.E, n, dt(2.0 * inv2s2), dt(inv2s2), True, C, bmax, lsum)
    log_mol, log_bg, share, pw = _background(upsilon, patches, sigma2)
    log_shift_prior = log_mol - math.log((2 * L - 1) ** 2 * K) + spectra.log_shift_offset
    with timer("posteriors"):
        f, w_empty, lse = block_scales(bmax + log_shift_prior, lsum.sum(axis=2), log_bg)
    post = None
    if keep_posteriors:
        post = np.zeros((n, K, 2 * L, 2 * L))
        idx = shift_index(L)
        w = (C * f[:, :, None, None, None]).transpose(0, 1, 4, 2, 3).reshape(n, B * KB, S, S)[:, :K]
        post[:, :, idx[:, None], idx[None, :]] = w
    with timer("accumulate"):
        kernels.dense_accumulate(Y, C, np.ascontiguousarray(np.broadcast_to(f[:, :, None], lsum.shape)), n,
                                 acc.W, acc.g)
    if records is not None and patch_ids is not None and spectra.quats is not None:
        mass = (f[:, :, None] * lsum).reshape(n, B * KB)[:, :K]
        for j in range(n):
            records.quats[int(patch_ids[j])] = record_of(mass[j], lambda pos: spectra.quats[pos], RECORD_EPS)
    yy = np.einsum("jab,jab->j", patches, patches)
    loglik = lse - yy / (2.0 * sigma2) - 0.5 * L * L * math.log(2.0 * math.pi * sigma2)
    acc.n_patches += n
    _add_background(acc, w_empty, share, pw)
    acc.sum_yy += float(yy.sum())
    acc.loglik += float(loglik.sum())
    if keep_posteriors:
        return loglik, post, w_empty
    return loglik


def block_scales(bmax, bsum, log_upsilon):
    """Posterior scales of blocks of states from their maxima and sums (a log-sum-exp per patch).

    Parameters
    ----------
    bmax : ndarray, shape (n, B)
        Each block's largest log-probability (log prior included; ``-inf`` for an empty block).
    bsum : ndarray, shape (n, B)
        Each block's sum of ``exp(logp - bmax)``.
    log_upsilon : float or ndarray, shape (n,)
        Log-probability of the empty state (counted once per patch), or per patch that of the
        background states (empty and junk field, :class:`Background`).

    Returns
    -------
    f : ndarray, shape (n, B)
        ``exp(bmax - mx) / tot``: the posterior of a state is its ``exp(logp - bmax)``
        times its block's ``f``; 0 where a block lies 50 below the patch's best state.
    w_empty : ndarray, shape (n,)
    lse : ndarray, shape (n,)
        ``log sum_states exp(logp)``.
    """
    mx = np.maximum(bmax.max(axis=1, initial=-np.inf), log_upsilon)
    rel = bmax - mx[:, None]
    w = np.where(rel > kernels.LOG_NEGLIGIBLE, np.exp(np.maximum(rel, kernels.LOG_NEGLIGIBLE)), 0.0)
    tot = np.exp(log_upsilon - mx) + (w * bsum).sum(axis=1)
    f = w / tot[:, None]
    return f, np.exp(log_upsilon - mx) / tot, mx + np.log(tot)


def stream_stats(source, idx, spectra, upsilon, sigma2, n_chunk, progress=None, timer=None, stats=None,
                 release=True):
    """E-step over the patches ``idx`` of ``source``, chunk by chunk; their sufficient statistics.

    Memory: one chunk of ``n_chunk`` patches at a time (the FFT plans are sized for it;
    the direct route keeps its sums in its own layout and converts them once, at the
    end). ``timer`` (see :func:`numbaem.em.estep.e_step_chunk`) also wraps the patch
    reads (``read_patches``).

    ``spectra`` is a :class:`ProjectionSpectra` or :class:`DirectSpectra` (one model for
    every patch), a search's model (:mod:`numbaem.em.search`), or a :class:`GroupSpectra`
    (CTF groups, theory section 11): then ``source.patch_groups`` tells each patch's group,
    the patches of each group run against that group's spectra (made one group at a
    time), and the statistics have a group axis. ``stats`` (optional) is added into
    instead of new statistics; ``release=False`` keeps the chunk's FFT workspaces for a
    following call.
    """
    if isinstance(spectra, GroupSpectra):
        return _stream_groups(source, idx, spectra, upsilon, sigma2, n_chunk, progress, timer, stats)
    clock = timer or _no_timer
    L, K = source.L, spectra.K
    stats = SufficientStats.zeros(K, L) if stats is None else stats
    buf = np.empty((n_chunk, L, L))
    if spectra.route == "search":
        return spectra.stream_stats(source, idx, upsilon, sigma2, n_chunk, progress, timer)   # numbaem.em.search
    if spectra.route == "direct":
        acc = DirectAccumulator(spectra)
        records = Records() if spectra.quats is not None else None
        for i in range(0, len(idx), n_chunk):
            sel = idx[i:i + n_chunk]
            with clock("read_patches"):
                patches = source.get(sel, out=buf[:len(sel)])
            _direct_chunk(patches, spectra, upsilon, sigma2, acc, timer=timer, patch_ids=sel, records=records)
            if progress is not None:
                progress(len(sel))
        with clock("rest"):
            acc.add_to(stats)
        stats.records = records
        return stats
    for i in range(0, len(idx), n_chunk):
        sel = idx[i:i + n_chunk]
        with clock("read_patches"):
            patches = source.get(sel, out=buf[:len(sel)])
        e_step_chunk(patches, spectra, upsilon, sigma2, stats, n_chunk=n_chunk, timer=timer)
        if progress is not None:
            progress(len(sel))
    if release:
        fft.release((n_chunk, K, 2 * L, 2 * L))   # the chunk's workspaces are not kept beside the M-step
        fft.release((n_chunk, 2 * L, 2 * L))
    return stats


def _stream_groups(source, idx, spectra, upsilon, sigma2, n_chunk, progress, timer, stats):
    """:func:`stream_stats` for CTF groups: each group's patches against its own spectra."""
    L, K, n_g = source.L, spectra.K, spectra.n_groups
    idx = np.asarray(idx, dtype=np.int64)
    groups = source.patch_groups(idx)
    if len(idx) and (groups.min() < 0 or groups.max() >= n_g):
        raise NumbaemError(f"the patches belong to groups up to {int(groups.max())} but only {n_g} group filters "
                           "were given; give one filter per group")
    stats = SufficientStats.zeros(K, L, n_groups=n_g) if stats is None else stats
    sizes = set()
    for g in range(n_g):
        sel = idx[groups == g]
        if len(sel) == 0:
            continue
        # a group smaller than a chunk gets plans of its own size: the FFTs of a chunk's padding rows
        # cost as much as real ones, and there is a partial chunk per group
        n = min(int(n_chunk), len(sel))
        sizes.add(n)
        part = SufficientStats(stats.W[g], stats.G[g])     # views: the kernels add into the group's slices
        stream_stats(source, sel, spectra.group(g), upsilon, sigma2, n, progress, timer, stats=part, release=False)
        add_totals(stats, part)
    for n in sizes:
        fft.release((n, K, 2 * L, 2 * L))
        fft.release((n, 2 * L, 2 * L))
    return stats
