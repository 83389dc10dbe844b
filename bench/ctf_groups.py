"""Bench: time per EM iteration against the number of CTF groups (theory section 11).

    python bench/ctf_groups.py                       # paper-v1 size: L=11, lmax=10 (M=219), K=560, 60,000 patches
    python bench/ctf_groups.py --patches 6000        # the same per-iteration costs on fewer patches
    python bench/ctf_groups.py --quick               # smoke test (seconds)

Standalone (the ``bench`` package is being rewritten on another branch). Sixteen synthetic
micrographs (white noise of variance 1 and projections of a random Fourier-Bessel volume at
SNR 1 on a 2L lattice, well separated) split into 1, 4 or 16 groups of equal size, each
group with its own CTF (defocus 1-2.5 um, 26.6 A working pixels), against the same data
without filters (the model of sections 4-6). Each case runs one warm-up iteration (numba,
FFTW plans, the filters) and then ``--reps`` timed ones of :func:`numbaem.em.run.em_iteration`
(full batch); recorded: the iteration, E-step and M-step seconds (best of the reps), the
planned peak, and the ratio to the case without filters measured in the same run.
Writes ``bench-ctf_groups-<UTC>.json`` into ``--out``.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numbaem.data.patches import PatchSource  # noqa: E402
from numbaem.em.run import EMState, em_iteration, stage_plan  # noqa: E402
from numbaem.em.schedule import Stage  # noqa: E402
from numbaem.model.basis import FBBasis  # noqa: E402
from numbaem.model.ctf import CTFParams, ImageFilter  # noqa: E402
from numbaem.model.projection import Operator, project  # noqa: E402
from numbaem.model.rotations import random_rotations, rotation_grid  # noqa: E402
from numbaem.runtime.threads import use_threads  # noqa: E402

FULL = dict(L=11, lmax=10, K=560, patches=60_000, micrographs=16)
QUICK = dict(L=11, lmax=4, K=20, patches=3_200, micrographs=16)
PIXEL = 26.6


def synthetic(L, lmax, n_patches, n_mic, rng):
    """``n_mic`` micrographs of about ``n_patches / n_mic`` patches each (float32, white noise, SNR 1)."""
    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M)
    per = max(1, n_patches // n_mic)
    rows = int(math.sqrt(per))
    cols = per // rows
    mics = []
    for _ in range(n_mic):
        img = rng.standard_normal((rows * L, cols * L)).astype(np.float32)
        cells = [(a, b) for a in range(0, rows * L - 2 * L + 1, 2 * L) for b in range(0, cols * L - 2 * L + 1, 2 * L)]
        proj = project(theta, basis, random_rotations(len(cells), rng))
        proj /= np.sqrt(np.mean(proj ** 2))
        for (a, b), p in zip(cells, proj):
            s0, s1 = rng.integers(0, L, 2)
            img[a + s0:a + s0 + L, b + s1:b + s1 + L] += p
        mics.append(img)
    return mics, theta


def filters_for(n_groups):
    dfs = np.linspace(1e4, 2.5e4, n_groups)
    return [ImageFilter(PIXEL, CTFParams(df, df * 0.97, 30.0)) for df in dfs]


def run_case(mics, L, theta, lmax, K, n_groups, reps, rng_seed, budget):
    if n_groups is None:
        src = PatchSource(mics, L)
    else:
        groups = np.repeat(np.arange(n_groups), len(mics) // n_groups)
        src = PatchSource(mics, L, groups=groups, filters=filters_for(n_groups))
    basis = FBBasis(L, lmax)
    stage = Stage(lmax, reps + 1, 1.0, K)
    plan = stage_plan(budget, basis, K, src.n_patches, n_groups)
    t0 = time.perf_counter()
    op = Operator(basis, rotation_grid(K), plan.parts["operator"])
    t_op = time.perf_counter() - t0
    state = EMState(theta=theta.copy(), lmax=lmax, upsilon=0.5, sigma2=1.0, rng=np.random.default_rng(rng_seed))
    t0 = time.perf_counter()
    warm = em_iteration(state, src, op, stage, budget=budget)
    warm_s = time.perf_counter() - t0
    recs = [em_iteration(state, src, op, stage, budget=budget) for _ in range(reps)]
    best = min(recs, key=lambda r: r["seconds"])
    return dict(groups=n_groups, patches=src.n_patches, seconds=best["seconds"], seconds_estep=best["seconds_estep"],
                seconds_mstep=best["seconds_mstep"], all_seconds=[r["seconds"] for r in recs],
                warmup_seconds=warm_s, warmup_seconds_estep=warm["seconds_estep"], operator_seconds=t_op,
                chunk=best["chunk"], planned_peak_bytes=best["planned_peak_bytes"], peak_memory=best["peak_memory"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--patches", type=int, default=None)
    p.add_argument("--groups", default="1,4,16")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--memory", type=float, default=4.0, help="budget in GiB (default 4)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sz = dict(QUICK if args.quick else FULL)
    if args.patches:
        sz["patches"] = args.patches
    budget = int(args.memory * 2 ** 30)
    rng = np.random.default_rng(args.seed)
    mics, theta_true = synthetic(sz["L"], sz["lmax"], sz["patches"], sz["micrographs"], rng)
    theta = theta_true * (1 + 0.3 * rng.standard_normal(theta_true.shape))
    cases = [None] + [int(g) for g in args.groups.split(",")]
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    with use_threads(args.threads):
        results = [run_case(mics, sz["L"], theta, sz["lmax"], sz["K"], g, args.reps, args.seed, budget) for g in cases]
    base = results[0]
    for r in results[1:]:
        r["ratio_to_no_filter"] = r["seconds"] / base["seconds"]
        r["estep_ratio_to_no_filter"] = r["seconds_estep"] / base["seconds_estep"]
        r["mstep_ratio_to_no_filter"] = r["seconds_mstep"] / base["seconds_mstep"]
    import numba
    out = dict(schema=1, suite="ctf_groups", created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               argv=sys.argv, quick=args.quick, sizes=sz, M=FBBasis(sz["L"], sz["lmax"]).M, budget=budget,
               threads=numba.get_num_threads() if args.threads is None else args.threads,
               loadavg_start=list(load0), loadavg_end=list(os.getloadavg()), wall_seconds=time.perf_counter() - t_start,
               machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
               versions=dict(python=platform.python_version(), numpy=np.__version__, numba=numba.__version__),
               cases=results)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.out, f"bench-ctf_groups-{stamp}.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    for r in results:
        print(f"groups {r['groups']!s:>4}: {r['seconds']:8.2f} s/iteration (E-step {r['seconds_estep']:.2f} s, "
              f"M-step {r['seconds_mstep']:.2f} s)" + (f", x{r['ratio_to_no_filter']:.2f}" if "ratio_to_no_filter"
                                                       in r else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
