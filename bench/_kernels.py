"""Each E-step kernel against this machine's peak for what bounds it.

The E-step of :func:`numbaem.em.estep.e_step_chunk` is a few passes over two work
arrays of one chunk of ``n`` patches and ``K`` rotations:

- ``C``, real, ``n K (2L)^2`` float64 (``B_C`` bytes): correlations, then scores, then
  unnormalised posteriors, in place;
- ``Q``, complex, ``n K 2L (L + 1)`` complex128 (``B_Q`` bytes): products of spectra,
  then the forward transform of ``C``.

What bounds each step, and the peak measured here, in the same run:

============== ===================================================== =========================
step           lower bound of its time                                peak measured
============== ===================================================== =========================
products       write ``Q``: ``B_Q`` bytes                             read+write bandwidth
fft_backward   ``n K`` complex-to-real ``2L x 2L`` transforms         pyFFTW c2r rate
posteriors     read+write ``C`` twice (scores, exponentials; a       read+write bandwidth,
               skipped block is only written) and one exponential    the package's own exp
               per state of the blocks not skipped                   (``_exp_neg``) per second
fft_forward    ``n K`` real-to-complex transforms                     pyFFTW r2c rate
accumulate     read ``C`` and ``Q``: ``B_C + B_Q`` bytes              read+write bandwidth
============== ===================================================== =========================

A step's ``distance`` is its measured seconds over that bound (1 = at this machine's
peak; the posteriors' bound is the larger of its bandwidth and exp bounds). The
bandwidth is measured with an in-place pass ``a[i] = s a[i]`` over an array of the
chunk's ``B_C`` bytes (so it is the bandwidth of the cache level the chunk lives in),
and over a large array (main memory); the higher is the peak. The FFT rates are those
of the ``peak`` suite's measurement (:func:`fft_rates`) at the E-step's own
batch (``n_chunk K`` transforms) and at a large batch, with the planner efforts
``FFTW_ESTIMATE`` (the library's) and ``FFTW_MEASURE``; the best is the peak.
"""
import math
import time

import numpy as np
from numba import prange

import pyfftw

from numbaem.em.estep import SufficientStats, _exp_neg, e_step_chunk
from numbaem.runtime.jit import pjit

_BLOCK = 1 << 14


@pjit
def _exp_pass(x, out, reps):
    """``out = exp(x)`` with the E-step's exponential, ``reps`` times, parallel over blocks."""
    n = x.size
    nb = (n + 16383) // 16384
    for b in prange(nb):
        lo = b * 16384
        hi = min(n, lo + 16384)
        for _ in range(reps):
            for i in range(lo, hi):
                d = x[i]
                out[i] = _exp_neg(max(d, -50.0)) if d > -50.0 else 0.0


@pjit
def _rw_pass(a, s):
    """``a[i] = s a[i]``: one read and one write of every element, parallel over blocks."""
    n = a.size
    nb = (n + 16383) // 16384
    for b in prange(nb):
        lo = b * 16384
        hi = min(n, lo + 16384)
        for i in range(lo, hi):
            a[i] = s * a[i]


def _best_rate(fn, units, min_time, max_reps=200):
    fn()
    best, spent, reps = math.inf, 0.0, 0
    while (spent < min_time or reps < 3) and reps < max_reps:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return units / best


