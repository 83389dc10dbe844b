"""Benchmarks of numbaem: ``python -m bench [suite ...] [--out DIR] [--threads T] [--quick]``.

Suites (one module each): ``small`` (every phase of an iteration at L = 7),
``paper-v1`` (the paper's first-stage size, L = 11, lmax = 10, K = 560, 60,000 patches),
``sweep`` (linearity in patches and rotations, thread scaling, chunk size),
``baseline`` (the paper's own per-shift route in NumPy, against numbaem) and ``peak``
(the machine's FFT and GEMM peaks, and the fraction of the FFT peak the E-step reaches).
See ``bench/README.md`` for the JSON fields.
"""
from .main import main

__all__ = ["main"]
