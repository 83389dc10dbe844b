"""What the well-separated patch model costs on crowded micrographs (issue 13, item 3).

The patch model (docs/theory.md section 4) assumes each L x L patch holds at most one
projection, which holds when positions are at least 2L - 1 apart ("separated"). With
"arbitrary" spacing projections only do not overlap, so a patch can hold parts of up to
four. This example simulates both at the same densities (and arbitrary spacing at the
higher densities only it reaches), reconstructs each with the same schedule from the
same homolog start, and records:

- the fraction of non-empty patches that hold parts of more than one projection;
- the aligned relative error and FSC against the truth after the run;

so the bias of the model on crowded data is measured against the same data made
well-separated. Writes crowding.json and crowding.png into --out.

    python examples/crowding.py --out crowding-run            # a few minutes on 2 cores
    python examples/crowding.py --out crowding-run --snr 0.25
"""
import argparse
import json
import logging
import os

import numpy as np

import numbaem
from numbaem.analysis.compare import compare_to_truth
from numbaem.model.basis import FBBasis, expand
from numbaem.runtime.fourier import downsample
from numbaem.sim.simulate import simulate_micrographs


def patch_occupancy(positions, shape, L):
    """Projections touching each patch of the L x L grid: array (rows, cols) of counts."""
    rows, cols = shape[0] // L, shape[1] // L
    counts = np.zeros((rows, cols), np.int64)
    for s0, s1 in positions:
        r0, r1 = s0 // L, min((s0 + L - 1) // L, rows - 1)
        c0, c1 = s1 // L, min((s1 + L - 1) // L, cols - 1)
        counts[r0:r1 + 1, c0:c1 + 1] += 1
    return counts


def run_one(truth_full, init, spacing, density, args, rng):
    L = args.L
    sim = simulate_micrographs(truth_full, L, micrograph_size=args.micrograph_size, method=1, density=density,
                               snr=args.snr, spacing=spacing, count=args.count, rng=rng)
    occ = np.concatenate([patch_occupancy(p, sim.shape, L).ravel() for p in sim.positions])
    nonempty = occ[occ > 0]
    source = numbaem.PatchSource(sim.micrographs, L)
    result = numbaem.reconstruct(source, init, sigma2=sim.sigma2, schedule=numbaem.parse_schedule(args.schedule),
                                 rng=np.random.default_rng(args.seed), progress=False)
    figures = compare_to_truth(result.theta, result.basis, sim.truth_volume)
    return dict(spacing=spacing, density=density, density_achieved=sim.density_achieved,
                snr=args.snr, snr_downsampled=sim.snr_downsampled,
                shared_fraction=float(np.mean(nonempty > 1)) if len(nonempty) else 0.0,
                upsilon=result.upsilon, **figures,
                seconds_per_iteration=float(np.mean([r["seconds"] for r in result.history])))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="crowding-run")
    p.add_argument("--L", type=int, default=7)
    p.add_argument("--L0", type=int, default=21, help="side of the synthetic molecule (Method 1 generation size)")
    p.add_argument("--snr", type=float, default=1.0, help="SNR at the generation size (default 1)")
    p.add_argument("--micrograph-size", type=int, default=350)
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--densities", default="0.05,0.1,0.15", help="densities run with both spacings")
    p.add_argument("--crowded", default="0.25,0.35", help="densities run with arbitrary spacing only")
    p.add_argument("--schedule", default="lmax=2,iters=3,rotations=100;lmax=4,iters=4,rotations=300")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.makedirs(args.out, exist_ok=True)
    truth_full = numbaem.synthetic_molecule(args.L0, rng=args.seed)
    homolog = numbaem.synthetic_molecule(args.L0, rng=args.seed + 1, homolog_of=args.seed, homolog_strength=0.6)
    basis = FBBasis(args.L, FBBasis.max_lmax(args.L))
    init = numbaem.synthesize(expand(downsample(homolog, args.L), basis), basis)
    runs = []
    plan = [(s, float(d)) for d in args.densities.split(",") for s in ("separated", "arbitrary")]
    plan += [("arbitrary", float(d)) for d in args.crowded.split(",") if d]
    for spacing, density in plan:
        rec = run_one(truth_full, init, spacing, density, args, np.random.default_rng([args.seed, len(runs)]))
        runs.append(rec)
        print(f"{spacing:9s} density {density:.2f}: {100 * rec['shared_fraction']:5.1f}% of non-empty patches "
              f"shared, aligned relative error {rec['relative_error']:.3f}", flush=True)
    with open(os.path.join(args.out, "crowding.json"), "w") as fh:
        json.dump(dict(args=vars(args), runs=runs), fh, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for spacing, mark in (("separated", "o-"), ("arbitrary", "s--")):
        rs = [r for r in runs if r["spacing"] == spacing]
        ax[0].plot([r["density_achieved"] for r in rs], [r["relative_error"] for r in rs], mark, label=spacing)
        ax[1].plot([r["density_achieved"] for r in rs], [100 * r["shared_fraction"] for r in rs], mark, label=spacing)
    ax[0].set_xlabel("density")
    ax[0].set_ylabel("aligned relative error")
    ax[1].set_xlabel("density")
    ax[1].set_ylabel("non-empty patches shared (%)")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"well-separated patch model on crowded micrographs (L = {args.L}, SNR {args.snr:g})")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "crowding.png"), dpi=110)


if __name__ == "__main__":
    main()
