"""One validator per concept: every public function checks its arguments through these.

Each raises :class:`~numbaem.runtime.errors.NumbaemError` with one sentence that names
the argument, the value received and the fix, and returns the value in its canonical
type (``int``, ``float``, a ``float64`` array, a ``numpy.random.Generator``).
"""
import math
import numbers

import numpy as np

from .errors import NumbaemError


def is_int(value):
    """True for a whole number given as an integer type (``bool`` excluded)."""
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def whole_number(name, value, minimum=1, example=None):
    """``value`` (of an integer type: ``41.0`` is refused) as an ``int``, at least ``minimum`` (None: any)."""
    if not is_int(value) or (minimum is not None and value < minimum):
        kind = ("a positive whole number" if minimum == 1 else
                f"a whole number >= {minimum}" if minimum is not None else "a whole number")
        eg = example if example is not None else (minimum if minimum is not None else 1)
        raise NumbaemError(f"{name}={value!r} is not {kind}; pass e.g. {name}={eg}")
    return int(value)


def positive_number(name, value, example=1.0, unit=""):
    """``value`` as a positive finite ``float``; ``unit`` (e.g. ``' Angstrom'``) is named in the fix."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, (bool, np.bool_)) or not math.isfinite(v) or v <= 0:
        raise NumbaemError(f"{name}={value!r} is not a positive finite number; pass e.g. {name}={example}{unit}")
    return v


def fraction(name, value, example=0.5, closed_right=False):
    """``value`` as a ``float`` in ``(0, 1)`` (or ``(0, 1]`` with ``closed_right``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    ok = math.isfinite(v) and 0 < v and (v <= 1 if closed_right else v < 1)
    if isinstance(value, (bool, np.bool_)) or not ok:
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise NumbaemError(f"{name}={value!r} must lie in {interval}; pass e.g. {name}={example}")
    return v


def pixel_size(name, value, allow_none=True):
    """A pixel size in Angstrom as a positive ``float`` (or ``None`` when unknown and allowed)."""
    if value is None and allow_none:
        return None
    return positive_number(name, value, example=1.06, unit=" (Angstrom per pixel)")


def check_L(L, name="L"):
    """A patch / volume side: an odd whole number >= 3 (theory section 2: voxel ``n`` at ``n - L // 2``)."""
    if isinstance(L, (bool, np.bool_)) or not isinstance(L, (numbers.Real, np.number)) or int(L) != L:
        raise NumbaemError(f"{name}={L!r} is not a whole number; give an odd size such as 7 or 11")
    L = int(L)
    if L % 2 == 0:
        raise NumbaemError(f"{name}={L} is even; numbaem works with odd sizes, use {name}={L + 1} or {L - 1}")
    if L < 3:
        raise NumbaemError(f"{name}={L} is too small; use an odd size of at least 3")
    return L


def image_shape(N, name="micrograph_size"):
    """``N`` (an int or a pair of ints) as a tuple ``(N0, N1)``."""
    if is_int(N):
        return int(N), int(N)
    try:
        shape = tuple(N)
    except TypeError:
        shape = ()
    if len(shape) != 2 or not all(is_int(n) for n in shape):
        raise NumbaemError(f"{name}={N!r} is not an integer or a pair of integers; pass e.g. "
                           f"{name}=1024 or {name}=(1024, 768)")
    return int(shape[0]), int(shape[1])


def cubic_volume(name, vol, what="use"):
    """A real cubic map as a finite ``float64`` array of shape ``(n, n, n)``."""
    vol = np.asarray(vol)
    if np.iscomplexobj(vol):
        raise NumbaemError(f"{name} is complex; pass a real volume (take .real if the imaginary part is round-off)")
    if vol.ndim != 3 or len(set(vol.shape)) != 1 or vol.size == 0:
        raise NumbaemError(f"{name} has shape {vol.shape}; pass a cubic 3-D map of shape (L, L, L)")
    if not (np.issubdtype(vol.dtype, np.floating) or np.issubdtype(vol.dtype, np.integer)):
        raise NumbaemError(f"{name} has dtype {vol.dtype}; pass a real-valued map")
    vol = vol.astype(np.float64, copy=False)
    if not np.all(np.isfinite(vol)):
        raise NumbaemError(f"{name} has NaN or infinite voxels; replace them before you {what} it")
    return vol


def as_rng(rng, name="rng"):
    """The one way randomness enters: a ``numpy.random.Generator``, or a seed that makes one.

    Returns
    -------
    rng : numpy.random.Generator
    seed : int or None
        The seed when one was given (for provenance records), else None.
    """
    if isinstance(rng, np.random.Generator):
        return rng, None
    if is_int(rng) and rng >= 0:
        return np.random.default_rng(int(rng)), int(rng)
    raise NumbaemError(f"{name}={rng!r} is neither a numpy.random.Generator nor a seed (a whole number >= 0); "
                       "pass numpy.random.default_rng(seed) or the seed itself")
