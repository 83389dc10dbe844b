"""Scale-out: the E-step of the EM (theory sections 5-6) as a map-reduce on a Dask cluster.

The sufficient statistics are sums over patches, so one iteration splits into tasks of
whole chunks of patches. Each task runs :func:`numbaem.em.run.stream_stats` on a worker,
which opens the micrographs itself, memory-mapped, from their paths on a file system
shared by the workers (opened once per worker process and cached). Patch data never
pass through the scheduler. Per iteration the driver:

1. scatters one small *job* (the projection spectra, ``K x 2L x (L+1)`` complex and
   ``K x 2L x 2L`` real, and the micrograph paths) to every worker, once
   (``broadcast=True``);
2. submits one task per group of chunks; each task carries only its patch indices
   (a range when the indices are consecutive);
3. sums the partial statistics in a binary tree of reduction tasks on the workers,
   always pairing the same partial results, so that the sum, and the iteration, is the
   same to the bit for a given split of the patches into tasks;
4. receives one :class:`~numbaem.em.estep.SufficientStats`.

CTF groups (theory section 11): the job then carries a
:class:`~numbaem.em.estep.GroupSpectra` (the projections and the groups' filters,
``K L^2 + G L^4`` numbers, rather than ``G`` sets of spectra), the driver splits the
patches by group, every task holds patches of one group and makes that group's spectra
on its worker (once per worker and group: cached on the worker's copy of the job), and
each group has its own reduction tree; the driver stacks the groups' sums.

Tasks are pure functions of their inputs and have explicit, per-iteration unique keys:
when a worker dies, the scheduler recomputes the tasks it was running and the results
it held, and the iteration gives the same numbers; a task that raises is retried
``retries`` times (Dask's own ``retries=``).

Threads: each worker process should run one task at a time (Dask ``nthreads=1``) and
give numba and pyFFTW ``T`` threads. A task takes ``T`` from, in order: the
executor's ``threads``; the worker's ``NUMBAEM_THREADS`` or ``NUMBA_NUM_THREADS``
environment variable (``start_local_cluster`` sets both); otherwise the worker
machine's cores divided by the worker's Dask threads. ``OMP_NUM_THREADS`` is not read
on workers because the Dask nanny sets it to 1 for NumPy's BLAS.

The split into tasks is a pure function of the number of patches, the chunk size and
the number of task slots (the sum of the workers' Dask threads) when the call starts;
give ``chunk`` and ``chunks_per_task`` to make it independent of the cluster size.
"""
import collections
import logging
import math
import os
import pickle
import threading
import time
import uuid

import numpy as np

from ..runtime.errors import NumbaemError
from .estep import Background, GroupSpectra, SufficientStats, add_junk, chunk_bytes
from .search import stats_from_arrays
from .plan import INTERPRETER_BYTES, worker_bytes
from ..runtime.memory import format_size, parse_size

logger = logging.getLogger(__name__)

#: Micrographs opened on this worker process: ``(paths, L, sizes) -> PatchSource``
#: (least recently used last; at most ``_MAX_SOURCES``).
_SOURCES = collections.OrderedDict()
_SOURCES_LOCK = threading.Lock()
_GROUP_LOCK = threading.Lock()
_MAX_SOURCES = 2

_BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_INSTALL = "install it with: pip install 'dask[distributed]' (or pip install 'numbaem[distributed]')"


def _import_distributed():
    try:
        import distributed
    except ImportError:  # pragma: no cover - exercised only without dask
        raise NumbaemError(f"the distributed E-step needs dask.distributed, which is not installed; {_INSTALL}") from None
    return distributed


# --------------------------------------------------------------------------- worker side

