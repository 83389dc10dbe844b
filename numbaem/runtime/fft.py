"""pyFFTW plans, built once per shape and reused.

Every FFT on a hot path goes through :func:`workspace`: a pair of aligned buffers
(a real array of shape ``(*batch, n0, n1)`` and its half-spectrum of shape
``(*batch, n0, n1 // 2 + 1)``) with a forward (real -> complex) and a backward
(complex -> real, normalised by ``1 / (n0 n1)`` as ``numpy.fft.irfft2``) plan between
them. Plans are cached by shape, thread count and planner effort.

Plans use ``FFTW_ESTIMATE`` by default: FFTW then picks the same algorithm every time,
so a run gives the same bits when repeated or resumed (``FFTW_MEASURE`` may pick a
different algorithm each process, which changes round-off). Set
``NUMBAEM_FFTW_EFFORT=FFTW_MEASURE`` to trade that for speed.
"""
import logging
import os
import threading

import numpy as np

from .threads import fft_threads, prefer_passive_openmp

# pyFFTW's wheel carries its own OpenMP runtime, which reads OMP_WAIT_POLICY once, when
# it is loaded by ``import pyfftw``: the one import-time action of the package, taken
# because spinning FFTW threads halve the E-step's speed on few cores (numbaem.runtime.threads).
prefer_passive_openmp()
import pyfftw  # noqa: E402

logger = logging.getLogger(__name__)

_CACHE = {}
_LOCK = threading.Lock()
_MAX_CACHED = 32


class Workspace:
    """Aligned buffers and the two plans between them.

    Attributes
    ----------
    real : ndarray, float64, shape (*batch, n0, n1)
    spec : ndarray, complex128, shape (*batch, n0, n1 // 2 + 1)
    """

    def __init__(self, shape, threads, effort):
        shape = tuple(int(s) for s in shape)
        spec_shape = shape[:-1] + (shape[-1] // 2 + 1,)
        self.real = pyfftw.empty_aligned(shape, dtype="float64")
        self.spec = pyfftw.empty_aligned(spec_shape, dtype="complex128")
        axes = (len(shape) - 2, len(shape) - 1)
        self._fwd = pyfftw.FFTW(self.real, self.spec, axes=axes, direction="FFTW_FORWARD",
                                flags=(effort,), threads=threads)
        self._bwd = pyfftw.FFTW(self.spec, self.real, axes=axes, direction="FFTW_BACKWARD",
                                flags=(effort, "FFTW_DESTROY_INPUT"), threads=threads)
        self.threads = threads

    def forward(self):
        """``spec = rfft2(real)`` in place of the buffers."""
        self._fwd.execute()
        return self.spec

    def backward(self, normalise=True):
        """``real = irfft2(spec)`` (``spec`` is destroyed).

        With ``normalise=False`` the result is ``n0 n1`` times larger (FFTW's raw
        transform): a caller that folds the factor into its own arithmetic saves a pass.
        """
        self._bwd.execute()
        if normalise:
            self.real *= 1.0 / (self.real.shape[-1] * self.real.shape[-2])
        return self.real

    @property
    def nbytes(self):
        return self.real.nbytes + self.spec.nbytes


def planner_effort():
    effort = os.environ.get("NUMBAEM_FFTW_EFFORT", "FFTW_ESTIMATE")
    if effort not in ("FFTW_ESTIMATE", "FFTW_MEASURE", "FFTW_PATIENT", "FFTW_EXHAUSTIVE"):
        effort = "FFTW_ESTIMATE"
    return effort


# Below this many transforms in a batch, FFTW's threads cost more than they save
# (a 14 x 14 batch of 100 took 0.30 s with 2 threads and 0.03 s with 1 in the bench).
SMALL_BATCH = 256


def workspace(shape, threads=None):
    """The cached :class:`Workspace` for a real shape ``(*batch, n0, n1)``.

    The same object is returned for the same shape and thread count, so its buffers
    are reused: copy results out before asking for the same shape again. Batches of
    fewer than :data:`SMALL_BATCH` transforms are planned single-threaded.
    """
    threads = fft_threads() if threads is None else int(threads)
    if int(np.prod(shape[:-2], dtype=np.int64)) < SMALL_BATCH:
        threads = 1
    key = (tuple(int(s) for s in shape), threads, planner_effort())
    with _LOCK:
        ws = _CACHE.get(key)
        if ws is None:
            if len(_CACHE) >= _MAX_CACHED:
                _CACHE.pop(next(iter(_CACHE)))
            ws = Workspace(key[0], threads, key[2])
            logger.debug("new FFTW plans for shape %s, %d threads", key[0], threads)
            _CACHE[key] = ws
    return ws


def clear_cache():
    """Drop every cached plan and buffer (frees their memory)."""
    with _LOCK:
        _CACHE.clear()


def rfft2(x):
    """``numpy.fft.rfft2`` over the last two axes through a cached plan (returns a copy)."""
    x = np.asarray(x, dtype=np.float64)
    ws = workspace(x.shape)
    ws.real[...] = x
    return ws.forward().copy()


def irfft2(X, n1):
    """``numpy.fft.irfft2`` over the last two axes (last real length ``n1``), cached plan."""
    X = np.asarray(X, dtype=np.complex128)
    ws = workspace(X.shape[:-1] + (n1,))
    ws.spec[...] = X
    return ws.backward().copy()
