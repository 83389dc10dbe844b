"""E-step kernels of the direct route: the correlations over shifts as sums over pixels.

theory section 5 computes, for a patch ``y`` and a projection ``p`` (both ``L x L``), the
correlation over every shift by FFTs of size ``2L``. Written over the pixels with the
linear shift ``s = (s1, s2)``, ``-(L-1) <= s1, s2 <= L-1`` (the theory's circular shift is
``l = s mod 2L``; the dropped shifts ``l1 = L`` or ``l2 = L`` are exactly those where no
pixel overlaps):

    c[s]  = sum_{a, a+s in [0,L)^2} y[a + s] p[a]          (= c_jk[l])
    e[s]  = sum_{a, a+s in [0,L)^2} p[a]^2                  (= e_k[l])
    g[q] += sum_{s, q+s in [0,L)^2} w[s] y[q + s]           (= crop_LxL IFFT2(FFT2(Z y) conj(FFT2(w))))

``c`` and ``g`` cost ``L^4`` multiply-adds per (patch, rotation) pair each, against two
``2L x 2L`` transforms on the FFT route; they run over a block of ``KB`` rotations at once
in SIMD lanes (projections laid out ``(L, L, KB)``), in single or double precision, and
need no transform. At ``L = 7`` and ``11`` FFTW's batched ``2L x 2L`` real transforms
are far from its peak (22 = 2 x 11 has no codelet) and the direct sums are faster; the
FFT route stays for larger ``L`` (:mod:`numbaem.em.estep` picks).

Layout. Dense (every patch against every rotation): rotations in *lane blocks* of ``KB``
(a multiple of :data:`LANE`), projections ``P[b, a1, a2, t]`` for rotation ``b KB + t``,
energies ``E[b, i1, i2, t]`` with ``i = s + L - 1`` (``S = 2L - 1`` per axis). Padding
lanes carry ``e = +inf``, so their scores are ``-inf`` and their posteriors exactly 0.
Sparse (each patch against its own list of rotations, the coarse-to-fine search of
:mod:`numbaem.em.search`): a patch's rotations are gathered into lane blocks of its own.

Determinism: every kernel splits its work into tasks that do not depend on the thread
count, and every sum over patches runs in patch order, so 1 and N threads give the same
bits.
"""
import math

import numpy as np
from numba import prange, types
from numba.extending import overload

from ..runtime.jit import jit, pjit

LANE = 8          # float32 lanes of an AVX2 register; lane blocks are multiples of it
MAX_BLOCK = 128   # rotations per lane block: (L, L, 128) float32 projections are 62 KiB at L = 11
BLOCK = 64        # the dense layout's lane blocks hold about this many rotations (lane_blocks)

#: exp(-50) = 2e-22: a state 50 below its block's best adds less than round-off to any
#: patch's normaliser with fewer than 1e5 states; its posterior is set to 0 (as on the FFT route).
LOG_NEGLIGIBLE = -50.0

_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00
_F_LN2_HI = np.float32(0.693359375)
_F_LN2_LO = np.float32(-2.12194440e-4)
_F_INV_LN2 = np.float32(1.44269504088896341)
_F_HALF = np.float32(0.5)
_F_CUT = np.float32(LOG_NEGLIGIBLE)
_F_ZERO = np.float32(0.0)
_F_TAYLOR = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))
_D_TAYLOR = tuple(1.0 / math.factorial(i) for i in range(13))


