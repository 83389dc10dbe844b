"""The E-step on a Dask cluster gives the in-process iteration, also when a worker dies.

Tolerance 1e-10 relative between in-process and cluster: the two sum the same float64
terms in a different order (in-process: one running sum over all patches; cluster: a
sum per task, then a binary tree), which changes the last bits (~1e-16) and the
Cholesky solve of the M-step can amplify that by cond(H) over the iterations. Between
two cluster runs with the same split the result must be the same to the bit.
"""
import math
import os
import signal

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from numbaem.model.basis import FBBasis  # noqa: E402
from numbaem.em.distributed import (DaskExecutor, executor_from_options, split_tasks,  # noqa: E402
                                 start_local_cluster, tree_pairs)
from numbaem.em.run import reconstruct  # noqa: E402
from numbaem.em.schedule import Stage  # noqa: E402
from numbaem.runtime.errors import NumbaemError  # noqa: E402
from numbaem.data.io import write_image  # noqa: E402
from numbaem.data.patches import PatchSource  # noqa: E402
from numbaem.model.projection import project  # noqa: E402
from numbaem.model.rotations import random_rotations  # noqa: E402

L, LMAX, K = 7, 2, 30
SIGMA2 = 0.25
SCHEDULE = [Stage(lmax=2, iters=2, frac=1.0, rotations=K), Stage(lmax=3, iters=1, frac=0.6, rotations=K)]
RTOL = 1e-10


def _micrographs(directory, rng, n_mic=3, side=84):
    """``n_mic`` micrographs of ``side``^2 pixels (432 patches of 7 x 7 for 3 x 84^2) as MRC files."""
    basis = FBBasis(L, LMAX)
    theta = rng.standard_normal(basis.M)
    cells = side // (2 * L)
    paths = []
    for m in range(n_mic):
        proj = project(theta, basis, random_rotations(cells * cells, rng))
        proj *= 1.0 / np.sqrt(np.mean(proj ** 2))
        img = np.zeros((side, side))
        for c in range(cells * cells):
            if rng.random() < 0.5:
                r0 = (c // cells) * 2 * L + rng.integers(0, L + 1)
                c0 = (c % cells) * 2 * L + rng.integers(0, L + 1)
                img[r0:r0 + L, c0:c0 + L] += proj[c]
        img += np.sqrt(SIGMA2) * rng.standard_normal(img.shape)
        path = directory / f"mic{m}.mrc"
        write_image(path, img)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def micrographs(tmp_path_factory):
    rng = np.random.default_rng(20240501)
    return _micrographs(tmp_path_factory.mktemp("mics"), rng)


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBAEM_THREADS",
               "NUMBA_NUM_THREADS")


@pytest.fixture(scope="module")
def client():
    before = {k: os.environ.get(k) for k in THREAD_VARS}
    c = start_local_cluster(2, 1, "auto")
    c.driver_env_before = before
    try:
        c.wait_for_workers(2, timeout=60)
        yield c
    finally:
        c.close()


def _run(paths, executor=None):
    source = PatchSource.from_files(paths, L)
    return reconstruct(source, "random", sigma2=SIGMA2, schedule=SCHEDULE, rng=np.random.default_rng(7),
                       progress=False, executor=executor)


@pytest.fixture(scope="module")
def reference(micrographs):
    """The in-process run (default executor)."""
    return _run(micrographs)


def _assert_close(a, b, rtol=RTOL):
    np.testing.assert_allclose(a.theta, b.theta, rtol=rtol, atol=rtol * np.abs(b.theta).max())
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra["patches"] == rb["patches"]
        for key in ("loglik", "upsilon", "sigma2"):
            assert ra[key] == pytest.approx(rb[key], rel=rtol), key
    assert a.upsilon == pytest.approx(b.upsilon, rel=rtol)


def test_split_and_tree_are_fixed():
    assert split_tasks(10, 3, 2) == [(0, 6), (6, 10)]
    assert split_tasks(6, 3, 1) == [(0, 3), (3, 6)]
    assert tree_pairs(1) == []
    assert tree_pairs(5) == [[(0, 1), (2, 3)], [(0, 1)], [(0, 1)]]
    # every leaf is summed exactly once
    for n in range(1, 40):
        vals = [1 << i for i in range(n)]
        for pairs in tree_pairs(n):
            nxt = [vals[i] + vals[j] for i, j in pairs]
            vals = nxt + ([vals[-1]] if len(vals) % 2 else [])
        assert vals == [(1 << n) - 1]


