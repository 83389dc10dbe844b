"""Pick particles in micrographs: template matching with an initial model's projections, or a blob detector.

The pick-then-EM baseline's first half (the second is reconstruct --particles coords.star).
With --init, the templates are the projections of the initial model (a volume of side L,
an atomic model, or a shipped entry) on a grid of --rotations rotations; without it, one
Laplacian-of-Gaussian blob of --blob-diameter pixels. The score of a position is the
normalised correlation <patch, template> / (sigma ||template||), standard normal on noise;
picks are its peaks at least --min-distance apart, above --threshold or, by default, above
the score that white noise of the same variance exceeds about --false-picks times per
micrograph (measured on seeded noise micrographs).

Writes a RELION coordinate STAR file: data_particles with rlnMicrographName (the file as
given), rlnCoordinateX (along the file's columns, its fast axis) and rlnCoordinateY (along
its rows), the particle's centre pixel counted from 0, and rlnAutopickFigureOfMerit (the
score).

Example: numbaem pick mic_000.mrc mic_001.mrc --patch-size 11 --init start.mrc --noise-var 0.5 -o coords.star
"""
import logging

import numpy as np

from ..data.coordinates import write_coordinates
from ..data.io import read_image
from ..runtime.errors import NumbaemError
from ..runtime.validate import check_L
from ..runtime.threads import use_threads
from ._common import add_threads, check_outputs, emit_json, nonneg_int, positive_float, positive_int

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("micrographs", nargs="+", metavar="MIC.mrc", help="micrograph MRC files")
    p.add_argument("-o", "--output", required=True, metavar="coords.star", help="RELION coordinate STAR file")
    p.add_argument("--patch-size", type=int, required=True, metavar="L", help="particle box side in pixels, odd")
    p.add_argument("--init", default=None, metavar="INIT.mrc|MODEL.cif",
                   help="initial model whose projections are the templates: a volume of side L (or larger, with "
                        "--downsample-init), a PDB / mmCIF file or a shipped entry (1hvr, 4e43); without it a blob "
                        "detector")
    p.add_argument("--downsample-init", action="store_true", help="Fourier-downsample a larger initial volume to side L")
    p.add_argument("--pixel-size", type=positive_float, default=None, metavar="A",
                   help="the micrographs' pixel size in Angstrom (for an atomic model; default: the MRC header)")
    p.add_argument("--rotations", type=positive_int, default=300, metavar="K",
                   help="rotations of the template grid (default 300)")
    p.add_argument("--blob-diameter", type=positive_float, default=None, metavar="D",
                   help="blob detector: the particle's diameter in pixels (default 0.8 L)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--noise-var", type=positive_float, metavar="S2", help="noise variance of one micrograph pixel")
    n.add_argument("--estimate-noise", action="store_true",
                   help="estimate it from the low-signal patches of a seeded sample (as reconstruct does)")
    p.add_argument("--threshold", type=float, default=None, metavar="Z",
                   help="score threshold in units of the noise (default: calibrated by --false-picks)")
    p.add_argument("--false-picks", type=positive_float, default=1.0, metavar="F",
                   help="false picks per micrograph expected on noise alone, for the default threshold (default 1)")
    p.add_argument("--min-distance", type=positive_int, default=None, metavar="D",
                   help="least distance between two picks in pixels (Chebyshev; default L)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the calibration noise and the noise sample")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary on standard output")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def templates_from(init, L, source, rotations, downsample_init=False, pixel_size=None):
    """Projections of an initial model (file or shipped entry) on ``rotations`` grid rotations: (K, L, L)."""
    from ..model.basis import FBBasis, expand
    from ..model.projection import project
    from ..model.rotations import rotation_grid
    from .reconstruct import load_init

    vol = load_init(init, L, downsample_init, source, pixel_size)
    basis = FBBasis(L, FBBasis.max_lmax(L))
    return project(expand(vol, basis), basis, rotation_grid(rotations))


def main(args):
    from ..analysis.picking import log_template, pick_particles
    from ..data.patches import PatchSource
    from ..em.run import initial_noise_variance, sample_patches

    L = check_L(args.patch_size, "--patch-size")
    check_outputs([args.output], args.force)
    source = PatchSource.from_files(args.micrographs, L)
    if args.noise_var is None and not args.estimate_noise:
        raise NumbaemError("the noise variance is unknown: pass --noise-var S2 or --estimate-noise")
    rng = np.random.default_rng(args.seed)
    sigma2 = args.noise_var
    if sigma2 is None:
        sigma2 = initial_noise_variance(sample_patches(source, rng))
        logger.info("noise variance %.4g (from the low-signal patches of a sample)", sigma2)
    with use_threads(args.threads):
        if args.init is not None:
            if args.blob_diameter is not None:
                raise NumbaemError("--blob-diameter is for the blob detector; leave it out with --init")
            templates = templates_from(args.init, L, source, args.rotations, args.downsample_init, args.pixel_size)
            method = f"templates: {len(templates)} projections of {args.init}"
        else:
            templates = log_template(L, args.blob_diameter or 0.8 * L)[None]
            method = f"blob detector: LoG of diameter {args.blob_diameter or 0.8 * L:g} pixels"
        images = [np.asarray(read_image(p)[0]) for p in args.micrographs]
        picks, _, thr = pick_particles(images, templates, sigma2, min_distance=args.min_distance,
                                       threshold=args.threshold, false_picks=args.false_picks, rng=rng)
    names = [args.micrographs[m] for m in picks.micrograph]
    write_coordinates(args.output, names, picks.centre, extra={"rlnAutopickFigureOfMerit": picks.score},
                      force=args.force)
    logger.info("%s; threshold %.3f; %d picks in %d micrograph(s); wrote %s", method, thr, len(picks),
                len(args.micrographs), args.output)
    if args.json:
        emit_json(dict(output=args.output, picks=len(picks), threshold=thr, sigma2=sigma2, method=method,
                       per_micrograph=[int(np.count_nonzero(picks.micrograph == m))
                                       for m in range(len(args.micrographs))]))
