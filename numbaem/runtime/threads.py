"""Thread control: one number sets numba, pyFFTW and BLAS together.

Priority: an explicit ``threads`` argument (the ``--threads`` option), then the
``NUMBAEM_THREADS`` environment variable, then ``NUMBA_NUM_THREADS``, then
``OMP_NUM_THREADS``, then every core numba was started with. numba kernels, FFTW
transforms and the M-step's BLAS calls (GEMM, Cholesky) never run at the same time in
one E-step or M-step, so ``T`` threads for each means at most ``T`` busy threads: no
oversubscription.

Scope. numba's thread count and the FFT thread count set by :func:`use_threads` belong
to the calling thread (two threads of one process may use different counts). The BLAS
bound (through ``threadpoolctl``, the well-kept library for this) is process-wide,
because BLAS libraries have one global setting; it is restored when the outermost
:func:`use_threads` block ends.

Idle OpenMP threads must sleep, not spin: numba's kernels and FFTW's transforms take
turns many times a second, and a pool that spins after its turn steals the cores the
other one needs (measured: 2.2 us per (patch, rotation) with spinning, 0.88 with
``OMP_WAIT_POLICY=PASSIVE`` at L=7, K=300 on 2 cores). :func:`prefer_passive_openmp`
sets that variable when the user has not. An OpenMP runtime reads it when it is
loaded, so it is called where each runtime is first loaded, never at ``import numbaem``:
``numbaem.runtime.fft`` calls it just before its (lazy) ``import pyfftw``, whose wheel
brings its own runtime, and :func:`use_threads` and :func:`numbaem.em.run.reconstruct`
call it before numba's runtime loads at the first parallel kernel. It is the only
process-wide setting numbaem makes, and it leaves a policy the user set alone.
"""
import contextlib
import logging
import os
import threading

import numba

from .errors import NumbaemError

logger = logging.getLogger(__name__)

_local = threading.local()      # per thread: fft (the FFT thread count set by use_threads)
_blas_lock = threading.Lock()
_blas_depth = [0]
_blas_limiter = [None]


def prefer_passive_openmp():
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy (see module doc)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def resolve_threads(threads=None):
    """Number of threads to use, from the argument or the environment (see module doc)."""
    if threads is None:
        for var in ("NUMBAEM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
            val = os.environ.get(var)
            if val:
                try:
                    threads = int(val)
                except ValueError:
                    raise NumbaemError(
                        f"environment variable {var}={val!r} is not a whole number; "
                        "set it to a positive number of threads") from None
                break
    if threads is None:
        return numba.config.NUMBA_NUM_THREADS
    threads = int(threads)
    if threads < 1:
        raise NumbaemError(f"threads={threads} is not positive; ask for 1 or more threads")
    return min(threads, numba.config.NUMBA_NUM_THREADS)


def fft_threads():
    """Threads that pyFFTW plans are made with in this thread (follows :func:`use_threads`)."""
    n = getattr(_local, "fft", None)
    return resolve_threads() if n is None else n


def _enter_blas(n):
    """Bound the BLAS libraries to ``n`` threads (process-wide; outermost block decides)."""
    with _blas_lock:
        _blas_depth[0] += 1
        if _blas_depth[0] == 1:
            from threadpoolctl import threadpool_limits
            _blas_limiter[0] = threadpool_limits(limits=n, user_api="blas")


def _exit_blas():
    with _blas_lock:
        _blas_depth[0] -= 1
        if _blas_depth[0] == 0 and _blas_limiter[0] is not None:
            _blas_limiter[0].restore_original_limits()
            _blas_limiter[0] = None


def blas_threads():
    """Threads the BLAS libraries now use (the largest over the loaded libraries; 1 if none)."""
    from threadpoolctl import threadpool_info
    counts = [int(i.get("num_threads", 1)) for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else 1


def parallel_kernels_are_thread_safe():
    """Whether numba's parallel kernels may run from several threads at once.

    The ``omp`` and ``tbb`` threading layers allow it; ``workqueue`` (numba's fallback
    when neither library loads) does not, and aborts the process. Call after a parallel
    kernel has run (numba picks its layer then).
    """
    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # no parallel kernel has run yet: the layer is not chosen
        return numba.config.THREADING_LAYER in ("omp", "tbb")


_kernel_lock = threading.Lock()


@contextlib.contextmanager
def kernel_guard():
    """Serialise parallel kernels across threads only where the threading layer needs it."""
    if parallel_kernels_are_thread_safe():
        yield
    else:
        with _kernel_lock:
            yield


@contextlib.contextmanager
def use_threads(threads=None):
    """Set numba's, pyFFTW's and BLAS's thread count for the block, and restore them afterwards.

    Parameters
    ----------
    threads : int or None
        ``None`` reads the environment (see module doc).
    """
    prefer_passive_openmp()   # before numba's OpenMP runtime loads at the first parallel kernel
    n = resolve_threads(threads)
    old_numba, old_fft = numba.get_num_threads(), getattr(_local, "fft", None)
    numba.set_num_threads(n)
    _local.fft = n
    _enter_blas(n)
    logger.debug("using %d threads for numba, FFTW and BLAS", n)
    try:
        yield n
    finally:
        _exit_blas()
        numba.set_num_threads(old_numba)
        _local.fft = old_fft
