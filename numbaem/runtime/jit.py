"""The one numba decorator of the package.

Every kernel uses :func:`jit` (serial) or :func:`pjit` (``parallel=True``), so the
compilation flags live in one place:

- ``cache=True`` so that CI and users compile each kernel once per machine;
- ``fastmath`` with ``contract``, ``arcp`` and ``nsz`` only: never ``nnan`` / ``ninf``
  (the E-step's log-sum-exp needs ``-inf``), and never ``reassoc`` so that a kernel
  gives the same bits whatever the number of threads (each parallel kernel splits its
  work into blocks that do not depend on the thread count and reduces them in order).
"""
from numba import njit

FASTMATH = frozenset({"contract", "arcp", "nsz"})


def jit(func=None, **kwargs):
    """Serial ``njit`` with the package's flags."""
    opts = dict(cache=True, fastmath=set(FASTMATH), nogil=True)
    opts.update(kwargs)
    if func is None:
        return lambda f: njit(**opts)(f)
    return njit(**opts)(func)


def pjit(func=None, **kwargs):
    """Parallel ``njit`` (``parallel=True``) with the package's flags."""
    kwargs.setdefault("parallel", True)
    return jit(func, **kwargs)