def fft_rates(n2, batch, threads, effort, min_time=0.3):
    """r2c and c2r rates (transforms/s) for a batch of ``n2 x n2`` real transforms through pyFFTW.

    Best of repeated executes lasting about ``min_time`` seconds, after planning and one
    warm execute; ``plan_seconds`` the planning time, ``bytes`` the buffers'.
    """
    real = pyfftw.empty_aligned((batch, n2, n2), dtype="float64")
    spec = pyfftw.empty_aligned((batch, n2, n2 // 2 + 1), dtype="complex128")
    real[:] = np.random.default_rng(0).standard_normal(real.shape)
    t0 = time.perf_counter()
    fwd = pyfftw.FFTW(real, spec, axes=(1, 2), direction="FFTW_FORWARD", flags=(effort,), threads=threads)
    bwd = pyfftw.FFTW(spec, real, axes=(1, 2), direction="FFTW_BACKWARD", flags=(effort, "FFTW_DESTROY_INPUT"),
                      threads=threads)
    plan_s = time.perf_counter() - t0
    fwd.execute()
    r2c = _best_rate(fwd.execute, batch, min_time)
    c2r = _best_rate(bwd.execute, batch, min_time)
    return dict(n=n2, batch=batch, threads=threads, effort=effort, r2c_per_s=r2c, c2r_per_s=c2r,
                plan_seconds=plan_s, bytes=real.nbytes + spec.nbytes)


def exp_rate(n=1 << 18, reps=8, min_time=0.2):
    """Exponentials per second of the E-step's ``_exp_neg`` over arguments in [-50, 0] (cache-resident)."""
    x = np.random.default_rng(0).uniform(-50.0, 0.0, n)
    out = np.empty(n)
    return _best_rate(lambda: _exp_pass(x, out, reps), n * reps, min_time)


def bandwidth(nbytes, min_time=0.2):
    """Read+write bytes per second of an in-place pass over ``nbytes`` bytes of float64."""
    a = np.ones(max(1, int(nbytes) // 8))
    return _best_rate(lambda: _rw_pass(a, 1.0), 2 * a.nbytes, min_time)


def kernel_peaks(L, K, n_chunk, threads, quick=False):
    """This machine's peaks for the E-step's kernels at ``(L, K, n_chunk)`` (see the module doc).

    Returns
    -------
    dict with ``fft`` (rows of :func:`fft_rates`), ``c2r_per_s`` and
    ``r2c_per_s`` (best rows), ``exp_per_s``, ``bandwidth_chunk`` and
    ``bandwidth_large`` (bytes/s), ``bandwidth`` (the higher), ``chunk_bytes_C``.
    """
    t = 0.05 if quick else 0.3
    n2 = 2 * L
    batch = n_chunk * K
    rows = [fft_rates(n2, batch, threads, "FFTW_ESTIMATE", min_time=t)]
    if not quick:
        rows.append(fft_rates(n2, batch, threads, "FFTW_MEASURE", min_time=t))
        big = max(batch, 16384)
        if big != batch:
            rows.append(fft_rates(n2, big, threads, "FFTW_ESTIMATE", min_time=t))
    b_c = n_chunk * K * n2 * n2 * 8
    bw_chunk = bandwidth(b_c, min_time=t)
    bw_large = bandwidth((16 if quick else 512) << 20, min_time=t)
    c2r = max(rows, key=lambda r: r["c2r_per_s"])
    r2c = max(rows, key=lambda r: r["r2c_per_s"])
    return dict(fft=rows, c2r_per_s=c2r["c2r_per_s"], c2r_at=dict(batch=c2r["batch"], effort=c2r["effort"]),
                r2c_per_s=r2c["r2c_per_s"], r2c_at=dict(batch=r2c["batch"], effort=r2c["effort"]),
                exp_per_s=exp_rate(n=1 << (14 if quick else 18), min_time=t), bandwidth_chunk=bw_chunk,
                bandwidth_large=bw_large, bandwidth=max(bw_chunk, bw_large), chunk_bytes_C=b_c,
                large_bytes=(16 if quick else 512) << 20, threads=threads)


def block_counts(source, idx, spectra, upsilon, sigma2, n_chunk, mass=0.999):
    """How much of the posterior the E-step evaluates, on the patches ``idx``.

    A (patch, rotation) block whose best score is more than 50 below the patch's best
    state is skipped by the E-step (posterior 0, no exponential). Runs the library's
    ``e_step_chunk`` with ``keep_posteriors`` chunk by chunk and counts those blocks.

    Returns
    -------
    dict with ``patches``, ``blocks``, ``evaluated_fraction`` (blocks whose
    exponentials were computed), ``rotations_for_mass`` (per-patch number of rotations
    holding ``mass`` of the non-empty posterior mass: ``median``, ``p10``, ``p90``;
    patches with non-empty mass below 1e-12 left out) and ``mass``.
    """
    K = spectra.K
    evaluated = 0
    need = []
    buf = np.empty((n_chunk, source.L, source.L))
    for i in range(0, len(idx), n_chunk):
        sel = idx[i:i + n_chunk]
        stats = SufficientStats.zeros(K, source.L)
        _, post, w_empty = e_step_chunk(source.get(sel, out=buf[:len(sel)]), spectra, upsilon, sigma2, stats,
                                        n_chunk=n_chunk, keep_posteriors=True)
        per_rot = post.reshape(len(sel), K, -1)
        evaluated += int(np.count_nonzero(per_rot.any(axis=2)))
        m = per_rot.sum(axis=2)
        tot = m.sum(axis=1)
        for row, t in zip(m, tot):
            if t > 1e-12:
                c = np.cumsum(np.sort(row)[::-1])
                need.append(int(np.searchsorted(c, mass * t) + 1))
        del post, per_rot
    blocks = len(idx) * K
    out = dict(patches=int(len(idx)), K=int(K), blocks=int(blocks), evaluated_blocks=evaluated,
               evaluated_fraction=evaluated / blocks if blocks else None, mass=mass)
    if need:
        out["rotations_for_mass"] = dict(median=float(np.median(need)), p10=float(np.percentile(need, 10)),
                                         p90=float(np.percentile(need, 90)), patches=len(need))
    return out


def kernel_report(profile, peaks, n, K, L, evaluated_fraction=1.0):
    """Share of each E-step step and its distance from the peak (module doc).

    Parameters
    ----------
    profile : dict
        :func:`bench._profile.profile_estep` of ``n`` patches.
    peaks : dict
        :func:`kernel_peaks`.
    evaluated_fraction : float
        Fraction of (patch, rotation) blocks whose exponentials the E-step computes
        (:func:`block_counts`).

    Returns
    -------
    dict with ``steps`` (per step: ``seconds``, ``share``, and where a bound is
    defined ``bound_seconds``, ``bound_by``, ``distance``, ``achieved``),
    ``bound_total`` (the sum of the bounds), ``fraction_of_peak`` (``bound_total`` over
    the E-step's total), ``bytes_C``, ``bytes_Q``, ``exponentials``.
    """
    if not profile.get("available"):
        return dict(available=False, reason=profile.get("reason"))
    n2 = 2 * L
    pairs = n * K
    b_c = pairs * n2 * n2 * 8
    b_q = pairs * n2 * (L + 1) * 16
    f = float(evaluated_fraction)
    exps = pairs * f * n2 * n2
    bw = peaks["bandwidth"]
    bounds = {
        "products": (b_q / bw, "bandwidth", dict(bytes=b_q, bytes_per_s=None)),
        "fft_backward": (pairs / peaks["c2r_per_s"], "fft_c2r", dict(transforms=pairs, transforms_per_s=None)),
        "fft_forward": (pairs / peaks["r2c_per_s"], "fft_r2c", dict(transforms=pairs, transforms_per_s=None)),
        "accumulate": ((b_c + b_q) / bw, "bandwidth", dict(bytes=b_c + b_q, bytes_per_s=None)),
    }
    post_bytes = 2 * b_c + (2 * f + (1 - f)) * b_c
    t_bw, t_exp = post_bytes / bw, exps / peaks["exp_per_s"]
    bounds["posteriors"] = (max(t_bw, t_exp), "exp" if t_exp >= t_bw else "bandwidth",
                            dict(bytes=post_bytes, exponentials=exps, bandwidth_bound_seconds=t_bw,
                                 exp_bound_seconds=t_exp, bytes_per_s=None, exponentials_per_s=None))
    total = profile["total"]
    steps = {}
    bound_total = 0.0
    for name, sec in profile["seconds"].items():
        row = dict(seconds=sec, share=sec / total)
        if name in bounds:
            b, by, extra = bounds[name]
            row.update(bound_seconds=b, bound_by=by, distance=sec / b if b > 0 else None)
            for k in list(extra):
                if k.endswith("_per_s"):
                    unit = k[:-len("_per_s")]
                    extra[k] = extra[unit] / sec if sec > 0 else None
            row["achieved"] = extra
            bound_total += b
        steps[name] = row
    return dict(available=True, steps=steps, total=total, bound_total=bound_total,
                fraction_of_peak=bound_total / total if total > 0 else None, bytes_C=b_c, bytes_Q=b_q,
                exponentials=exps, evaluated_fraction=f, patches=n, K=K, L=L)
