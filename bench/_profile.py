"""The E-step taken apart: each step of :func:`numbaem.em.estep.e_step_chunk` timed on its own.

``numbaem.em.run.stream_stats`` and ``e_step_chunk`` accept a ``timer(name)`` that wraps
each of their steps in a context manager, so the profile times the library's very code
path, not a copy of it. The step names are the library's (at the time of writing:
``read_patches``, ``patch_spectra``, ``products``, ``fft_backward``, ``posteriors``,
``fft_forward``, ``accumulate``, ``rest``); any step the library adds or renames is
reported under its own name. The profiled run's statistics are compared with a plain
``stream_stats`` run (``check``: they should agree to round-off; the clocks only add
``perf_counter`` calls). If the library has no timer hook the profile says so
(``available: False``) instead of failing the suite.
"""
import time

import numpy as np

from ._common import Phases

# preferred display order; unknown step names follow in the order they were first seen
STEP_ORDER = ("read_patches", "patch_spectra", "products", "fft_backward", "fft_scale", "posteriors",
              "accumulate_W", "fft_forward", "accumulate_G", "accumulate", "rest")
FFT_STEPS = ("fft_backward", "fft_forward")


def ordered_steps(names):
    names = list(names)
    return [k for k in STEP_ORDER if k in names] + [k for k in names if k not in STEP_ORDER]


def profiled_stream_stats(source, idx, spectra, upsilon, sigma2, n_chunk):
    """``stream_stats`` with a clock around every step.

    Returns
    -------
    stats : numbaem.em.estep.SufficientStats
    phases : Phases
        Seconds and calls per step.
    """
    from numbaem.em.estep import stream_stats

    ph = Phases()
    stats = stream_stats(source, idx, spectra, upsilon, sigma2, n_chunk, timer=ph)
    return stats, ph


def profile_estep(source, idx, spectra, upsilon, sigma2, n_chunk, reference=None):
    """Run :func:`profiled_stream_stats` and describe the split.

    Parameters
    ----------
    reference : SufficientStats, optional
        The library's plain ``stream_stats`` result on the same input; the relative
        differences of ``W``, ``G`` and the log-likelihood are recorded.

    Returns
    -------
    dict with ``seconds`` and ``calls`` per step, ``total`` (wall time of the profiled
    run), ``untimed`` (``total`` minus the steps), ``fraction`` (per step, of ``total``),
    ``dominant``, ``fft_seconds``, ``chunks`` and ``check``; or ``available: False`` and
    ``reason`` when the library has no timer hook.
    """
    try:
        t0 = time.perf_counter()
        stats, ph = profiled_stream_stats(source, idx, spectra, upsilon, sigma2, n_chunk)
        total = time.perf_counter() - t0
    except TypeError as exc:
        return dict(available=False, reason=f"numbaem.em.run.stream_stats has no timer hook ({exc})")
    if not ph.seconds:
        return dict(available=False, reason="numbaem.em.run.stream_stats accepted a timer but timed no step")
    steps = ordered_steps(ph.seconds)
    seconds = {k: ph.seconds[k] for k in steps}
    out = dict(available=True, seconds=seconds, calls={k: ph.calls[k] for k in steps}, total=total,
               untimed=total - sum(seconds.values()),
               fraction={k: v / total for k, v in seconds.items()},
               dominant=max(seconds, key=seconds.get),
               fft_seconds=sum(seconds.get(k, 0.0) for k in FFT_STEPS),
               chunks=max(ph.calls.values()))
    if reference is not None:
        out["check"] = dict(
            W_rel_diff=float(np.linalg.norm(stats.W - reference.W) / max(np.linalg.norm(reference.W), 1e-300)),
            G_rel_diff=float(np.linalg.norm(stats.G - reference.G) / max(np.linalg.norm(reference.G), 1e-300)),
            loglik_rel_diff=float(abs(stats.loglik - reference.loglik) / max(abs(reference.loglik), 1e-300)))
    return out