class _Job:
    """What every task of one iteration shares (scattered once to every worker).

    ``filters`` (set after construction): the CTF groups' ``Psi_g`` when ``spectra`` is a
    search's model on grouped micrographs (each task makes its group's model).

    Attributes
    ----------
    paths : tuple of str
        Absolute paths of the micrograph files.
    sizes : tuple of int
        Their sizes in bytes as the driver sees them (a worker that sees other sizes
        is not on the same file system).
    L : int
    spectra : numbaem.em.estep.DirectSpectra or numbaem.em.estep.ProjectionSpectra
    upsilon, sigma2 : float
    n_chunk : int
        Patches per chunk (and FFT plan size) on the workers.
    threads : int or None
        numba / pyFFTW threads per task (None: the worker decides, see module doc).
    """

    def __init__(self, paths, sizes, L, spectra, upsilon, sigma2, n_chunk, threads):
        self.paths, self.sizes, self.L = tuple(paths), tuple(sizes), int(L)
        # a float, or the Background of the junk field (theory section 14.4)
        self.spectra, self.upsilon, self.sigma2 = spectra, upsilon if isinstance(upsilon, Background) else \
            float(upsilon), float(sigma2)
        self.n_chunk, self.threads = int(n_chunk), threads

    def __sizeof__(self):  # what Dask's sizeof() reports: the spectra dominate
        return object.__sizeof__(self) + self.spectra.nbytes + sum(len(p) + 8 for p in self.paths)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_group_cache", None)     # worker-side spectra are made where they are used
        return state

    filters = None

    def group_spectra(self, group):
        """The spectra a task of ``group`` uses (made once per worker and group; thread-safe)."""
        if group is None:
            return self.spectra
        with _GROUP_LOCK:
            cache = self.__dict__.setdefault("_group_cache", {})
            if group not in cache:
                cache.clear()              # one group's spectra at a time per worker
                if isinstance(self.spectra, GroupSpectra):
                    cache[group] = self.spectra.group(group)
                else:                      # a search's model and the groups' filters (numbaem.em.search)
                    cache[group] = self.spectra.for_group(self.filters[group])
            return cache[group]


def _open_source(paths, sizes, L):
    """The worker process's cached :class:`~numbaem.data.patches.PatchSource` for these files."""
    from ..data.patches import PatchSource

    key = (paths, L, sizes)
    with _SOURCES_LOCK:
        src = _SOURCES.get(key)
        if src is not None:
            _SOURCES.move_to_end(key)
            return src
    host = _hostname()
    for p, size in zip(paths, sizes):
        try:
            seen = os.stat(p).st_size
        except OSError as exc:
            raise NumbaemError(f"worker on {host} cannot open micrograph {p} ({exc.strerror}); the distributed "
                               "E-step needs the micrograph files on a file system that every worker "
                               "mounts at the same path") from None
        if seen != size:
            raise NumbaemError(f"worker on {host} sees micrograph {p} with {seen} bytes but the driver sees {size}; "
                               "the workers must read the same files as the driver (a shared file system)")
    src = PatchSource.from_files(list(paths), L)
    with _SOURCES_LOCK:
        _SOURCES[key] = src
        while len(_SOURCES) > _MAX_SOURCES:
            _SOURCES.popitem(last=False)
    return src


def _hostname():
    import socket
    return socket.gethostname()


