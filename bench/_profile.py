"""The E-step taken apart: each kernel of :func:`numbaem.estep.e_step_chunk` timed on its own.

:func:`profiled_stream_stats` runs the same steps as ``stream_stats`` /
``e_step_chunk`` (MODEL section 5, the sufficient statistics of section 6), in the
same order and on the same buffers, with a clock around each:

- ``read_patches``      ``source.get`` (the patch copy out of the micrographs)
- ``patch_spectra``     ``FFT2(Z y_j)`` for the chunk (small, numpy + one FFTW call)
- ``products``          ``_products``: ``FFT2(Z y_j) conj(FFT2(Z p_k))`` for every pair
- ``fft_backward``      the batched c2r transform of the chunk (FFTW execute only)
- ``fft_scale``         the ``1 / (2L)^2`` normalisation of that transform (a numpy pass)
- ``posteriors``        ``_posteriors``: scores, log-sum-exp, normalisation
- ``accumulate_W``      ``_accumulate_W``
- ``fft_forward``       the batched r2c transform of the posteriors
- ``accumulate_G``      ``_accumulate_G``
- ``rest``              per-chunk bookkeeping (log-likelihood, sums)

It reaches into private kernels, so it checks its statistics against the library's own
``stream_stats`` (the relative difference is recorded) and reports itself unavailable,
with the reason, when the library's internals have changed shape.
"""
import math
import time

import numpy as np

from ._common import Phases

STEP_ORDER = ("read_patches", "patch_spectra", "products", "fft_backward", "fft_scale", "posteriors",
              "accumulate_W", "fft_forward", "accumulate_G", "rest")


def profiled_stream_stats(source, idx, spectra, upsilon, sigma2, n_chunk):
    """``stream_stats`` with a clock around every kernel.

    Returns
    -------
    stats : numbaem.estep.SufficientStats
    phases : Phases
        Seconds per step (keys of :data:`STEP_ORDER`).
    """
    from numbaem import fft
    from numbaem.estep import (SufficientStats, _accumulate_G, _accumulate_W, _posteriors, _products,
                               patch_spectra)

    L, K = source.L, spectra.K
    stats = SufficientStats.zeros(K, L)
    ph = Phases()
    buf = np.empty((n_chunk, L, L))
    log_shift_prior = math.log1p(-upsilon) - math.log((2 * L - 1) ** 2 * K)
    for i in range(0, len(idx), n_chunk):
        sel = idx[i:i + n_chunk]
        n = len(sel)
        with ph("read_patches"):
            patches = source.get(sel, out=buf[:n])
        with ph("patch_spectra"):
            Yh = np.zeros((n_chunk, 2 * L, L + 1), np.complex128)
            Yh[:n] = patch_spectra(patches)
        ws = fft.workspace((n_chunk, K, 2 * L, 2 * L))
        with ph("products"):
            _products(Yh, spectra.Pc, n, ws.spec)
        bwd = getattr(ws, "_bwd", None)
        if bwd is not None:
            with ph("fft_backward"):
                bwd.execute()
            with ph("fft_scale"):
                ws.real *= 1.0 / (4 * L * L)
            C = ws.real
        else:  # internals changed: time the public call as one step
            with ph("fft_backward"):
                C = ws.backward()
        with ph("posteriors"):
            w_empty = np.zeros(n_chunk)
            lse = np.zeros(n_chunk)
            _posteriors(C, spectra.e, n, L, log_shift_prior, math.log(upsilon), 1.0 / (2.0 * sigma2),
                        w_empty, lse)
        with ph("accumulate_W"):
            _accumulate_W(C, n, stats.W)
        with ph("fft_forward"):
            Q = ws.forward()
        with ph("accumulate_G"):
            _accumulate_G(Yh, Q, n, stats.G)
        with ph("rest"):
            yy = np.einsum("jab,jab->j", patches, patches)
            loglik = lse[:n] - yy / (2.0 * sigma2) - 0.5 * L * L * math.log(2.0 * math.pi * sigma2)
            stats.n_patches += n
            stats.sum_empty += float(w_empty[:n].sum())
            stats.sum_yy += float(yy.sum())
            stats.loglik += float(loglik.sum())
    return stats, ph


def profile_estep(source, idx, spectra, upsilon, sigma2, n_chunk, reference=None):
    """Run :func:`profiled_stream_stats` and describe the split.

    Parameters
    ----------
    reference : SufficientStats, optional
        The library's ``stream_stats`` result on the same input; the relative
        differences of ``W`` and ``G`` are recorded (they should be round-off).

    Returns
    -------
    dict with ``seconds`` (per step), ``total``, ``fraction`` (per step), ``dominant``,
    ``check`` (relative differences against ``reference``), or ``available: False`` and
    ``reason`` when the library's private kernels could not be called.
    """
    try:
        t0 = time.perf_counter()
        stats, ph = profiled_stream_stats(source, idx, spectra, upsilon, sigma2, n_chunk)
        total = time.perf_counter() - t0
    except (ImportError, TypeError, AttributeError, ValueError) as exc:
        return dict(available=False, reason=f"{type(exc).__name__}: {exc}")
    seconds = {k: ph.seconds.get(k, 0.0) for k in STEP_ORDER if k in ph.seconds}
    out = dict(available=True, seconds=seconds, total=total,
               fraction={k: v / total for k, v in seconds.items()},
               dominant=max(seconds, key=seconds.get),
               fft_seconds=seconds.get("fft_backward", 0.0) + seconds.get("fft_forward", 0.0),
               chunks=ph.calls.get("products", 0))
    if reference is not None:
        out["check"] = dict(
            W_rel_diff=float(np.linalg.norm(stats.W - reference.W) / max(np.linalg.norm(reference.W), 1e-300)),
            G_rel_diff=float(np.linalg.norm(stats.G - reference.G) / max(np.linalg.norm(reference.G), 1e-300)),
            loglik_rel_diff=float(abs(stats.loglik - reference.loglik) / max(abs(reference.loglik), 1e-300)))
    return out
