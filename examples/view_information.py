"""How much the data say about viewing directions: one E-step with the true volume.

Simulates preferred-view micrographs as ``examples/orientation_junk.py`` does (Method 1, a
synthetic molecule of side ``3 L``, two 350 x 350 micrographs, density 0.1, ``top:0.6``),
runs one E-step with the true volume and a uniform prior on ``K`` near-uniform rotations,
and prints the total variation distance from the truth's distribution over the 48 HEALPix
cells to the posterior mass by cell (each cell's mass over its rotations, normalised),
for all patches and for the patches of most energy. The closer to 0, the more an
orientation prior can learn from such data (README, "Micrographs as they come")::

    python examples/view_information.py --L 7 --lmax 4
    python examples/view_information.py --L 11 --lmax 8
"""
import argparse

import numpy as np

import numbaem
from numbaem.em.estep import SufficientStats, e_step_chunk, projection_spectra
from numbaem.model import viewprior
from numbaem.model.basis import FBBasis, expand
from numbaem.model.projection import project
from numbaem.model.rotations import rotation_grid
from numbaem.sim.molecule import synthetic_molecule
from numbaem.sim.simulate import simulate_micrographs

from orientation_junk import truth_cells     # the example beside this one (same truth, same draws)


def cell_tv(Y, spectra, sigma2, bins, truth):
    """TV from ``truth`` to the posterior mass by cell of one E-step of the patches ``Y``."""
    st = SufficientStats.zeros(spectra.K, Y.shape[1])
    e_step_chunk(Y, spectra, 0.7, sigma2, st)
    n_b = np.bincount(bins, minlength=len(truth))
    r = np.bincount(bins, weights=st.W.sum(axis=(1, 2)), minlength=len(truth)) / np.maximum(n_b, 1)
    return viewprior.tv_distance(r / r.sum(), truth)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--L", type=int, default=7)
    p.add_argument("--lmax", type=int, default=4)
    p.add_argument("--snr", type=float, default=10.0)
    p.add_argument("--K", type=int, default=3000)
    args = p.parse_args()
    L = args.L
    sim = simulate_micrographs(synthetic_molecule(3 * L, rng=0), L, micrograph_size=350, method=1, snr=args.snr,
                               count=2, rng=np.random.default_rng(1), views="top:0.6", density=0.1)
    basis = FBBasis(L, args.lmax)
    theta = expand(sim.truth_volume, basis)
    src = numbaem.PatchSource(sim.micrographs, L)
    Y = src.get(np.arange(src.n_patches))
    rots = rotation_grid(args.K)
    bins = viewprior.bins_of_rotations(rots, 2)
    spectra = projection_spectra(project(theta, basis, rots), route="direct")
    truth = truth_cells("top:0.6", 2)
    print(f"L = {L}, SNR {args.snr}: TV of the uniform distribution {viewprior.tv_distance(np.full(48, 1 / 48), truth):.3f}")
    print(f"  all {len(Y)} patches: {cell_tv(Y, spectra, sim.sigma2, bins, truth):.3f}")
    e = (Y ** 2).sum(axis=(1, 2))
    for frac in (0.05, 0.1, 0.3):
        sel = np.argsort(-e)[:int(frac * len(Y))]
        print(f"  the {frac:.0%} of most energy: {cell_tv(Y[sel], spectra, sim.sigma2, bins, truth):.3f}")


if __name__ == "__main__":
    main()
