"""Shared pieces of the benchmark suites: machine and version records, timers, data, fits.

Nothing here is timed itself. The suites call :func:`time_call` (best and median of a
few repetitions after the caller's warm-up) and write their record through
:mod:`bench.main`; their data come from :mod:`bench._data` (micrographs simulated by
``numbaem simulate``, cached on disk).
"""
import dataclasses
import hashlib
import os
import platform
import statistics
import time

import numpy as np

from numbaem.runtime.memory import current_rss, peak_rss, reset_peak_rss, total_memory


@dataclasses.dataclass
class Config:
    """Options shared by every suite (from the command line).

    Attributes
    ----------
    quick : bool
        Shrink every size for a smoke test (seconds, not minutes).
    threads : int
        Threads for numba and FFTW (already applied by :func:`numbaem.runtime.threads.use_threads`).
    memory : int or None
        Memory budget in bytes for the EM iteration; ``None``: each suite's default.
    seed : int
    baseline_patches : int or None
        Patches the baseline really runs on (the rest is extrapolated).
    out : str
        Directory of the results (and, unless ``data_dir`` says otherwise, of the data).
    data_dir : str or None
        Directory of the simulated micrographs (default ``out/data``).
    resimulate : bool
        Simulate the data again even when a matching cache exists.
    iterations : int or None
        Iterations of the timed ``numbaem reconstruct`` run (default: each suite's own).
    """

    quick: bool = False
    threads: int = 1
    memory: int = None
    seed: int = 0
    baseline_patches: int = None
    out: str = "bench/results"
    data_dir: str = None
    resimulate: bool = False
    iterations: int = None

    def rng(self, salt=0):
        return np.random.default_rng([self.seed, salt])


# --------------------------------------------------------------------------- machine

def cpu_model():
    """The CPU model string of ``/proc/cpuinfo`` (or :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags():
    """SIMD flags of the CPU that matter for the kernels (AVX2, AVX-512F, FMA)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512dq") if f in flags)
    except OSError:
        pass
    return []


def physical_cores():
    """Distinct (physical id, core id) pairs in ``/proc/cpuinfo``; logical CPUs when unknown."""
    try:
        seen, phys, core = set(), None, None
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    seen.add((phys, core))
                    phys, core = None, None
        if core is not None:
            seen.add((phys, core))
        if seen:
            return len(seen)
    except OSError:
        pass
    return os.cpu_count()


def machine_info():
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        affinity = os.cpu_count()
    return dict(cpu_model=cpu_model(), cpu_flags=cpu_flags(), logical_cpus=os.cpu_count(),
                physical_cores=physical_cores(), cpus_available=affinity, memory_bytes=total_memory(),
                platform=platform.platform(), python=platform.python_version(),
                load_average=list(os.getloadavg()))


def versions():
    import numba
    import pyfftw
    import scipy

    import numbaem

    out = dict(numpy=np.__version__, numba=numba.__version__, pyfftw=pyfftw.__version__,
               scipy=scipy.__version__, numbaem=getattr(numbaem, "__version__", "unknown"),
               python=platform.python_version())
    try:
        import llvmlite
        out["llvmlite"] = llvmlite.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        out["blas"] = _blas_name()
    except Exception:  # pragma: no cover - informational only
        pass
    out["git"] = git_state()
    return out


def git_state():
    """Commit of the checkout and the library files changed since it (provenance of the timings)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "numbaem"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    changed = [ln[3:] for ln in dirty if ln.strip()]
    digests = {}
    for rel in changed:
        try:
            digests[rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()[:16]
        except OSError:
            digests[rel] = None
    return dict(commit=commit or None, numbaem_uncommitted=changed, numbaem_uncommitted_sha256=digests)


def _blas_name():
    cfg = np.show_config(mode="dicts")
    blas = cfg.get("Build Dependencies", {}).get("blas", {})
    return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()


def thread_info():
    import numba

    from numbaem.runtime.threads import fft_threads

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = "not yet initialised"
    return dict(numba=numba.get_num_threads(), fftw=fft_threads(), numba_max=numba.config.NUMBA_NUM_THREADS,
                threading_layer=layer)


class CpuShare:
    """CPU time the *other* processes of the machine used over a block, in cores.

    ``/proc/stat`` gives the machine's busy time, ``resource.getrusage`` this
    process's; ``other_cores`` = (machine busy - own) / wall. On a shared machine this
    says how much of the measured time may be contention (0 on a quiet machine).
    """

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as fh:
                f = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...
        return (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own():
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def __enter__(self):
        self.t0, self.b0, self.o0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        b1, o1 = self._busy(), self._own()
        if self.b0 is None or b1 is None or wall <= 0:
            self.result = dict(other_cores=None, own_cores=None, wall=wall)
        else:
            own = o1 - self.o0
            self.result = dict(other_cores=max(0.0, (b1 - self.b0 - own) / wall), own_cores=own / wall, wall=wall)


# --------------------------------------------------------------------------- timing

def time_call(fn, reps=3, min_reps=1, budget_s=None):
    """Time ``fn()`` ``reps`` times (fewer when ``budget_s`` seconds are spent, at least ``min_reps``).

    Returns
    -------
    stats : dict
        ``best``, ``median``, ``all`` (seconds) and ``reps``.
    value : the last return value of ``fn``
    """
    times, value = [], None
    t_start = time.perf_counter()
    for i in range(max(reps, min_reps)):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
        if budget_s is not None and i + 1 >= min_reps and time.perf_counter() - t_start > budget_s:
            break
    return dict(best=min(times), median=statistics.median(times), all=times, reps=len(times)), value


class Phases:
    """Accumulate wall time per named phase: ``with ph("name"): ...``."""

    def __init__(self):
        self.seconds = {}
        self.calls = {}

    def __call__(self, name):
        return _PhaseCtx(self, name)

    def add(self, name, dt):
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self.calls[name] = self.calls.get(name, 0) + 1


class _PhaseCtx:
    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.owner.add(self.name, time.perf_counter() - self.t0)


class PeakMemory:
    """Peak resident size over a block (resets the kernel counter on entry).

    Attributes (after the block): ``peak`` (bytes), ``start`` (resident bytes on entry).
    """

    def __enter__(self):
        reset_peak_rss()
        self.start = current_rss()
        return self

    def __exit__(self, *exc):
        self.peak = peak_rss()


# --------------------------------------------------------------------------- fits

def linear_fit(x, y):
    """Least-squares line ``y = slope x + intercept`` and its ``R^2``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    # proportionality check: time / size should be constant for a linear-through-zero cost
    per_unit = (y / x).tolist()
    return dict(slope=float(slope), intercept=float(intercept), r2=float(r2), per_unit=per_unit,
                per_unit_spread=float((max(per_unit) - min(per_unit)) / np.mean(per_unit)))


def fmt_seconds(x):
    """Seconds as the tables print them: ``1,038`` from 100 up, three significant digits below."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def gib(n):
    return None if n is None else n / 1024 ** 3
