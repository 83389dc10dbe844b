"""One EM iteration in-process and on a local Dask cluster: overhead and traffic.

At the ``small`` size (L=7, lmax=4, K=300, 20,000 patches in MRC files in a temporary
directory), times one full iteration (projections, E-step, M-step) for

- in-process with T threads (the baseline),
- 1 worker x T threads,
- T workers x 1 thread,

(T = 2 by default, the same cores for all) and reports each one's overhead over the
in-process time, measured in the same run. Every configuration does one warm-up
iteration first (JIT cache loads, micrographs opened, FFT plans built); then the
configurations take turns, ``--repeats`` rounds, each timing one iteration from the
same state (both clusters stay up, idle, meanwhile), so that a change in the machine's
load hits all of them alike. The overhead is reported from the minima and from the
medians; the 1-minute load average before each run is recorded (on a shared machine
only the minima mean much).

Traffic per iteration of a cluster run:

- ``job_bytes``: the pickled job scattered to the workers (projection spectra + paths);
- ``payload_bytes``: the pickled task arguments sent in the task graph (index ranges);
- ``result_bytes``: the pickled sufficient statistics returned to the driver;
- ``scheduler_bytes``: what passes through the scheduler with Dask's default routing
  from outside the cluster (job in and out, graph, result in and out):
  ``2 job + payload + 2 result``;
- ``worker_sent_bytes``: bytes the workers served to peers and to the scheduler
  (Dask's ``transfer_outgoing_bytes_total``, difference over the iteration): job
  replication, partial sums moving between workers, the result.

Writes JSON to ``bench/results/distributed_small.json`` (``--out``).

    python bench/distributed_bench.py [--threads 2] [--patches 20000] [--repeats 3]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _micrographs(directory, L, lmax, n_patches, rng, sigma2):
    """Micrographs of 50 x 100 patches each, holding projections of one random volume."""
    from numbaem.model.basis import FBBasis
    from numbaem.data.io import write_image
    from numbaem.model.projection import project
    from numbaem.model.rotations import random_rotations

    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M)
    rows, cols = 50, 100
    n_mic = max(1, round(n_patches / (rows * cols)))
    cells0, cells1 = rows // 2, cols // 2          # one 2L x 2L cell per 2 x 2 patches
    paths = []
    for m in range(n_mic):
        proj = project(theta, basis, random_rotations(cells0 * cells1, rng))
        proj *= 1.0 / np.sqrt(np.mean(proj ** 2))
        img = np.zeros((rows * L, cols * L))
        for c in range(cells0 * cells1):
            if rng.random() < 0.4:
                r0 = (c // cells1) * 2 * L + rng.integers(0, L + 1)
                c0 = (c % cells1) * 2 * L + rng.integers(0, L + 1)
                img[r0:r0 + L, c0:c0 + L] += proj[c]
        img += np.sqrt(sigma2) * rng.standard_normal(img.shape)
        path = Path(directory) / f"mic{m:03d}.mrc"
        write_image(path, img)
        paths.append(str(path))
    return paths


def _worker_sent(client):
    return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())


def _machine():
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(node=platform.node(), cpu=model, cores=len(os.sched_getaffinity(0)), system=platform.platform(),
                python=sys.version.split()[0])


def _versions():
    import dask
    import distributed
    import numba
    import pyfftw
    return dict(numpy=np.__version__, numba=numba.__version__, pyfftw=pyfftw.__version__, dask=dask.__version__,
                distributed=distributed.__version__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, default=7)
    ap.add_argument("--lmax", type=int, default=4)
    ap.add_argument("--K", type=int, default=300)
    ap.add_argument("--patches", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2, help="cores used by every configuration")
    ap.add_argument("--chunk", type=int, default=256, help="patches per chunk (the same for all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed_small.json"))
    args = ap.parse_args(argv)

    from numbaem.model.basis import FBBasis
    from numbaem.em.distributed import DaskExecutor, start_local_cluster
    from numbaem.em.run import EMState, em_iteration, initial_theta
    from numbaem.em.schedule import Stage
    from numbaem.model.projection import Operator
    from numbaem.em.estep import chunk_bytes
    from numbaem.data.patches import PatchSource
    from numbaem.model.rotations import rotation_grid
    from numbaem.runtime.threads import use_threads

    L, lmax, K, T = args.L, args.lmax, args.K, args.threads
    sigma2 = 1.0
    rng = np.random.default_rng(2024)
    results = []
    with tempfile.TemporaryDirectory(prefix="numbaem-bench-") as tmp, use_threads(T):
        paths = _micrographs(tmp, L, lmax, args.patches, rng, sigma2)
        source = PatchSource.from_files(paths, L)
        basis = FBBasis(L, lmax)
        op = Operator(basis, rotation_grid(K), 1 << 30)
        stage = Stage(lmax, 1, 1.0, K)
        theta0 = initial_theta("random", L, lmax, rng=np.random.default_rng(1), source=source, sigma2=sigma2)

        def one(executor):
            state = EMState(theta=theta0.copy(), lmax=lmax, upsilon=0.5, sigma2=sigma2,
                            rng=np.random.default_rng(0))
            return em_iteration(state, source, op, stage, n_chunk=args.chunk, executor=executor)

        print(f"L={L} lmax={lmax} (M={basis.M}) K={K} patches={source.n_patches} in {len(paths)} files, "
              f"chunk {args.chunk} ({chunk_bytes(args.chunk, K, L) / 2**20:.0f} MiB), {T} cores", flush=True)
        configs = [dict(config=f"in-process, {T} threads", workers=0, threads_per_worker=T)]
        clients = [None]
        try:
            for n_workers, tpw in ((1, T), (T, 1)):
                client = start_local_cluster(n_workers, tpw, "auto")
                clients.append(client)
                client.wait_for_workers(n_workers, timeout=120)
                configs.append(dict(config=f"{n_workers} worker(s) x {tpw} thread(s)", workers=n_workers,
                                    threads_per_worker=tpw))
            execs = [None] + [DaskExecutor(c) for c in clients[1:]]
            for ex in execs:                      # warm-up: JIT cache, files opened, FFT plans
                one(ex)
            times = [[] for _ in configs]
            sent = [[] for _ in configs]
            load = [[] for _ in configs]          # 1-minute load average before each timed run
            recs = [None] * len(configs)
            for _ in range(args.repeats):         # round robin, so that a change of load hits all alike
                for i, (client, ex) in enumerate(zip(clients, execs)):
                    s0 = _worker_sent(client) if client else 0
                    load[i].append(os.getloadavg()[0])
                    t0 = time.perf_counter()
                    recs[i] = one(ex)
                    times[i].append(time.perf_counter() - t0)
                    sent[i].append((_worker_sent(client) - s0) if client else 0)
        finally:
            for client in clients[1:]:
                client.close()
        base = min(times[0])
        for i, cfg in enumerate(configs):
            rec, t = recs[i], min(times[i])
            cfg.update(seconds=times[i], loadavg_before=load[i], seconds_min=t, seconds_median=statistics.median(times[i]),
                       seconds_estep=rec["seconds_estep"], overhead=t / base - 1.0,
                       overhead_median=statistics.median(times[i]) / statistics.median(times[0]) - 1.0,
                       loglik=rec["loglik"], loglik_rel_diff=abs(rec["loglik"] / recs[0]["loglik"] - 1.0))
            if execs[i] is not None:
                call = execs[i].last_call
                cfg.update(tasks=call["tasks"], chunk=call["chunk"], chunks_per_task=call["chunks_per_task"],
                           job_bytes=call["job_bytes"], payload_bytes=call["payload_bytes"],
                           result_bytes=call["result_bytes"],
                           scheduler_bytes=2 * call["job_bytes"] + call["payload_bytes"] + 2 * call["result_bytes"],
                           worker_sent_bytes=int(statistics.median(sent[i])))
                print(f"  {cfg['config']:<28s} {t:7.3f} s  overhead {100 * cfg['overhead']:+.1f}% "
                      f"(medians {100 * cfg['overhead_median']:+.1f}%)  {cfg['tasks']} tasks, scheduler "
                      f"{cfg['scheduler_bytes'] / 2**20:.2f} MiB, workers sent {cfg['worker_sent_bytes'] / 2**20:.2f} "
                      "MiB per iteration", flush=True)
            else:
                print(f"  {cfg['config']:<28s} {t:7.3f} s", flush=True)
            results.append(cfg)
    out = dict(benchmark="distributed", size="small", L=L, lmax=lmax, M=basis.M, K=K, patches=source.n_patches,
               micrographs=len(paths), chunk=args.chunk, threads=T, repeats=args.repeats,
               goal="overhead < 10% against in-process on the same cores",
               machine=_machine(), versions=_versions(), results=results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
