"""The memory plan of an EM iteration: what is held, when, and how big a chunk may be.

``--memory`` is a budget for the whole process. Of it, :data:`INTERPRETER_BYTES` is set
aside for the interpreter and the libraries (Python, numba, LLVM, SciPy and pyFFTW hold
0.2-0.3 GiB resident once warm); the rest, the *room*, holds numbaem's arrays. Every
array that lives longer than a statement is counted, by phase of the iteration (``r``
and ``c`` are one rotation's ``2L x 2L`` real array and its ``2L x (L + 1)`` complex half
spectrum, ``a = L^2 M 8`` bytes one rotation's operator):

resident all iteration
    the operator (all ``K`` rotations if they take at most a quarter of the room, else
    one block of rotations rebuilt on demand), the projection spectra (``K (r + c)``),
    the sufficient statistics ``W, G`` (``K (r + c)``), the projections (``K L^2 8``),
    the rotation-independent images ``Phi``, ``H`` with its factor, the minibatch's
    indices (8 bytes a patch) and :data:`SMALL_OBJECTS_BYTES` for small objects.
projection spectra
    one ``(K, 2L, 2L)`` transform workspace (``K (r + c)``).
E-step
    one chunk's work arrays (:func:`numbaem.em.estep.chunk_bytes`), its FFT workspace
    among them (with CTF groups also the spectra phase's arrays: each group's spectra
    are made between its chunks).
M-step
    the same ``(K, 2L, 2L)`` workspace, ``h`` and ``g`` (``2 K L^2 8``), the copy
    ``B = sqrt(h) A`` of a sub-block of rotations (at most :data:`MSTEP_BLOCK_BYTES`),
    and ``H``'s update.

With CTF groups (theory section 11; ``G`` groups): the filters ``Psi_g`` (``G L^4 8``) are
resident, the statistics take ``G K (r + c)`` (the spectra stay ``K (r + c)``: one group's
at a time), the spectra phase also holds the filtered projections (``K L^2 8``), and the
M-step holds ``sqrt(h)`` of every group (``G K L^2 8``), ``u`` and one group's ``g``
(``2 K L^2 8``), ``Y_g`` and ``Y_g^T Y_g`` or the copy ``Psi_g A_k`` (one group and rotation
at a time), ``Q_k`` and ``Q_k A_k`` (``L^4 8 + L^2 M 8``) instead of the copy ``B``.

The plan also bounds the FFT plan cache (:func:`numbaem.runtime.fft.set_cache_limit`)
to the workspaces it counts, so cached buffers never exceed the budget either.
"""
import dataclasses
import os

from ..runtime.errors import NumbaemError
from ..runtime.memory import format_size
from .estep import chunk_bytes
from .kernels import LANE

#: Bytes set aside for the interpreter and the libraries (measured 0.2-0.3 GiB resident).
INTERPRETER_BYTES = 256 << 20

#: Python objects and small arrays of an iteration (index slices, per-chunk scalars, logging).
SMALL_OBJECTS_BYTES = 256 << 10

#: Largest copy ``B = sqrt(h) A`` of the M-step (a sub-block of rotations).
MSTEP_BLOCK_BYTES = 16 << 20

# Work arrays of one chunk are kept near this size when the budget allows more: the
# E-step passes over them several times, and a chunk that stays in cache runs faster
# than one streamed from main memory. Measured on the 2-core machine (bench, 2 threads):
# L=7, K=300: 1.15 / 0.98 / 0.88 / 0.91 / 1.35 us per (patch, rotation) at chunks of
# 8 / 16 / 32 / 64 / 128 MiB; L=11, K=560: 3.69 / 3.49 / 3.56 / 4.31 at 16 / 32 / 64 / 128.
# Override with NUMBAEM_CHUNK_BYTES.
CHUNK_TARGET_BYTES = 32 << 20


def chunk_target_bytes():
    try:
        return int(float(os.environ.get("NUMBAEM_CHUNK_BYTES", CHUNK_TARGET_BYTES)))
    except ValueError:
        return CHUNK_TARGET_BYTES


def _sizes(K, L):
    r = (2 * L) ** 2 * 8
    c = 2 * L * (L + 1) * 16
    return r, c