def test_workers_use_their_numba_threads(client):
    from numbaem.em.distributed import worker_threads

    def probe(dask_worker):
        import numba
        return os.environ.get("NUMBAEM_THREADS"), worker_threads(), dask_worker.state.nthreads, \
            numba.config.NUMBA_NUM_THREADS, os.environ.get("OMP_NUM_THREADS")

    seen = client.run(probe)
    assert len(seen) == 2
    assert all(v == ("1", 1, 1, 1, "1") for v in seen.values()), seen
    # Dask's nanny must not have lowered the driver's own threads (it writes OMP_NUM_THREADS=1
    # into the parent's environment unless told otherwise)
    assert {k: os.environ.get(k) for k in THREAD_VARS} == client.driver_env_before


def test_cluster_matches_in_process(micrographs, reference, client):
    ex = DaskExecutor(client)
    state = _run(micrographs, ex)
    _assert_close(state, reference)
    assert ex.last_call["tasks"] >= 2          # the work was really split
    assert ex.last_call["patches"] == reference.history[-1]["patches"]
    # the scattered job holds the spectra; tasks carry only index ranges
    assert ex.last_call["payload_bytes"] < ex.last_call["job_bytes"]


def test_cluster_with_ctf_groups_matches_in_process(micrographs, client):
    """CTF groups (theory section 11): the job carries the projections and the groups' filters,
    tasks hold one group each, and the iteration equals the in-process one."""
    from numbaem.model.ctf import CTFParams, ImageFilter

    filters = [ImageFilter(8.0, CTFParams(15000, 14000, 20, 300, 2.7, 0.1)),
               ImageFilter(8.0, CTFParams(25000, 25000, 0, 300, 2.7, 0.1))]
    sched = [Stage(lmax=2, iters=2, frac=1.0, rotations=K)]

    def run(executor=None):
        source = PatchSource.from_files(micrographs, L, groups=np.array([0, 1, 0]), filters=filters)
        return reconstruct(source, "random", sigma2=SIGMA2, schedule=sched, rng=np.random.default_rng(7),
                           progress=False, executor=executor)

    ex = DaskExecutor(client)
    local, remote = run(), run(ex)
    _assert_close(remote, local)
    assert ex.last_call["tasks"] >= 2
    # the job holds K L^2 + G L^4 numbers, not G sets of spectra
    assert ex.last_call["job_bytes"] < 8 * (K * L * L + 2 * L ** 4) + 4096


def test_cluster_search_on_ctf_groups_matches_in_process(micrographs, client):
    """A coarse-to-fine search stage on CTF groups: the tasks of each group search against that
    group's filtered model (the job carries the filters), and the iteration equals the in-process one."""
    from numbaem.model.ctf import CTFParams, ImageFilter

    filters = [ImageFilter(8.0, CTFParams(15000, 14000, 20, 300, 2.7, 0.1)),
               ImageFilter(8.0, CTFParams(25000, 25000, 0, 300, 2.7, 0.1))]
    sched = [Stage(lmax=2, iters=1, frac=1.0, rotations=K), Stage(lmax=2, iters=1, frac=1.0, fine=30.0, coarse=60.0)]

    def run(executor=None):
        source = PatchSource.from_files(micrographs, L, groups=np.array([0, 1, 0]), filters=filters)
        return reconstruct(source, "random", sigma2=SIGMA2, schedule=sched, rng=np.random.default_rng(7),
                           progress=False, executor=executor)

    ex = DaskExecutor(client)
    local, remote = run(), run(ex)
    _assert_close(remote, local)
    assert local.history[-1]["filter_groups"] == 2 and local.history[-1]["search_rows"] > 0


class KillOnce(distributed.diagnostics.plugin.SchedulerPlugin):
    """SIGKILLs the worker that has just finished the ``after``-th E-step task, once;
    counts the E-step tasks that had to be computed again."""

    name = "numbaem-test-kill-once"

    def __init__(self, after=3):
        self.after, self.killed, self.finished, self.recomputed = after, None, set(), 0

    async def start(self, scheduler):
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs):
        if finish != "memory" or not str(key).startswith("numbaem-estep"):
            return
        if key in self.finished:
            self.recomputed += 1
        self.finished.add(key)
        if self.killed is None and len(self.finished) >= self.after:
            ts = self.scheduler.tasks.get(key)
            ws = next(iter(ts.who_has)) if ts is not None and ts.who_has else None
            if ws is not None and ws.pid:
                self.killed = (ws.address, ws.pid)
                os.kill(ws.pid, signal.SIGKILL)


