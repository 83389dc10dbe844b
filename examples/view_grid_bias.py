"""Why the orientation prior is updated only on fine rotation grids: the estimate per grid.

Simulates the preferred-view micrographs of ``examples/orientation_junk.py`` at one SNR (the
same truth, seeds and draws: Method 1, a synthetic molecule of side ``L0``, ``--count``
350 x 350 micrographs, density 0.1, ``top:0.6``), keeps the true volume fixed, and for each
rotation grid runs one E-step (uniform prior) keeping each patch's posterior mass by HEALPix
cell, then iterates the EM over the cell weights and the empty-patch probability alone
(exact: with the volume fixed a patch's likelihood under new weights ``t_b`` is
proportional to ``e_j upsilon + (1 - upsilon) sum_b m_jb t_b``, ``e_j`` and ``m_jb`` the
E-step's empty and per-cell masses divided by their old priors) to the maximiser of the
likelihood over the weights. Prints and writes (JSON) the total variation distance to the
truth's distribution of one update (what an EM iteration does) and of the maximiser, and
the maximiser's largest density relative to uniform, for each grid; the truth's is the
reference, and the particles' own sample shows the floor a finite sample sets::

    python examples/view_grid_bias.py --out examples/results/view_grid_bias
"""
import argparse
import json
import os
import time

import numpy as np

import numbaem
from numbaem.em.estep import SufficientStats, e_step_chunk, projection_spectra
from numbaem.model import hopf, viewprior
from numbaem.model.basis import FBBasis, expand
from numbaem.model.projection import project
from numbaem.model.rotations import rotation_grid
from numbaem.sim.simulate import simulate_micrographs

from orientation_junk import cells_of_directions, truth_cells     # the example beside this one

UPSILON0 = 0.7


def cell_masses(Y, spectra, sigma2, bins, B, chunk=32):
    """Each patch's posterior mass by cell (n, B) and in the empty state (n,) of one E-step
    with the uniform prior and ``upsilon = UPSILON0``."""
    P, E = np.zeros((len(Y), B)), np.zeros(len(Y))
    for i in range(0, len(Y), chunk):
        st = SufficientStats.zeros(spectra.K, Y.shape[1])
        _, w, w_empty = e_step_chunk(Y[i:i + chunk], spectra, UPSILON0, sigma2, st, keep_posteriors=True)
        Wk = w.sum(axis=(2, 3))                                   # (n, K)
        for b in range(B):
            P[i:i + chunk, b] = Wk[:, bins == b].sum(axis=1)
        E[i:i + chunk] = w_empty
    return P, E


def weights_em(P, E, n_b, steps):
    """EM over the cell weights and upsilon with the volume fixed: returns the cell
    distributions after each step (list of (B,)) and the final upsilon.

    ``t_b`` (mean 1 over the grid's rotations: ``sum_b n_b t_b = K``) scales a rotation's
    prior in cell ``b`` against uniform; the E-step's masses divided by their priors are the
    likelihoods up to a per-patch factor.
    """
    K = n_b.sum()
    e = E / UPSILON0
    m = P / (1 - UPSILON0)
    t, u = np.ones(len(n_b)), UPSILON0
    out = []
    for _ in range(steps):
        mol = (1 - u) * m * t                      # (n, B)
        tot = u * e + mol.sum(axis=1)
        R = mol / tot[:, None]
        u = float(np.mean(u * e / tot))
        r = np.where(n_b > 0, R.sum(axis=0) / np.maximum(n_b, 1), 0.0)
        t = K * r / np.sum(n_b * r)
        out.append(r / r.sum())                    # equal-area cells: density per cell = r_b
    return out, u


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="view-grid-bias")
    p.add_argument("--L", type=int, default=11)
    p.add_argument("--L0", type=int, default=33)
    p.add_argument("--lmax", type=int, default=8)
    p.add_argument("--snr", type=float, default=1.0)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--nside", type=int, default=2)
    p.add_argument("--grids", default="300,1000,3000,hopf1,hopf2",
                   help="K of near-uniform grids, or hopfR for the Hopf level R")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    L, B = args.L, 12 * args.nside ** 2
    truth_full = numbaem.synthetic_molecule(args.L0, rng=args.seed)
    sim = simulate_micrographs(truth_full, L, micrograph_size=350, method=1, snr=args.snr, count=args.count,
                               rng=np.random.default_rng([args.seed, int(1000 * args.snr), 0]), views="top:0.6",
                               density=0.1)
    basis = FBBasis(L, args.lmax)
    theta = expand(sim.truth_volume, basis)
    src = numbaem.PatchSource(sim.micrographs, L)
    Y = src.get(np.arange(src.n_patches))
    truth = truth_cells("top:0.6", args.nside)
    particles = cells_of_directions(np.concatenate([np.asarray(r)[:, 2, :] for r in sim.rotations]), args.nside)
    uniform = np.full(B, 1.0 / B)
    res = dict(args=vars(args), patches=len(Y), n_particles=int(sum(len(r) for r in sim.rotations)),
               tv_uniform=viewprior.tv_distance(uniform, truth),
               tv_particles=viewprior.tv_distance(particles, truth),
               cell_size_deg=float(np.degrees(viewprior.cell_size(args.nside))), grids=[])
    print(f"L = {L}, SNR {args.snr:g}, {res['n_particles']} particles in {len(Y)} patches, {B} cells of "
          f"{res['cell_size_deg']:.1f} degrees: TV to the truth of uniform {res['tv_uniform']:.3f}, "
          f"of the particles' own directions {res['tv_particles']:.3f}", flush=True)
    for g in args.grids.split(","):
        rots = hopf.rotations(int(g[4:])) if g.startswith("hopf") else rotation_grid(int(g))
        t0 = time.perf_counter()
        bins = viewprior.bins_of_rotations(rots, args.nside)
        spectra = projection_spectra(project(theta, basis, rots), route="direct", precision="float64")
        P, E = cell_masses(Y, spectra, sim.sigma2, bins, B)
        dists, u = weights_em(P, E, np.bincount(bins, minlength=B).astype(float), args.steps)
        tv = [viewprior.tv_distance(d, truth) for d in dists]
        step = float(np.degrees(viewprior.grid_step(len(rots))))
        row = dict(grid=g, K=len(rots), step_deg=step, step_over_cell=step / res["cell_size_deg"],
                   tv_one_update=tv[0], tv_by_step=tv, tv_maximiser=tv[-1], upsilon=u,
                   max_density_maximiser=float(dists[-1].max() * B), max_density_truth=float(truth.max() * B),
                   seconds=time.perf_counter() - t0, distribution_maximiser=dists[-1].tolist())
        res["grids"].append(row)
        print(f"  {g:>6s}: K = {len(rots)}, step {step:.1f} deg ({row['step_over_cell']:.2f} of a cell): TV one "
              f"update {tv[0]:.3f}, maximiser {tv[-1]:.3f} (after {args.steps} steps; "
              f"{tv[min(9, len(tv) - 1)]:.3f} after {min(10, len(tv))}), "
              f"max density {row['max_density_maximiser']:.1f} (truth {row['max_density_truth']:.1f})", flush=True)
        with open(os.path.join(args.out, "view_grid_bias.json"), "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
