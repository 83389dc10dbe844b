"""pyFFTW plans, built once per shape and reused.

Every FFT on a hot path goes through :func:`workspace`: a pair of aligned buffers
(a real array of shape ``(*batch, n0, n1)`` and its half-spectrum of shape
``(*batch, n0, n1 // 2 + 1)``) with a forward (real -> complex) and a backward
(complex -> real, normalised by ``1 / (n0 n1)`` as ``numpy.fft.irfft2``) plan between
them.

Thread safety. A workspace's buffers are scratch memory, so two threads must never
share one: the cache is keyed by the calling thread as well as by shape, thread count,
dtype and planner effort. Two E-steps running at once in one process (a Dask worker
with several threads, a user's thread pool) therefore each get their own buffers.

Memory. The cache holds at most :func:`cache_limit` bytes of buffers (default 256 MiB;
the EM sets it from its memory plan, ``numbaem.em.run``); the least recently used
workspaces are dropped first. A workspace larger than the limit is still returned, but
evicts everything else.

Plans use ``FFTW_ESTIMATE`` by default: FFTW then picks the same algorithm every time,
so a run gives the same bits when repeated or resumed (``FFTW_MEASURE`` may pick a
different algorithm each process, which changes round-off). Set
``NUMBAEM_FFTW_EFFORT=FFTW_MEASURE`` to trade that for speed.

pyFFTW is imported on first use, not when numbaem is imported. Its wheel carries its own
OpenMP runtime, which reads ``OMP_WAIT_POLICY`` once, when it is loaded: just before
that import, :func:`numbaem.runtime.threads.prefer_passive_openmp` sets the policy to
``PASSIVE`` unless the user chose one (spinning FFTW threads halve the E-step's speed on
few cores; see ``numbaem.runtime.threads``). That is the one process-wide setting
numbaem makes, and it is made only when an FFT is first planned.
"""
import collections
import logging
import os
import threading

import numpy as np

from .threads import fft_threads, prefer_passive_openmp

logger = logging.getLogger(__name__)

_CACHE = collections.OrderedDict()   # key -> Workspace, least recently used first
_LOCK = threading.Lock()
_LIMIT = [256 << 20]
_pyfftw = None


def _fftw():
    """The pyfftw module, imported on first use (after setting the OpenMP wait policy)."""
    global _pyfftw
    if _pyfftw is None:
        prefer_passive_openmp()
        import pyfftw
        _pyfftw = pyfftw
    return _pyfftw


class Workspace:
    """Aligned buffers and the two plans between them.

    Attributes
    ----------
    real : ndarray, float64 (or float32), shape (*batch, n0, n1)
    spec : ndarray, complex128 (or complex64), shape (*batch, n0, n1 // 2 + 1)
    """

    def __init__(self, shape, threads, effort, dtype="float64"):
        pyfftw = _fftw()
        shape = tuple(int(s) for s in shape)
        spec_shape = shape[:-1] + (shape[-1] // 2 + 1,)
        cdtype = "complex64" if np.dtype(dtype) == np.float32 else "complex128"
        self.real = pyfftw.empty_aligned(shape, dtype=dtype)
        self.spec = pyfftw.empty_aligned(spec_shape, dtype=cdtype)
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


def workspace(shape, threads=None, dtype="float64"):
    """This thread's cached :class:`Workspace` for a real shape ``(*batch, n0, n1)``.

    The same object is returned to the same thread for the same shape, thread count and
    dtype, so its buffers are reused: copy results out before asking for the same shape
    again. Batches of fewer than :data:`SMALL_BATCH` transforms are planned
    single-threaded.
    """
    threads = fft_threads() if threads is None else int(threads)
    if int(np.prod(shape[:-2], dtype=np.int64)) < SMALL_BATCH:
        threads = 1
    key = (threading.get_ident(), tuple(int(s) for s in shape), threads, np.dtype(dtype).name, planner_effort())
    with _LOCK:
        ws = _CACHE.get(key)
        if ws is not None:
            _CACHE.move_to_end(key)
            return ws
    ws = Workspace(key[1], threads, key[4], dtype)
    logger.debug("new FFTW plans for shape %s, %s, %d threads", key[1], key[3], threads)
    with _LOCK:
        _CACHE[key] = ws
        _evict(_LIMIT[0])
    return ws


def _evict(limit):
    """Drop least recently used workspaces until the cache holds at most ``limit`` bytes
    (the newest one always stays: it is about to be used)."""
    total = sum(w.nbytes for w in _CACHE.values())
    while total > limit and len(_CACHE) > 1:
        _, old = _CACHE.popitem(last=False)
        total -= old.nbytes


def cache_bytes():
    """Bytes of buffers held by the cache now."""
    with _LOCK:
        return sum(w.nbytes for w in _CACHE.values())


def cache_limit():
    """The cache's bound in bytes."""
    return _LIMIT[0]


def set_cache_limit(nbytes):
    """Bound the cache to ``nbytes`` of buffers (evicting now if it holds more); returns the old bound."""
    old = _LIMIT[0]
    _LIMIT[0] = max(0, int(nbytes))
    with _LOCK:
        _evict(_LIMIT[0])
    return old


def release(shape, dtype="float64"):
    """Drop this thread's workspaces of a real shape (any thread count): their memory is freed
    once no caller holds them. The E-step releases its chunk workspace when its stream of
    chunks ends, so the M-step does not run beside it."""
    shape = tuple(int(s) for s in shape)
    name = np.dtype(dtype).name
    me = threading.get_ident()
    with _LOCK:
        for key in [k for k in _CACHE if k[0] == me and k[1] == shape and k[3] == name]:
            del _CACHE[key]


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