def test_lost_worker_is_recomputed(micrographs, reference, client):
    """A worker killed mid-iteration (holding finished results, running the next task):
    the nanny restarts it, Dask recomputes the lost tasks, the run gives the same numbers."""
    split = dict(chunk=16, chunks_per_task=2)       # 27 chunks -> 14 tasks, 4 levels of sums
    undisturbed = _run(micrographs, DaskExecutor(client, **split))
    client.register_plugin(KillOnce(after=3))
    try:
        state = _run(micrographs, DaskExecutor(client, **split))
        killed, recomputed = client.run_on_scheduler(
            lambda dask_scheduler: (dask_scheduler.plugins[KillOnce.name].killed,
                                    dask_scheduler.plugins[KillOnce.name].recomputed))
    finally:
        client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.remove_plugin(KillOnce.name))
    assert killed is not None, "the test did not manage to kill a worker"
    assert recomputed >= 1      # at least the result the dead worker held was computed again
    np.testing.assert_array_equal(state.theta, undisturbed.theta)
    assert [r["loglik"] for r in state.history] == [r["loglik"] for r in undisturbed.history]
    _assert_close(state, reference)
    client.wait_for_workers(2, timeout=60)          # the nanny brought the worker back


def test_in_memory_source_is_refused(client, rng):
    source = PatchSource([rng.standard_normal((28, 28))], L)
    with pytest.raises(NumbaemError, match="needs micrograph files on a shared path"):
        reconstruct(source, "random", sigma2=1.0, schedule=[Stage(1, 1, 1.0, 5)], rng=rng, progress=False,
                    executor=DaskExecutor(client))


def test_joining_a_running_cluster(client):
    ex, close = executor_from_options(scheduler=client.scheduler.address, threads=1)
    try:
        assert isinstance(ex, DaskExecutor) and ex.threads == 1
        assert len(ex.client.scheduler_info(n_workers=-1)["workers"]) == 2
    finally:
        close()
    assert client.submit(int, 3).result() == 3      # closing the joined client left the cluster alone


def test_options():
    ex, close = executor_from_options()
    assert ex is None
    close()
    with pytest.raises(NumbaemError, match="not both"):
        executor_from_options(workers=2, scheduler="tcp://localhost:8786")
    with pytest.raises(NumbaemError, match="chunk"):
        DaskExecutor(None, chunk=0)


def test_worker_with_two_threads_matches_in_process(micrographs, reference):
    """A Dask worker started with two threads (``dask worker``'s default is several) runs two
    E-step tasks at once in one process; each needs its own FFT buffers, or the statistics
    are silently corrupted (defect 1 of issue 9). Small chunks and one chunk per task make
    the tasks overlap."""
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                       dashboard_address=None, env=dict(NUMBAEM_THREADS="1"))
    try:
        with distributed.Client(cluster) as c:
            est = _run(micrographs, DaskExecutor(c, chunks_per_task=1, chunk=16, threads=1))
    finally:
        cluster.close()
    _assert_close(est, reference)


@pytest.mark.parametrize("model", ["image", "field"])
def test_cluster_with_orientation_prior_and_junk_class_matches_in_process(micrographs, client, model):
    """The extensions fold their priors into the spectra (the junk field travels as the E-step's
    Background), which travel as they are: the cluster's run (prior weights, junk volume or
    spectrum, varsigma included) matches the in-process one (RTOL)."""
    def go(executor=None):
        return reconstruct(PatchSource.from_files(micrographs, L), "random", sigma2=SIGMA2, schedule=SCHEDULE,
                           rng=np.random.default_rng(7), progress=False, executor=executor, orientation_prior=1,
                           prior_grid_ratio=math.inf, junk_class=model)    # updated on the coarse grid too
    ref, got = go(), go(DaskExecutor(client))
    _assert_close(got, ref)
    np.testing.assert_allclose(got.state.view_weights, ref.state.view_weights, rtol=RTOL)
    junk = "junk_theta" if model == "image" else "junk_lam"
    np.testing.assert_allclose(getattr(got.state, junk), getattr(ref.state, junk), rtol=RTOL)
    assert got.state.varsigma == pytest.approx(ref.state.varsigma, rel=RTOL)