def lane_blocks(K, threads=None):
    """``(KB, n_blocks)``: rotations per lane block and the number of blocks for ``K`` rotations.

    ``KB`` is a multiple of :data:`LANE` near :data:`BLOCK` (at most :data:`MAX_BLOCK`);
    the blocks are as even as the lane width allows (fewer than ``LANE`` padding lanes
    per block). Scoring and accumulating a (patch, rotation) pair, 2 threads, measured
    (us): L = 7, K = 1024: 1.35 + 1.29 at 16 lanes, 0.76 + 0.46 at 32, 0.62 + 0.46 at
    64, 0.73 + 0.36 at 128; L = 11, K = 576: 5.8 + 5.8 at 16, 1.8 + 1.2 at 64, 2.2 + 1.8
    at 120 (the exponentials of a block stop fitting the caches). The layout depends on
    ``K`` alone (``threads`` is ignored): the scores of a block are exponentiated against
    the block's maximum, so another layout would round differently, and results must not
    depend on the thread count.
    The accumulation runs one block per task: ``K / 64`` tasks (on many cores a small
    grid leaves cores idle there; the scores run per (pair of patches, block)).
    """
    K = int(K)
    n = max(-(-K // BLOCK), 1)
    KB = -(-K // n)
    KB = -(-KB // LANE) * LANE
    return KB, -(-K // KB)


# --------------------------------------------------------------------------- exp

def _exp_parts(x):  # pragma: no cover - compiled through the overload below
    raise NotImplementedError


@overload(_exp_parts, inline="always")
def _ol_exp_parts(x):
    """``(q, k)`` with ``exp(x) = q 2^k`` for ``-50 <= x <= 0`` (``k`` integral, as a float).

    Cody-Waite reduction ``x = k ln2 + r``, ``|r| <= ln2/2``, and a Taylor polynomial for
    ``exp(r)``: degree 7 in float32 (truncation 2.6e-9, below the float32 ulp), degree
    12 in float64 (below 1e-17). ``np.floor`` keeps ``k`` a float of the same width, so the
    loops that call it vectorise (``math.floor`` returns an integer, a scalar conversion).
    """
    if isinstance(x, types.Float) and x.bitwidth == 32:
        def impl32(x):
            k = np.floor(x * _F_INV_LN2 + _F_HALF)
            r = (x - k * _F_LN2_HI) - k * _F_LN2_LO
            q = _F_TAYLOR[7]
            q = q * r + _F_TAYLOR[6]
            q = q * r + _F_TAYLOR[5]
            q = q * r + _F_TAYLOR[4]
            q = q * r + _F_TAYLOR[3]
            q = q * r + _F_TAYLOR[2]
            q = q * r + _F_TAYLOR[1]
            q = q * r + _F_TAYLOR[0]
            return q, k
        return impl32

    def impl64(x):
        k = np.floor(x * _INV_LN2 + 0.5)
        r = (x - k * _LN2_HI) - k * _LN2_LO
        q = _D_TAYLOR[12]
        q = q * r + _D_TAYLOR[11]
        q = q * r + _D_TAYLOR[10]
        q = q * r + _D_TAYLOR[9]
        q = q * r + _D_TAYLOR[8]
        q = q * r + _D_TAYLOR[7]
        q = q * r + _D_TAYLOR[6]
        q = q * r + _D_TAYLOR[5]
        q = q * r + _D_TAYLOR[4]
        q = q * r + _D_TAYLOR[3]
        q = q * r + _D_TAYLOR[2]
        q = q * r + _D_TAYLOR[1]
        q = q * r + _D_TAYLOR[0]
        return q, k
    return impl64


def _pow2_bits(k):  # pragma: no cover - compiled through the overload below
    raise NotImplementedError


@overload(_pow2_bits, inline="always")
def _ol_pow2_bits(k):
    """The IEEE-754 bit pattern of ``2^k`` (``-73 <= k <= 0`` integral), as an integer of ``k``'s width."""
    if isinstance(k, types.Float) and k.bitwidth == 32:
        return lambda k: (np.int32(k) + np.int32(127)) << np.int32(23)
    return lambda k: (np.int64(np.int32(k)) + np.int64(1023)) << np.int64(52)


def _typed(x, v):  # pragma: no cover - compiled through the overload below
    raise NotImplementedError


@overload(_typed, inline="always")
def _ol_typed(x, v):
    """``v`` as a scalar of ``x``'s float width (a literal would promote float32 work to float64)."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x, v: np.float32(v)
    return lambda x, v: np.float64(v)


def _bits_scratch(n, x):  # pragma: no cover - compiled through the overload below
    raise NotImplementedError


@overload(_bits_scratch, inline="always")
def _ol_bits_scratch(n, x):
    """Scratch integers of ``x``'s width (for :func:`exp_shifted`)."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda n, x: np.empty(n, np.int32)
    return lambda n, x: np.empty(n, np.int64)


@jit
def exp_shifted(v, m, bits):
    """``v[t] = exp(v[t] - m)`` in place, and 0 where ``v[t] - m <= -50``.

    ``bits`` is scratch of ``v``'s length, an integer array of ``v``'s width (int32 for
    float32): ``2^k`` is written there as its bit pattern and read back through a float
    view, so both loops vectorise. Relative error below 2e-7 (float32) / 4e-16 (float64).
    """
    n = v.shape[0]
    scale = bits.view(v.dtype)
    cut = _typed(m, LOG_NEGLIGIBLE)
    for t in range(n):
        d = v[t] - m
        q, k = _exp_parts(max(d, cut))
        bits[t] = _pow2_bits(k)
        v[t] = q if d > cut else q * 0
    for t in range(n):
        v[t] *= scale[t]


# --------------------------------------------------------------------------- correlations

@jit
def _correlate(y, P, C):
    """``C[s1 + L-1, s2 + L-1, t] = sum_a y[a + s] P[a, t]`` over ``a, a + s`` in the box.

    y : (L, L); P : (L, L, KB); C : (S, S, KB), overwritten. ``L^4 KB`` multiply-adds,
    the innermost loop over the lanes.
    """
    L = y.shape[0]
    KB = P.shape[2]
    S = 2 * L - 1
    C[:] = 0.0
    for i1 in range(S):
        s1 = i1 - (L - 1)
        lo1 = max(0, -s1)
        hi1 = min(L, L - s1)
        for a1 in range(lo1, hi1):
            yr = y[a1 + s1]
            Pr = P[a1]
            for i2 in range(S):
                s2 = i2 - (L - 1)
                lo2 = max(0, -s2)
                hi2 = min(L, L - s2)
                cv = C[i1, i2]
                for a2 in range(lo2, hi2):
                    yv = yr[a2 + s2]
                    pv = Pr[a2]
                    for t in range(KB):
                        cv[t] += yv * pv[t]


@jit
def _correlate2(y, z, P, C, D):
    """:func:`_correlate` of two patches ``y``, ``z`` against the same block ``P`` (each load of
    ``P`` serves two multiply-adds: about 25% faster at L = 11)."""
    L = y.shape[0]
    KB = P.shape[2]
    S = 2 * L - 1
    C[:] = 0.0
    D[:] = 0.0
    for i1 in range(S):
        s1 = i1 - (L - 1)
        lo1 = max(0, -s1)
        hi1 = min(L, L - s1)
        for a1 in range(lo1, hi1):
            yr = y[a1 + s1]
            zr = z[a1 + s1]
            Pr = P[a1]
            for i2 in range(S):
                s2 = i2 - (L - 1)
                lo2 = max(0, -s2)
                hi2 = min(L, L - s2)
                cv = C[i1, i2]
                dv = D[i1, i2]
                for a2 in range(lo2, hi2):
                    yv = yr[a2 + s2]
                    zv = zr[a2 + s2]
                    pv = Pr[a2]
                    for t in range(KB):
                        p = pv[t]
                        cv[t] += yv * p
                        dv[t] += zv * p


@jit
def _back_correlate(y, w, out):
    """``out[q, t] = sum_s w[s + L-1, t] y[q + s]`` over ``s, q + s`` in the box.

    y : (L, L); w : (S, S, KB); out : (L, L, KB), overwritten. ``L^4 KB`` multiply-adds.
    """
    L = y.shape[0]
    KB = w.shape[2]
    out[:] = 0.0
    for q1 in range(L):
        for s1 in range(-q1, L - q1):
            yr = y[q1 + s1]
            wr = w[s1 + L - 1]
            for q2 in range(L):
                ov = out[q1, q2]
                for s2 in range(-q2, L - q2):
                    yv = yr[q2 + s2]
                    wv = wr[s2 + L - 1]
                    for t in range(KB):
                        ov[t] += yv * wv[t]


@jit
def _score_block(blk, eb, c2, inv2s2, mx, bits, lsum):
    """Scores ``c2 c - inv2s2 e`` of one (patch, lane block), then ``exp(score - max)``.

    blk : (n, KB) holds ``c`` and receives the exponentials; eb : (n, KB) the energies;
    mx : (KB,) of blk's dtype, bits : (KB,) integer of its width (scratch); lsum : (KB,)
    float64 receives each lane's sum of exponentials. The maximum runs per lane (the loop
    vectorises without reassociating a reduction) and is combined in a fixed order.
    Returns the block's maximum score (float64; ``-inf`` when every lane is padding).
    The constant log prior is left out of the scores: it cancels in the posteriors.
    """
    n, KB = blk.shape
    mx[:] = -np.inf
    c2 = _typed(mx[0], c2)
    inv2s2 = _typed(mx[0], inv2s2)
    for q in range(n):
        row = blk[q]
        er = eb[q]
        for t in range(KB):
            v = c2 * row[t] - inv2s2 * er[t]
            row[t] = v
            mx[t] = max(mx[t], v)
    m = mx[0]
    for t in range(1, KB):
        m = max(m, mx[t])
    lsum[:] = 0.0
    if m == -np.inf:
        blk[:] = 0.0
        return -np.inf
    for q in range(n):
        row = blk[q]
        exp_shifted(row, m, bits)
        for t in range(KB):
            lsum[t] += row[t]
    return float(m)


# --------------------------------------------------------------------------- dense

@pjit
def dense_scores(Y, P, E, n_valid, c2, inv2s2, keep, C, bmax, lsum):
    """Every (patch, lane block) of a chunk: correlate, score, exponentiate.

    Parameters
    ----------
    Y : (n, L, L); P : (B, L, L, KB); E : (B, S, S, KB)   (one dtype)
    n_valid : int
        Patches ``j < n_valid`` are processed.
    c2, inv2s2 : scalars of that dtype
        ``2 / (2 sigma^2)`` and ``1 / (2 sigma^2)``.
    keep : bool
        Keep the exponentials in ``C`` (for the accumulation); otherwise each task uses
        scratch of its own and only the masses come out (the coarse pass).
    C : (n, B, S, S, KB), or any 5-d array of the dtype when not ``keep``
        Receives ``exp(score - bmax[j, b])``.
    bmax : (n, B) float64
        Block maxima of the scores (without the log prior).
    lsum : (n, B, KB) float64
        Per lane (rotation) sums of ``exp(score - bmax)`` over the shifts.

    Parallel over the flat (pair of patches, block) tasks (two patches share each load of
    the projections); each task's result depends on its inputs alone.
    """
    B, KB = P.shape[0], P.shape[3]
    S = E.shape[1]
    n_pairs = (n_valid + 1) // 2
    for task in prange(n_pairs * B):
        jp = task // B
        b = task - jp * B
        j0 = 2 * jp
        j1 = j0 + 1
        if keep:
            blk0 = C[j0, b]
            blk1 = C[j1, b] if j1 < n_valid else np.empty((S, S, KB), E.dtype)
        else:
            blk0 = np.empty((S, S, KB), E.dtype)
            blk1 = np.empty((S, S, KB), E.dtype)
        if j1 < n_valid:
            _correlate2(Y[j0], Y[j1], P[b], blk0, blk1)
        else:
            _correlate(Y[j0], P[b], blk0)
        mx = np.empty(KB, E.dtype)
        bits = _bits_scratch(KB, E[b, 0, 0, 0])
        Eb = E[b].reshape(S * S, KB)
        bmax[j0, b] = _score_block(blk0.reshape(S * S, KB), Eb, c2, inv2s2, mx, bits, lsum[j0, b])
        if j1 < n_valid:
            bmax[j1, b] = _score_block(blk1.reshape(S * S, KB), Eb, c2, inv2s2, mx, bits, lsum[j1, b])


@pjit
def dense_accumulate(Y, C, f, n_valid, Wacc, gacc):
    """``Wacc[b, :, :, t] += sum_j f[j, b, t] C[j, b, :, :, t]``, ``gacc`` likewise with ``back_correlate``.

    Y : (n, L, L); C : (n, B, S, S, KB); f : (n, B, KB) float64, the posterior scale of
    each (patch, rotation) (``exp(bmax - max_j) / total_j``, 0 for a state that is not
    counted); Wacc : (B, S, S, KB), gacc : (B, L, L, KB) float64. Parallel over lane
    blocks, each summing its patches in order. Blocks whose factors are all 0 are skipped.
    """
    B = Wacc.shape[0]
    L = Y.shape[1]
    S = Wacc.shape[1]
    KB = Wacc.shape[3]
    for b in prange(B):
        tmp = np.empty((L, L, KB), C.dtype)
        Wf = Wacc[b].reshape(S * S, KB)
        gf = gacc[b].reshape(L * L, KB)
        tf = tmp.reshape(L * L, KB)
        for j in range(n_valid):
            fl = f[j, b]
            use = False
            for t in range(KB):
                if fl[t] != 0.0:
                    use = True
            if not use:
                continue
            cf = C[j, b].reshape(S * S, KB)
            for q in range(S * S):
                Wq = Wf[q]
                cq = cf[q]
                for t in range(KB):
                    Wq[t] += fl[t] * cq[t]
            _back_correlate(Y[j], C[j, b], tmp)
            for q in range(L * L):
                gq = gf[q]
                tq = tf[q]
                for t in range(KB):
                    gq[t] += fl[t] * tq[t]


# --------------------------------------------------------------------------- sparse

@pjit
def sparse_scores(Y, PU, EU, lanes, t_patch, t_start, t_len, t_off, c2, inv2s2, buf, bmax, lsum):
    """The tasks of a sparse pass: patch ``t_patch[i]`` against its lanes ``t_start[i] : + t_len[i]``.

    Parameters
    ----------
    Y : (n, L, L)
    PU : (U, L, L); EU : (U, S, S)
        Projections and energies of the rotations the chunk needs (its *union*).
    lanes : (n_pairs,) int64
        For each (patch, rotation) pair, in patch order, its rotation's row in ``PU``.
    t_patch, t_start, t_len : (T,) int64
        Task ``i`` takes pairs ``t_start[i] .. t_start[i] + t_len[i] - 1`` of patch ``t_patch[i]``.
    t_off : (T,) int64
        Where in ``buf`` the task's ``(S, S, t_len)`` block of exponentials goes (or -1:
        not kept, scratch only).
    buf : (N,) dtype
    bmax : (T,) float64
    lsum : (n_pairs,) float64
        Per pair sum of ``exp(score - bmax)`` over the shifts.
    """
    L = Y.shape[1]
    S = 2 * L - 1
    for i in prange(t_patch.shape[0]):
        j = t_patch[i]
        p0 = t_start[i]
        nb = t_len[i]
        Pg = np.empty((L, L, nb), PU.dtype)
        Eg = np.empty((S, S, nb), EU.dtype)
        for t in range(nb):
            u = lanes[p0 + t]
            for a1 in range(L):
                for a2 in range(L):
                    Pg[a1, a2, t] = PU[u, a1, a2]
            for i1 in range(S):
                for i2 in range(S):
                    Eg[i1, i2, t] = EU[u, i1, i2]
        if t_off[i] >= 0:
            blk = buf[t_off[i]:t_off[i] + S * S * nb].reshape(S, S, nb)
        else:
            blk = np.empty((S, S, nb), EU.dtype)
        _correlate(Y[j], Pg, blk)
        mx = np.empty(nb, EU.dtype)
        bits = _bits_scratch(nb, EU[0, 0, 0])
        bmax[i] = _score_block(blk.reshape(S * S, nb), Eg.reshape(S * S, nb), c2, inv2s2, mx, bits,
                               lsum[p0:p0 + nb])


@pjit
def sparse_back(Y, t_patch, t_start, t_len, t_off, fp, buf, gbuf):
    """Per task, ``back_correlate`` of its patch with its block of exponentials into ``gbuf``.

    gbuf : (n_pairs, L, L) of buf's dtype, pair-major (the accumulation gathers per
    rotation). Tasks whose pairs all have factor ``fp == 0`` (or no block kept) are skipped.
    """
    L = Y.shape[1]
    S = 2 * L - 1
    for i in prange(t_patch.shape[0]):
        nb = t_len[i]
        use = False
        for t in range(nb):
            if fp[t_start[i] + t] != 0.0:
                use = True
        if t_off[i] < 0 or not use:
            continue
        blk = buf[t_off[i]:t_off[i] + S * S * nb].reshape(S, S, nb)
        tmp = np.empty((L, L, nb), buf.dtype)
        _back_correlate(Y[t_patch[i]], blk, tmp)
        p0 = t_start[i]
        for t in range(nb):
            for q1 in range(L):
                for q2 in range(L):
                    gbuf[p0 + t, q1, q2] = tmp[q1, q2, t]


@pjit
def sparse_accumulate(r_ptr, r_pairs, r_rows, pair_task, pair_lane, t_off, t_len, fp, buf, gbuf, W, g):
    """Rows of the statistics: ``W[row] += f w``, ``g[row] += f gbuf`` over the row's pairs in patch order.

    r_ptr : (R + 1,); r_pairs : (n_pairs,) the pairs of each rotation ``r`` at
    ``r_pairs[r_ptr[r]:r_ptr[r+1]]`` (patch order); r_rows : (R,) the row of the
    statistics each rotation adds into (-1: none of its pairs counts); pair_task,
    pair_lane : (n_pairs,) the task of a pair and its lane in the task's block; fp :
    (n_pairs,) the posterior scale of each pair (0: not counted).
    W : (rows, S, S) and g : (rows, L, L) float64. Parallel over rotations (each row
    is written by one rotation only).
    """
    S = W.shape[1]
    L = g.shape[1]
    for r in prange(r_rows.shape[0]):
        row = r_rows[r]
        if row < 0:
            continue
        Wr = W[row]
        gr = g[row]
        for k in range(r_ptr[r], r_ptr[r + 1]):
            p = r_pairs[k]
            i = pair_task[p]
            s = fp[p]
            if s == 0.0:
                continue
            nb = t_len[i]
            lane = pair_lane[p]
            blk = buf[t_off[i]:t_off[i] + S * S * nb].reshape(S, S, nb)
            for i1 in range(S):
                for i2 in range(S):
                    Wr[i1, i2] += s * blk[i1, i2, lane]
            gp = gbuf[p]
            for q1 in range(L):
                for q2 in range(L):
                    gr[q1, q2] += s * gp[q1, q2]


# --------------------------------------------------------------------------- energies

@jit
def _box_energy(p, out):
    """``out[s + L-1] = sum of p[a]^2 over a, a + s in the box`` (one projection), by prefix sums."""
    L = p.shape[0]
    cs = np.zeros((L + 1, L + 1))
    for a1 in range(L):
        for a2 in range(L):
            cs[a1 + 1, a2 + 1] = cs[a1, a2 + 1] + cs[a1 + 1, a2] - cs[a1, a2] + p[a1, a2] * p[a1, a2]
    for i1 in range(2 * L - 1):
        s1 = i1 - (L - 1)
        lo1 = max(0, -s1)
        hi1 = min(L, L - s1)
        for i2 in range(2 * L - 1):
            s2 = i2 - (L - 1)
            lo2 = max(0, -s2)
            hi2 = min(L, L - s2)
            out[i1, i2] = cs[hi1, hi2] - cs[lo1, hi2] - cs[hi1, lo2] + cs[lo1, lo2]


@pjit
def box_energies(proj, out):
    """``e_k[s]`` (theory section 5, linear shift layout) for a stack of projections.

    proj : (K, L, L) float64; out : (K, S, S), any float dtype (computed in float64).
    """
    for k in prange(proj.shape[0]):
        tmp = np.empty(out.shape[1:])
        _box_energy(proj[k], tmp)
        for i1 in range(tmp.shape[0]):
            for i2 in range(tmp.shape[1]):
                out[k, i1, i2] = tmp[i1, i2]