def phi_bytes(L, lmax, n_ls):
    """Bytes of the cached rotation-independent images ``Phi`` (:func:`numbaem.model.projection.phi_images`)."""
    return n_ls * (2 * lmax + 1) * L * L * 16


def worker_bytes(K, L, n_chunk, n_groups=None, route="fft", itemsize=8):
    """Bytes one E-step task holds: the projection spectra, its statistics and one chunk
    (with CTF groups also the projections and the filters it makes a group's spectra from)."""
    r, c = _sizes(K, L)
    extra = 0 if n_groups is None else 2 * K * L * L * 8 + int(n_groups) * L ** 4 * 8
    return spectra_bytes(K, L, route, itemsize) + K * (r + c) + sums_bytes(K, L, route) + \
        chunk_bytes(n_chunk, K, L, route, itemsize) + extra


def spectra_bytes(K, L, route="fft", itemsize=8):
    """Bytes of what the E-step holds of the projections: the FFT route's spectra ``K (r + c)``,
    or the direct route's projections and energies in lane blocks (padded to :data:`LANE`)."""
    if route == "direct":
        Kp = -(-K // LANE) * LANE + LANE * 2
        return Kp * (L * L + (2 * L - 1) ** 2) * itemsize
    r, c = _sizes(K, L)
    return K * (r + c)


def sums_bytes(K, L, route="fft"):
    """Bytes of the direct route's sums in its own layout (:class:`numbaem.em.estep.DirectAccumulator`)."""
    if route != "direct":
        return 0
    Kp = -(-K // LANE) * LANE + LANE * 2
    return Kp * ((2 * L - 1) ** 2 + L * L) * 8


@dataclasses.dataclass(frozen=True)
class IterationPlan:
    """How one iteration uses its budget (see the module doc).

    Attributes
    ----------
    budget : int
    n_chunk : int
        Patches per E-step chunk.
    operator_block : int
        Rotations per operator block (``K`` when the whole operator is kept).
    mstep_block_bytes : int
        Bound of the M-step's copy ``B``.
    fft_cache_bytes : int
        Bound of the FFT plan cache during the iteration.
    parts : dict
        Bytes of each counted item (``peak`` is their largest sum over the phases).
    """

    budget: int
    n_chunk: int
    operator_block: int
    mstep_block_bytes: int
    fft_cache_bytes: int
    parts: dict

    @property
    def keep_operator(self):
        return self.operator_block >= self.parts["K"]

    @property
    def peak(self):
        return self.parts["peak"]


def plan_iteration(budget, K, L, M, n_selected, *, phi=0, target=None, lmax=None, n_groups=None, route=None,
                   itemsize=8):
    """The :class:`IterationPlan` of an iteration with ``K`` rotations and ``M`` coefficients.

    Parameters
    ----------
    budget : int
        The process's budget in bytes (``--memory``).
    K, L, M : int
    n_selected : int
        Patches in the iteration (a chunk never exceeds it).
    phi : int
        Bytes of the cached ``Phi`` images.
    target : int, optional
        Preferred chunk bytes (default :data:`CHUNK_TARGET_BYTES`).
    lmax : int, optional
        Named in the error message.
    n_groups : int, optional
        CTF groups (None: no filters, theory sections 4-6).
    route : {'direct', 'fft'}, optional
        The E-step's route (default: :func:`numbaem.em.estep.choose_route` of ``L``), and
        ``itemsize`` the direct route's bytes per number (4: single precision).

    Raises
    ------
    NumbaemError
        When not even one patch fits.
    """
    from .estep import choose_route
    route = choose_route(L) if route is None else route
    room = int(budget) - INTERPRETER_BYTES
    r, c = _sizes(K, L)
    a = L * L * M * 8
    op_block = K if K * a <= room // 4 else max(1, (room // 8) // a)
    mstep_b = min(MSTEP_BLOCK_BYTES, op_block * a)
    mstep_b = max(a, mstep_b - mstep_b % a)
    workspace_K = K * (r + c)
    spec_b = spectra_bytes(K, L, route, itemsize)
    if n_groups is None:
        resident = (op_block * a + spec_b + K * (r + c) + sums_bytes(K, L, route) + K * L * L * 8 + phi
                    + 3 * M * M * 8 + 8 * int(n_selected) + SMALL_OBJECTS_BYTES)
        phases = dict(spectra=workspace_K,
                      mstep=workspace_K + 2 * K * L * L * 8 + mstep_b + M * M * 8)
    else:
        G, P = int(n_groups), L * L
        # Y_g and its product of the Gram route, or the copy Psi_g A_k of the direct route (numbaem.em.mstep);
        # the statistics have a group axis (and the direct route's sums are one group's at a time)
        mstep_b = max(2 * P * P * 8, P * M * 8)
        resident = (op_block * a + spec_b + G * K * (r + c) + sums_bytes(K, L, route) + K * L * L * 8
                    + G * P * P * 8 + phi + 3 * M * M * 8 + 8 * int(n_selected) + SMALL_OBJECTS_BYTES)
        phases = dict(spectra=workspace_K + K * L * L * 8,
                      mstep=workspace_K + (G + 2) * K * P * 8 + mstep_b + 2 * P * P * 8 + P * M * 8 + M * M * 8)
    # with groups, each group's spectra are made during the E-step, beside the chunk's arrays
    beside = 0 if n_groups is None else workspace_K + K * L * L * 8
    per = chunk_bytes(1, K, L, route, itemsize)
    free = room - resident - beside
    if free < per or room - resident - max(phases.values()) < 0:
        need = INTERPRETER_BYTES + resident + max(per + beside, max(phases.values()))
        order = f"lmax={lmax} ({M} coefficients)" if lmax is not None else f"{M} coefficients"
        raise NumbaemError(f"the memory budget {format_size(budget)} is too small for {K} rotations and "
                           f"{order} at L={L}: at least {format_size(need)} is needed (of which "
                           f"{format_size(INTERPRETER_BYTES)} for the interpreter); raise --memory or lower "
                           "the rotations of the schedule")
    target = chunk_target_bytes() if target is None else int(target)
    n_chunk = int(max(1, min(n_selected, free // per, max(1, target // per))))
    # the chunk's workspaces ride in the FFT cache beside the (K, 2L, 2L) one
    cache = (chunk_bytes(n_chunk, K, L) if route == "fft" else 0) + workspace_K + (1 << 20)
    phases["estep"] = chunk_bytes(n_chunk, K, L, route, itemsize) + beside
    parts = dict(K=K, route=route, resident=resident, operator=op_block * a,
                 **{f"phase_{k}": v for k, v in phases.items()})
    parts["peak"] = resident + max(phases.values())
    return IterationPlan(int(budget), n_chunk, int(op_block), int(mstep_b), int(cache), parts)


def plan_search(budget, basis, spec, n_selected, itemsize=8, *, records=0, target=None, n_groups=None):
    """The :class:`IterationPlan` of a coarse-to-fine search iteration (:mod:`numbaem.em.search`).

    Resident: the coarse level's projections and energies (lane blocks), the direction
    images of every finer level (steering), the sums of every level (dense: rows never
    reached are never written, but are counted), ``H`` with its factor, the minibatch's
    indices and the records (64 bytes a rotation, at most 16 a patch, for ``records``
    patches). E-step: one chunk (:func:`numbaem.em.search.chunk_bytes`). M-step: the
    statistics of every row, their ``h`` and one block of the operator of the rows and its
    copy ``B`` (at most :data:`MSTEP_BLOCK_BYTES` each).

    Rows: where the sums and statistics of every rotation of every level fit, the plan
    counts them all (a search reaches far fewer). Where they do not (fine levels: millions
    of rotations), ``parts["max_rows"]`` is the number of rows the budget holds beside a
    chunk of the target size (of one patch where that leaves too few), the coarse level's
    among them; with CTF groups each group's accumulator then holds ``max_rows / groups`` (their
    statistics are kept together for the M-step); the accumulator stops with an error
    naming the budget if the patches reach more (:class:`numbaem.em.search.SearchAccumulator`).
    Not counted: level-wide tables of a fine level (neighbours for the margin, k-d trees).
    With ``n_groups`` CTF groups: their filters, one group's coarse spectra beside the
    unfiltered coarse projections, and the filtered block ``Psi_g A`` in the M-step.

    Raises
    ------
    NumbaemError
        When not even one patch fits, naming the levels and what they need.
    """
    from ..model import hopf
    from .search import chunk_bytes as search_chunk_bytes, direction_bytes
    L, M, lmax = basis.L, basis.M, basis.lmax
    S = 2 * L - 1
    room = int(budget) - INTERPRETER_BYTES
    rows = sum(hopf.size(r) for r in spec.levels)
    row_sums = (S * S + L * L) * 8                   # a row of the accumulator's sums
    row_stats = (S * S + L * L) * 8 + 8              # its copy in the statistics, with its rotation
    a = L * L * M * 8
    mstep_b = max(a, MSTEP_BLOCK_BYTES - MSTEP_BLOCK_BYTES % a)
    base = (spectra_bytes(hopf.size(spec.coarse), L, "direct", itemsize)
            + sum(direction_bytes(r, L, lmax) for r in spec.levels[1:])
            + rows * 8 + hopf.size(spec.coarse) * 8 * (S * S + L * L)       # slot tables, coarse lane-block sums
            + phi_bytes(L, lmax, len(basis.ls_pairs)) + 3 * M * M * 8 + 8 * int(n_selected)
            + 64 * 16 * int(records) + SMALL_OBJECTS_BYTES)
    if n_groups is not None:
        base += int(n_groups) * L ** 4 * 8 + spectra_bytes(hopf.size(spec.coarse), L, "direct", itemsize) \
            + hopf.size(spec.coarse) * L * L * 8
    m_fixed = L * L * 8 * (mstep_b // a) + 2 * mstep_b + M * M * 8 + (mstep_b if n_groups is not None else 0)
    fixed = search_chunk_bytes(0, spec, L, itemsize)        # a group of refining patches, scratch
    per = search_chunk_bytes(1, spec, L, itemsize) - fixed   # one more patch
    target = chunk_target_bytes() if target is None else int(target)
    # every rotation of every level fits (the sums of each row reached, then their copy in the M-step) ...
    max_rows = rows
    if room - base - rows * row_sums - max(fixed + per, m_fixed + rows * row_stats) < 0:
        # ... or not (fine levels: millions of rotations, of which a search reaches a few): the rows
        # the budget holds beside a chunk of the target size; the accumulator stops past them
        chunk = fixed + per * max(1, min(int(n_selected), target // per))
        max_rows = min(rows, int((room - base - max(chunk, m_fixed)) // (row_sums + row_stats)))
        if max_rows < hopf.size(spec.coarse):      # a chunk of one patch leaves more rows
            max_rows = min(rows, int((room - base - max(fixed + per, m_fixed)) // (row_sums + row_stats)))
    if max_rows < hopf.size(spec.coarse):
        need = INTERPRETER_BYTES + base + max(fixed + per, m_fixed) + hopf.size(spec.coarse) * (row_sums + row_stats)
        steps = "-".join(f"{hopf.level_step(r):g}" for r in spec.levels)
        raise NumbaemError(f"the memory budget {format_size(budget)} is too small for a search over {steps} "
                           f"degrees at L={L} with M={M} coefficients: at least {format_size(need)} is needed (of "
                           f"which {format_size(INTERPRETER_BYTES)} for the interpreter); raise --memory or use a "
                           "coarser fine step")
    resident = base + max_rows * row_sums
    phases = dict(spectra=hopf.size(spec.coarse) * L * L * 8 * 2, mstep=max_rows * row_stats + m_fixed)
    free = room - resident - fixed
    n_chunk = int(max(1, min(n_selected, free // per, max(1, target // per))))
    phases["estep"] = search_chunk_bytes(n_chunk, spec, L, itemsize)
    parts = dict(K=rows, route="search", precision=f"float{8 * itemsize}", resident=resident, operator=mstep_b,
                 max_rows=max_rows, **{f"phase_{k}": v for k, v in phases.items()})
    parts["peak"] = resident + max(phases.values())
    return IterationPlan(int(budget), n_chunk, int(mstep_b // a), int(mstep_b), 1 << 20, parts)
