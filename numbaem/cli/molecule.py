"""Write a seeded synthetic test molecule (a few hundred Gaussian atoms in a compact, asymmetric blob).

Example: numbaem molecule -o truth.mrc --size 41 --seed 0
         numbaem molecule -o homolog.mrc --size 41 --seed 1 --homolog-of 0
"""
import logging

from ..runtime.validate import check_L
from ..data.io import write_volume
from ..sim.molecule import synthetic_molecule
from ._common import emit_json, nonneg_float, positive_float, positive_int

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("-o", "--output", required=True, metavar="VOL.mrc", help="output MRC volume")
    p.add_argument("--size", type=positive_int, default=41, metavar="L0",
                   help="side of the volume in voxels, odd (default 41)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the molecule (default 0)")
    p.add_argument("--homolog-of", type=int, default=None, metavar="SEED",
                   help="make a nearby structure of the molecule of this seed (like an AlphaFold "
                        "prediction near the truth), perturbed with --seed")
    p.add_argument("--homolog-strength", type=nonneg_float, default=0.2,
                   help="size of the homolog's perturbation (default 0.2: correlation about 0.9)")
    p.add_argument("--atoms", type=positive_int, default=300, help="number of Gaussian atoms (default 300)")
    p.add_argument("--voxel-size", type=positive_float, default=1.0, metavar="A",
                   help="voxel size written to the header, in Angstrom (default 1)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def main(args):
    L0 = check_L(args.size, "--size")
    vol = synthetic_molecule(L0, rng=args.seed, n_atoms=args.atoms, homolog_of=args.homolog_of,
                             homolog_strength=args.homolog_strength)
    write_volume(args.output, vol, voxel_size=args.voxel_size, force=args.force)
    logger.info("wrote %s (%d^3 voxels, seed %d%s)", args.output, L0, args.seed,
                f", homolog of seed {args.homolog_of}" if args.homolog_of is not None else "")
    if args.json:
        emit_json(dict(output=args.output, size=L0, seed=args.seed, homolog_of=args.homolog_of))