def worker_threads(threads=None):
    """numba / pyFFTW threads for one task on this worker (see the module doc for the order)."""
    if threads is not None:
        return int(threads)
    for var in ("NUMBAEM_THREADS", "NUMBA_NUM_THREADS"):
        val = os.environ.get(var)
        if val:
            try:
                return max(1, int(val))
            except ValueError:
                raise NumbaemError(f"environment variable {var}={val!r} on a worker is not a whole number; "
                                   "set it to a positive number of threads") from None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    slots = 1
    try:
        from distributed import get_worker
        slots = max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        pass
    return max(1, cores // slots)


def _estep_task(job, indices, group=None):
    """One task: the sufficient statistics of the patches ``indices`` (a range or an array).

    With CTF groups every patch of a task belongs to ``group``, and the task uses that
    group's spectra. Returned as the plain dict of :meth:`SufficientStats.to_arrays`,
    whose size Dask measures correctly (for memory accounting and transfer costs).
    """
    from .estep import stream_stats
    from ..runtime.threads import use_threads

    source = _open_source(job.paths, job.sizes, job.L)
    idx = np.arange(*indices) if isinstance(indices, tuple) else indices
    with use_threads(worker_threads(job.threads)):
        spectra = job.group_spectra(group)
        return stream_stats(source, idx, spectra, job.upsilon, job.sigma2, job.n_chunk).to_arrays()


def _add_stats(a, b):
    """``a + b`` of two partial statistics (dicts) into new arrays: inputs held by Dask are never modified
    (statistics on some rotations of a grid, from the coarse-to-fine search, are merged by rotation)."""
    from .search import add_stat_arrays
    return add_stat_arrays(a, b)


# --------------------------------------------------------------------------- driver side

def split_tasks(n, chunk, chunks_per_task):
    """Split ``n`` patch positions into tasks of whole chunks.

    Parameters
    ----------
    n : int
        Patches in the iteration.
    chunk : int
        Patches per chunk.
    chunks_per_task : int

    Returns
    -------
    list of (start, stop)
        Positions into the iteration's index array; every task but the last holds
        ``chunks_per_task * chunk`` patches.
    """
    step = int(chunk) * int(chunks_per_task)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def tree_pairs(n):
    """The reduction tree over ``n`` leaves: per level, the pairs ``(i, i + 1)`` summed.

    Level by level, leaf ``2i`` is added to leaf ``2i + 1``; an odd one out moves up
    unchanged. The tree depends on ``n`` alone, hence the sum's rounding too.
    """
    levels = []
    while n > 1:
        levels.append([(i, i + 1) for i in range(0, n - 1, 2)])
        n = (n + 1) // 2
    return levels


def _file_paths(source):
    """Absolute micrograph paths of ``source``; raises if it was built from in-memory arrays."""
    if getattr(source, "shift_window", None) is not None:
        raise NumbaemError("the distributed E-step reads the micrographs' regular patch grid; boxes around picks "
                           "(--particles) run in process: leave out --workers / --scheduler")
    names = source.names or []
    paths = []
    for img, name in zip(source.images, names):
        mapped = _memmap_file(img)
        if mapped is None or not os.path.isfile(name) or not os.path.samefile(mapped, name):
            raise NumbaemError(
                f"the distributed E-step needs micrograph files on a shared path, but {name} was given as an array "
                "in memory; write the micrographs to MRC files on a file system the workers mount "
                "(numbaem.data.io.write_image) and open them with PatchSource.from_files, or run without a cluster")
        paths.append(os.path.abspath(name))
    return paths


def _memmap_file(arr):
    base = arr
    while base is not None:
        if isinstance(base, np.memmap) and getattr(base, "filename", None):
            return base.filename
        base = getattr(base, "base", None)
    return None


def _nbytes_pickled(obj):
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


class DaskExecutor:
    """Computes the sufficient statistics of an iteration on a Dask cluster (map-reduce).

    Pass it as ``executor=`` to :func:`numbaem.em.run.reconstruct` or
    :func:`numbaem.em.run.em_iteration`.

    Parameters
    ----------
    client : distributed.Client
    chunks_per_task : int, optional
        Chunks of patches per task. Default: enough to make about ``tasks_per_slot``
        tasks per Dask thread of the cluster.
    chunk : int, optional
        Patches per chunk on the workers (the E-step's memory is proportional). The
        driver's plan (``n_chunk``) and the workers' memory limit cap it; by default it
        is also lowered so that there are at least ``tasks_per_slot`` tasks per slot.
    tasks_per_slot : int
        Tasks per Dask thread when ``chunks_per_task`` or ``chunk`` is chosen
        automatically (more balance the load; fewer cost less scheduling).
    threads : int, optional
        numba / pyFFTW threads per task (default: the worker decides; module doc).
    retries : int
        Times a task that raises is retried (Dask's ``retries=``). Tasks lost with a
        worker are recomputed regardless.
    direct : bool, optional
        Scatter the job to, and gather the result from, the workers directly instead of
        through the scheduler (Dask's ``direct=``; default: Dask decides, which from
        outside the cluster means through the scheduler).

    Attributes
    ----------
    last_call : dict
        Figures of the last call: tasks, chunk, chunks_per_task, slots, job_bytes
        (pickled scattered job), payload_bytes (pickled task arguments), result_bytes,
        seconds.
    """

    def __init__(self, client, chunks_per_task=None, *, chunk=None, tasks_per_slot=4, threads=None, retries=2,
                 direct=None):
        for name, val in (("chunks_per_task", chunks_per_task), ("chunk", chunk), ("threads", threads)):
            if val is not None and (int(val) != val or val < 1):
                raise NumbaemError(f"{name}={val!r} must be a whole number >= 1 (or None for automatic)")
        if int(tasks_per_slot) != tasks_per_slot or tasks_per_slot < 1:
            raise NumbaemError(f"tasks_per_slot={tasks_per_slot!r} must be a whole number >= 1")
        if int(retries) != retries or retries < 0:
            raise NumbaemError(f"retries={retries!r} must be a whole number >= 0")
        self.client = client
        self.chunks_per_task = None if chunks_per_task is None else int(chunks_per_task)
        self.chunk = None if chunk is None else int(chunk)
        self.tasks_per_slot = int(tasks_per_slot)
        self.threads = None if threads is None else int(threads)
        self.retries = int(retries)
        self.direct = direct
        self.last_call = {}

    def _cluster(self):
        """Task slots (sum of worker threads) and the smallest memory per slot (0: no limit).

        A worker with ``t`` Dask threads runs up to ``t`` tasks at once, each with its own
        FFT workspaces and statistics, so its memory limit is shared by ``t`` tasks.
        """
        try:
            info = self.client.scheduler_info(n_workers=-1)  # newer Dask lists only 5 workers by default
        except TypeError:  # pragma: no cover - older Dask
            info = self.client.scheduler_info()
        workers = info.get("workers", {})
        if not workers:
            raise NumbaemError("the Dask cluster has no workers; start some (or wait for them: "
                               "client.wait_for_workers(n)) before reconstructing")
        slots = sum(int(w.get("nthreads", 1)) for w in workers.values())
        limits = [int(w.get("memory_limit") or 0) // max(1, int(w.get("nthreads", 1))) for w in workers.values()]
        limits = [m for m in limits if m > 0]
        return slots, (min(limits) if limits else 0)

    def plan(self, n, n_chunk, K, L, slots, memory_limit, n_groups=None):
        """``(chunk, chunks_per_task)`` for ``n`` patches (see the class doc).

        With both automatic, about ``tasks_per_slot * slots`` tasks of equal size, each
        of the fewest chunks that respect the chunk cap.
        """
        cap = max(1, min(int(n_chunk), self.chunk or n, n))
        if memory_limit:
            fixed = worker_bytes(K, L, 0, n_groups) + INTERPRETER_BYTES
            mem_cap = int((0.6 * memory_limit - fixed) // chunk_bytes(1, K, L))
            if mem_cap < 1:
                raise NumbaemError(f"a worker memory limit of {format_size(memory_limit)} is too small for "
                                   f"K={K} rotations at L={L}; give the workers more memory (at least "
                                   f"{format_size(int((fixed + chunk_bytes(1, K, L)) / 0.6))})")
            cap = min(cap, mem_cap)
        target = self.tasks_per_slot * max(1, slots)
        if self.chunks_per_task is not None:
            return cap, self.chunks_per_task
        if self.chunk is not None:
            return cap, max(1, math.ceil(math.ceil(n / cap) / target))
        per_task = math.ceil(n / target)
        cpt = math.ceil(per_task / cap)
        return math.ceil(per_task / cpt), cpt

    def sufficient_stats(self, source, idx, spectra, upsilon, sigma2, n_chunk, progress=None):
        """The sufficient statistics of the patches ``idx`` of ``source`` (see :func:`numbaem.em.run.stream_stats`)."""
        distributed = _import_distributed()
        t0 = time.perf_counter()
        paths = _file_paths(source)
        idx = np.asarray(idx, dtype=np.int64)
        grouped = isinstance(spectra, GroupSpectra)
        n, K, L = len(idx), spectra.K, source.L
        n_groups = spectra.n_groups if grouped else None
        search_filters = None
        if getattr(spectra, "route", None) == "search":
            get = getattr(source, "filter_matrices", None)
            search_filters = get() if get is not None else None
            if search_filters is not None:        # a search on CTF groups: one part per group, as above
                grouped, n_groups = True, len(search_filters)
        if n == 0:
            return SufficientStats.zeros(K, L, n_groups=n_groups)
        slots, mem = self._cluster()
        chunk, cpt = self.plan(n, n_chunk, K, L, slots, mem, n_groups=n_groups)
        if grouped:
            gid = source.patch_groups(idx)
            parts = [(g, idx[gid == g]) for g in range(n_groups) if np.any(gid == g)]
        else:
            parts = [(None, idx)]
        sizes = [os.stat(p).st_size for p in paths]
        job = _Job(paths, sizes, L, spectra, upsilon, sigma2, chunk, self.threads)
        job.filters = search_filters
        client = self.client
        token = uuid.uuid4().hex[:12]
        job_f = client.scatter(job, broadcast=True, hash=False, direct=self.direct)
        leaves, roots, sizes_of, payload, n_tasks = [], [], {}, 0, 0
        for g, sub in parts:
            tag = token if g is None else f"{token}-g{g}"
            spans = split_tasks(len(sub), chunk, cpt)
            n_tasks += len(spans)
            level = []
            for i, (a, b) in enumerate(spans):
                sel = sub[a:b]
                arg = (int(sel[0]), int(sel[-1]) + 1) if sel[-1] - sel[0] == len(sel) - 1 and \
                    np.all(np.diff(sel) == 1) else sel
                extra = () if g is None else (g,)
                payload += _nbytes_pickled((_estep_task, arg) + extra)
                fut = client.submit(_estep_task, job_f, arg, *extra, key=f"numbaem-estep-{tag}-{i}",
                                    retries=self.retries, pure=False)
                level.append(fut)
                sizes_of[fut.key] = b - a
            leaves.extend(level)
            for depth, pairs in enumerate(tree_pairs(len(level))):
                nxt = [client.submit(_add_stats, level[i], level[j], key=f"numbaem-sum-{tag}-{depth}-{i // 2}",
                                     retries=self.retries, pure=False) for i, j in pairs]
                if len(level) % 2:
                    nxt.append(level[-1])
                payload += len(pairs) * _nbytes_pickled((_add_stats, None, None))
                level = nxt
            roots.append(level[0])
        logger.debug("E-step on Dask: %d patches in %d task(s) of up to %d chunk(s) of %d, %d slot(s)%s",
                     n, n_tasks, cpt, chunk, slots, f", {len(parts)} CTF group(s)" if grouped else "")
        for fut in distributed.as_completed(leaves):
            if fut.status == "error":
                fut.result()  # raises the task's error (after Dask's retries)
            if progress is not None:
                progress(sizes_of[fut.key])
        results = client.gather(roots, direct=self.direct)
        if search_filters is not None:
            from .search import GroupSearchStats
            by_group = dict(zip([g for g, _ in parts], results))
            stats = GroupSearchStats([stats_from_arrays(by_group[g]) if g in by_group else None
                                      for g in range(n_groups)])
        elif grouped:
            stats = SufficientStats.zeros(K, L, n_groups=n_groups)
            for (g, _), res in zip(parts, results):
                stats.W[g] = res["W"]
                stats.G[g] = res["G"]
                stats.n_patches += res["n_patches"]
                stats.sum_empty += res["sum_empty"]
                stats.sum_yy += res["sum_yy"]
                stats.loglik += res["loglik"]
                stats.junk = add_junk(stats.junk, res.get("junk"))
        else:
            stats = stats_from_arrays(results[0])
        del leaves, level, roots, job_f
        self.last_call = dict(patches=n, tasks=n_tasks, chunk=chunk, chunks_per_task=cpt, slots=slots,
                              job_bytes=_nbytes_pickled(job), payload_bytes=payload,
                              result_bytes=_nbytes_pickled(stats), seconds=time.perf_counter() - t0)
        return stats


# --------------------------------------------------------------------------- clusters

def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def start_local_cluster(n_workers, threads_per_worker=None, memory_limit="auto", *, dashboard_address=None,
                        **kwargs):
    """A Dask ``LocalCluster`` of worker processes sized for numbaem, and its client.

    Each worker process runs one task at a time (Dask ``nthreads=1``) with
    ``threads_per_worker`` numba / pyFFTW threads (``NUMBAEM_THREADS``,
    ``NUMBA_NUM_THREADS`` and the BLAS thread variables are set in the workers'
    environment only; this process's environment is left as it was), so
    ``n_workers * threads_per_worker`` should not exceed the cores.

    Parameters
    ----------
    n_workers : int
    threads_per_worker : int, optional
        Default: the cores divided by ``n_workers`` (at least 1).
    memory_limit : int, str or 'auto'
        Per worker: bytes, a size like ``'4GiB'``, or ``'auto'`` (the machine's memory
        divided by ``n_workers``). The E-step's chunks are sized to fit.
    dashboard_address : str, optional
        e.g. ``':8787'`` for Dask's dashboard (None: no dashboard).
    **kwargs
        Passed on to ``distributed.LocalCluster``.

    Returns
    -------
    distributed.Client
        Closing it closes the cluster.
    """
    distributed = _import_distributed()
    if int(n_workers) != n_workers or n_workers < 1:
        raise NumbaemError(f"n_workers={n_workers!r} must be a whole number >= 1")
    cores = _cores()
    if threads_per_worker is None:
        threads_per_worker = max(1, cores // int(n_workers))
    if int(threads_per_worker) != threads_per_worker or threads_per_worker < 1:
        raise NumbaemError(f"threads_per_worker={threads_per_worker!r} must be a whole number >= 1")
    n_workers, threads_per_worker = int(n_workers), int(threads_per_worker)
    if n_workers * threads_per_worker > cores:
        logger.warning("%d workers x %d threads = %d threads on %d cores: they will compete for the cores",
                       n_workers, threads_per_worker, n_workers * threads_per_worker, cores)
    if memory_limit not in (None, "auto"):
        memory_limit = parse_size(memory_limit)
    import dask

    env = dict(kwargs.pop("env", None) or {})
    env.update(NUMBAEM_THREADS=str(threads_per_worker), NUMBA_NUM_THREADS=str(threads_per_worker))
    # Dask's nanny puts OMP/MKL/OPENBLAS_NUM_THREADS=1 in its "pre-spawn" environment, which it
    # writes into *this* process's os.environ too: the driver's projections and M-step would then
    # run on one thread. Give the workers those variables through env= (set in the worker only)
    # instead; a worker runs one task at a time, so T BLAS threads do not oversubscribe either.
    pre_spawn = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", default=None) or {}).items()
                 if k not in _BLAS_THREAD_VARS}
    env.update({k: str(threads_per_worker) for k in _BLAS_THREAD_VARS})
    if dashboard_address is None:
        # no dashboard; the scheduler's small HTTP server (health checks) on a free port, not 8787
        kwargs["scheduler_kwargs"] = {"dashboard": False, "dashboard_address": ":0",
                                      **(kwargs.get("scheduler_kwargs") or {})}
    # the client creates the cluster, so closing the client closes the workers too
    with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}):
        client = distributed.Client(n_workers=n_workers, threads_per_worker=1, processes=True,
                                    memory_limit=memory_limit, dashboard_address=dashboard_address, env=env,
                                    **kwargs)
    logger.info("started a local Dask cluster: %d worker(s) x %d thread(s), memory limit %s each, scheduler %s",
                n_workers, threads_per_worker,
                "auto" if memory_limit in (None, "auto") else format_size(memory_limit), client.scheduler.address)
    return client


def connect(address, timeout=30, n_workers=1):
    """A client of the running Dask scheduler at ``address`` (e.g. ``tcp://host:8786``).

    Waits up to ``timeout`` seconds for ``n_workers`` workers.
    """
    distributed = _import_distributed()
    try:
        client = distributed.Client(address, timeout=timeout)
    except OSError as exc:
        raise NumbaemError(f"cannot reach the Dask scheduler at {address} ({exc}); check the address "
                           "(tcp://HOST:PORT, as printed by 'dask scheduler') and that it is running") from None
    if n_workers:
        try:
            client.wait_for_workers(n_workers, timeout=timeout)
        except TimeoutError:
            client.close()
            raise NumbaemError(f"the Dask scheduler at {address} has fewer than {n_workers} worker(s) after "
                               f"{timeout} s; start workers with 'dask worker {address} --nthreads 1'") from None
    return client


def executor_from_options(workers=None, scheduler=None, threads=None, memory=None):
    """The executor for the command line's ``--workers N`` / ``--scheduler ADDRESS``.

    Parameters
    ----------
    workers : int, optional
        Start a local cluster of this many worker processes.
    scheduler : str, optional
        Join the Dask scheduler at this address instead.
    threads : int, optional
        numba / pyFFTW threads per worker (default: cores / workers locally; the
        workers decide on a remote cluster).
    memory : int or str, optional
        Memory limit per local worker (default ``'auto'``).

    Returns
    -------
    executor : DaskExecutor or None
        None when neither option is given (run in-process).
    close : callable
        Closes the client (and a local cluster); call it when done.
    """
    if workers is not None and scheduler is not None:
        raise NumbaemError("give either --workers (start a local cluster) or --scheduler (join one), not both")
    if workers is None and scheduler is None:
        return None, lambda: None
    if workers is not None:
        client = start_local_cluster(workers, threads, "auto" if memory is None else memory)
        return DaskExecutor(client), client.close
    if memory is not None:
        logger.warning("the memory limit of the workers is set where they are started; ignoring it for %s", scheduler)
    client = connect(scheduler)
    return DaskExecutor(client, threads=threads), client.close


__all__ = ["DaskExecutor", "connect", "executor_from_options", "split_tasks", "start_local_cluster",
           "tree_pairs", "worker_threads"]
