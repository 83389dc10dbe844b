"""Thread control: one number sets numba and pyFFTW together.

Priority: an explicit ``threads`` argument (the ``--threads`` option), then the
``NUMBAEM_THREADS`` environment variable, then ``NUMBA_NUM_THREADS``, then
``OMP_NUM_THREADS``, then every core numba was started with. numba kernels and FFTW
transforms never run at the same time in this package, so ``T`` threads for each means
at most ``T`` busy threads: no oversubscription.
"""
import contextlib
import logging
import os

import numba

from .errors import NumbaemError

logger = logging.getLogger(__name__)

_fft_threads = None


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
