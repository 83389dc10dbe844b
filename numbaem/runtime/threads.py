"""Thread control: one number sets numba and pyFFTW together.

Priority: an explicit ``threads`` argument (the ``--threads`` option), then the
``NUMBAEM_THREADS`` environment variable, then ``NUMBA_NUM_THREADS``, then
``OMP_NUM_THREADS``, then every core numba was started with. numba kernels and FFTW
transforms never run at the same time in this package, so ``T`` threads for each means
at most ``T`` busy threads: no oversubscription.

Idle OpenMP threads must sleep, not spin: numba's kernels and FFTW's transforms take
turns many times a second, and a pool that spins after its turn steals the cores the
other one needs (measured: 2.2 us per (patch, rotation) with spinning, 0.88 with
``OMP_WAIT_POLICY=PASSIVE`` at L=7, K=300 on 2 cores). :func:`prefer_passive_openmp`
sets that variable when the user has not. An OpenMP runtime reads it when it is
loaded, so ``numbaem.runtime.fft`` calls it just before ``import pyfftw`` (whose wheel brings its
own runtime); numba's runtime loads later, at the first parallel kernel.
"""
import contextlib
import logging
import os

import numba

from .errors import NumbaemError

logger = logging.getLogger(__name__)

_fft_threads = None


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
    """Threads that pyFFTW plans are made with (follows :func:`use_threads`)."""
    if _fft_threads is None:
        return resolve_threads()
    return _fft_threads


@contextlib.contextmanager
def use_threads(threads=None):
    """Set numba's and pyFFTW's thread count for the block, and restore both afterwards.

    Parameters
    ----------
    threads : int or None
        ``None`` reads the environment (see module doc).
    """
    global _fft_threads
    prefer_passive_openmp()
    n = resolve_threads(threads)
    old_numba, old_fft = numba.get_num_threads(), _fft_threads
    numba.set_num_threads(n)
    _fft_threads = n
    logger.debug("using %d threads for numba and FFTW", n)
    try:
        yield n
    finally:
        numba.set_num_threads(old_numba)
        _fft_threads = old_fft
