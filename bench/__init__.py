"""Benchmarks of numbaem: ``python -m bench [suite ...] [--out DIR] [--data-dir DIR] [--threads T] [--quick]``.

Suites (one module each): ``small`` (``numbaem reconstruct`` at L = 7 on micrographs
simulated at SNR 1, and every phase of an iteration), ``paper-v1`` (the same at the
paper's first-stage size: L = 11, lmax = 10, K = 560, about 60,000 patches per
iteration of four 5995 x 5995 micrographs), ``sweep`` (linearity in patches and
rotations, thread scaling, chunk size), ``baseline`` (the paper's per-shift M-step
against numbaem's, on the package's own E-step) and ``peak`` (the machine's FFT and
GEMM peaks, and the fraction of the FFT peak the E-step reaches). ``python -m
bench.table`` prints the README's performance table from ``bench/reference/``.
See ``bench/README.md`` for the JSON fields.
"""
from .main import main

__all__ = ["main"]
