"""Small helpers shared by the commands: typed option parsers and output checks."""
import argparse
import json
import math
import sys


def positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def nonneg_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return v


def positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return v


def nonneg_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return v


def fraction(text):
    v = positive_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must lie strictly between 0 and 1")
    return v


def add_threads(parser):
    parser.add_argument("--threads", type=positive_int, default=None, metavar="T",
                        help="threads for numba kernels and FFTW together (default: NUMBAEM_THREADS, "
                             "NUMBA_NUM_THREADS or OMP_NUM_THREADS, else every core)")


def emit_json(obj):
    """The command's summary on standard output (the CLI may print; the library never does)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o):
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def check_outputs(paths, force):
    """Refuse existing outputs (without --force) before anything is written."""
    from ..data.io import check_output
    for p in paths:
        check_output(p, force)
