"""Run the EM's E-step on a SLURM cluster with dask-jobqueue.

Usage (on a login node, or inside a small SLURM job of its own, with the micrographs
on a file system that every compute node mounts at the same path):

    pip install dask-jobqueue
    python examples/slurm_cluster.py /shared/project/micrographs/*.mrc \
        --L 21 --noise-var 1.0 --jobs 8 --out /shared/project/volume.mrc

How the pieces are sized
------------------------
This script (the *driver*) projects the volume, runs the M-step and collects one set
of sufficient statistics per iteration. It needs memory for the operator
(``K L^2 M`` doubles, or one block of it) and ``H`` (``M^2``), not for the data.

Each SLURM job runs ``PROCESSES`` Dask worker processes. A worker process runs one
E-step task at a time (one Dask thread) and gives that task ``THREADS`` numba / FFTW
threads. So, per job:

- ``cores=PROCESSES``: dask-jobqueue gives each worker ``cores // processes`` Dask
  threads, and we want exactly one per worker (several tasks in one process would
  fight over the numba threads);
- ``job_cpu=PROCESSES * THREADS``: the CPUs SLURM books (``--cpus-per-task``);
- ``NUMBAEM_THREADS=THREADS`` exported in the job script: the number the tasks use
  (Dask's nanny sets ``OMP_NUM_THREADS=1``, which numbaem ignores on workers);
- ``memory``: the whole job's memory; each worker's limit is ``memory / PROCESSES``.
  One task holds about ``chunk * K * (2L)^2 * 16`` bytes of work arrays (e.g. 256
  patches at ``K=1000, L=21``: 7 GiB); numbaem picks chunks that fit 60% of the
  worker's limit, so 8-16 GiB per worker suits the paper's sizes.

Few processes with many threads (e.g. 2 x 16 on a 32-core node) keep fewer copies of
the FFT plans and spectra; more processes with fewer threads scale better when the
numba kernels stop gaining from threads (around 8 per process). ``THREADS`` equal to
the cores of one socket is a good start.

The micrographs travel by path: each worker opens them memory-mapped (once per
process) and reads only its own patches, so they must sit on a shared file system
(``/scratch``, ``/project``, ...) under the same absolute path everywhere. Only the
projection spectra (``K x 2L x (L+1)`` complex numbers, a few MiB) go out, and one
set of statistics of the same size comes back, per iteration.
"""
import argparse
import logging

import numpy as np

from numbaem.em.distributed import DaskExecutor
from numbaem.em.run import reconstruct
from numbaem.em.schedule import parse_schedule
from numbaem.runtime.errors import NumbaemError
from numbaem.data.io import write_volume
from numbaem.data.patches import PatchSource

try:
    from dask_jobqueue import SLURMCluster
except ImportError:  # pragma: no cover - depends on the site
    SLURMCluster = None

# --------------------------------------------------------------------------- sizing: adapt to your nodes
PROCESSES = 2            # worker processes per SLURM job (per node, with one job per node)
THREADS = 16             # numba / FFTW threads per worker process
MEMORY = "64GiB"         # per job, split evenly between its worker processes
WALLTIME = "04:00:00"
QUEUE = None             # SLURM partition (#SBATCH -p), None: the site default
ACCOUNT = None           # SLURM account (#SBATCH -A)


def make_cluster(jobs):
    if SLURMCluster is None:
        raise SystemExit("this example needs dask-jobqueue, which is not installed: pip install dask-jobqueue "
                         "(or, without SLURM, use numbaem.em.distributed.start_local_cluster / connect)")
    cluster = SLURMCluster(
        cores=PROCESSES,                      # -> one Dask thread per worker process
        processes=PROCESSES,
        job_cpu=PROCESSES * THREADS,          # CPUs booked from SLURM
        memory=MEMORY,
        walltime=WALLTIME,
        queue=QUEUE,
        account=ACCOUNT,
        job_script_prologue=[
            f"export NUMBAEM_THREADS={THREADS}",
            f"export NUMBA_NUM_THREADS={THREADS}",
            # "module load python", "source /shared/project/venv/bin/activate",
        ],
        local_directory="$TMPDIR",            # Dask's spill space: node-local disk, not the shared one
        # interface="ib0",                    # the fast network, if the nodes have one
    )
    cluster.scale(jobs=jobs)
    return cluster


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("micrographs", nargs="+", help="MRC files on a shared file system")
    ap.add_argument("--L", type=int, required=True, help="patch size")
    ap.add_argument("--noise-var", type=float, required=True, help="noise variance sigma^2 of the pixels")
    ap.add_argument("--schedule", default=None,
                    help="e.g. 'lmax=2,iters=4,frac=0.1,rotations=100;lmax=5,iters=6,frac=0.1,rotations=1000'")
    ap.add_argument("--jobs", type=int, default=4, help="SLURM jobs of PROCESSES workers each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="volume.mrc")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from distributed import Client

    source = PatchSource.from_files(args.micrographs, args.L)   # opened here too, to count the patches
    cluster = make_cluster(args.jobs)
    client = Client(cluster)
    try:
        print(f"Dask dashboard: {client.dashboard_link}")
        client.wait_for_workers(PROCESSES, timeout=600)           # start as soon as one job is up
        executor = DaskExecutor(client, threads=THREADS)
        state = reconstruct(source, "random", sigma2=args.noise_var,
                            schedule=parse_schedule(args.schedule) if args.schedule else None,
                            rng=np.random.default_rng(args.seed), executor=executor)
    except NumbaemError as exc:
        raise SystemExit(str(exc)) from None
    finally:
        client.close()
        cluster.close()

    write_volume(args.out, state.volume, state.pixel_size, force=True)
    print(f"wrote {args.out}: {len(state.history)} iterations, "
          f"log-likelihood per patch {state.history[-1]['loglik_per_patch']:.6g}")


if __name__ == "__main__":
    main()
