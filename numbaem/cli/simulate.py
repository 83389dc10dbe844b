"""Simulate micrographs from a volume (theory section 1), with a JSON truth file.

Method 1 (what real data look like): project the full-size voxel map, place, add noise,
then Fourier-downsample the micrograph to the patch scale. Method 2: downsample the
volume to side L first and generate with the package's own band-limited operator.
Writes MIC.mrc (or MIC_000.mrc, ... for --count > 1), MIC.json (positions, rotations,
sigma^2, SNR before and after downsampling, L, method, the command) and MIC.truth.mrc
(the band-limited truth at side L). With --defocus, each whole micrograph is filtered by
a CTF (particles dark, CTFFIND's sign) and MIC_ctf.star (RELION 3.1) records it for
reconstruct --ctf; --noise pink colours the noise.
"""
import logging
import shlex
import sys

from ..runtime.validate import check_L
from ..runtime.errors import NumbaemError
from ..data.io import read_volume
from ..runtime.threads import use_threads
from ._common import add_threads, check_outputs, emit_json, nonneg_float, nonneg_int, positive_float, positive_int

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("volume", metavar="VOLUME.mrc", help="cubic MRC map (side L0 >= L)")
    p.add_argument("-o", "--output", required=True, metavar="MIC.mrc", help="output micrograph (base name)")
    p.add_argument("--patch-size", type=int, required=True, metavar="L",
                   help="side of a particle projection after downsampling, odd, in pixels")
    p.add_argument("--micrograph-size", type=positive_int, default=None, metavar="N",
                   help="side of each micrograph at the patch scale, in pixels (default 100 L)")
    p.add_argument("--method", type=int, choices=(1, 2), default=1,
                   help="1: generate at full size and downsample the micrograph (default); "
                        "2: downsample the volume and generate with the band-limited operator")
    p.add_argument("--density", type=positive_float, default=0.1, metavar="G",
                   help="projection density T L^2 / N^2, with T the number of projections in each N x N "
                        "micrograph: the fraction of the micrograph their boxes cover (default 0.1)")
    p.add_argument("--snr", type=positive_float, default=1.0, metavar="S",
                   help="SNR = mean ||projection||^2 / (L^2 sigma^2) at the generation size (default 1). With "
                        "--method 1 that is the volume's own pixel size; the Fourier crop to side L averages "
                        "noise, so the SNR at the patch scale (reported as snr_downsampled) is about "
                        "(L0/L)^2 times higher")
    p.add_argument("--spacing", choices=("separated", "arbitrary"), default="separated",
                   help="separated: positions >= 2L-1 apart (each patch holds at most one projection); "
                        "arbitrary: only no overlap (default separated)")
    p.add_argument("--count", type=positive_int, default=1, metavar="C", help="number of micrographs (default 1)")
    p.add_argument("--lmax", type=int, default=None, help="band limit of the truth (default: the highest for L)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="random seed (positions, rotations, noise; default 0; recorded in MIC.json)")
    c = p.add_argument_group("contrast transfer and noise (theory section 11)")
    c.add_argument("--defocus", type=_defocus_range, default=None, metavar="MIN:MAX",
                   help="apply a CTF to each whole micrograph, its mean defocus drawn uniformly from MIN..MAX "
                        "micrometres (underfocus positive; e.g. 1:2.5); writes MIC_ctf.star for reconstruct --ctf. "
                        "Particles come out dark (CTFFIND's sign)")
    c.add_argument("--voltage", type=positive_float, default=300.0, metavar="KV",
                   help="accelerating voltage in kV (default 300)")
    c.add_argument("--cs", type=nonneg_float, default=2.7, metavar="MM", help="spherical aberration in mm (default 2.7)")
    c.add_argument("--amplitude-contrast", type=_amplitude_contrast, default=0.1, metavar="Q",
                   help="amplitude contrast, a fraction (default 0.1)")
    c.add_argument("--astigmatism", type=nonneg_float, default=0.0, metavar="ANGSTROM",
                   help="defocus U - V in Angstrom, at a random angle per micrograph (default 0)")
    c.add_argument("--pixel-size", type=positive_float, default=None, metavar="ANGSTROM",
                   help="voxel size of the volume in Angstrom (default: its MRC header); the micrographs get "
                        "this times L0 / L")
    c.add_argument("--noise", choices=("white", "pink"), default="white",
                   help="noise power spectrum: white, or pink 1/(|k| + 0.05) in cycles per pixel (default white)")
    x = p.add_argument_group("micrographs as they come (theory section 14)")
    x.add_argument("--orientation-prior", default=None, metavar="KIND:VALUE",
                   help="viewing directions: uniform, top:F (a fraction F seen from near +z), side:F (near the "
                        "equator) or vmf:KAPPA (numbaem.sim.views); default Haar-random rotations")
    x.add_argument("--junk", type=float, default=0.0, metavar="FRACTION",
                   help="fraction in [0, 1) of the placed objects that are contaminants (blob clusters of 1-4 "
                        "times a particle's energy) instead of particles (default 0)")
    add_threads(p)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def _defocus_range(text):
    import argparse
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX in micrometres, e.g. 1:2.5") from None
    if not (0 <= lo <= hi and hi < 100):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 <= MIN <= MAX < 100 micrometres, e.g. 1:2.5")
    return lo, hi


def _amplitude_contrast(text):
    import argparse
    q = nonneg_float(text)
    if q >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must lie in [0, 1), e.g. 0.1")
    return q


def main(args):
    from ..sim.simulate import output_paths, random_ctf, simulate_micrographs, write_simulation

    L = check_L(args.patch_size, "--patch-size")
    views = None
    if args.orientation_prior is not None:
        from ..sim.views import parse_views
        views = parse_views(args.orientation_prior)
    if not 0 <= args.junk < 1:
        raise NumbaemError(f"--junk {args.junk:g} must be a fraction in [0, 1), e.g. 0.3")
    mics, json_path, truth_path = output_paths(args.output, args.count)
    outputs = mics + [json_path, truth_path]
    if args.defocus is not None:
        outputs.append(json_path.with_name(json_path.stem + "_ctf.star"))
    check_outputs(outputs, args.force)   # before minutes of simulation
    vol, voxel = read_volume(args.volume)
    if vol.shape[0] < L:
        raise NumbaemError(f"--patch-size {L} is larger than the map ({vol.shape[0]}^3); use L <= {vol.shape[0]}")
    voxel = args.pixel_size or voxel
    ctf = None
    if args.defocus is not None:
        if not voxel:
            raise NumbaemError(f"{args.volume} has no pixel size in its header and a CTF needs one; "
                               "give --pixel-size ANGSTROM (the volume's voxel size)")
        if args.astigmatism / 2 > args.defocus[0] * 1e4:
            raise NumbaemError(f"--astigmatism {args.astigmatism:g} A is more than twice the smallest defocus "
                               f"({args.defocus[0]:g} um): a defocus would be negative; lower it")
        ctf = random_ctf(args.defocus, args.count, args.seed, args.voltage, args.cs, args.amplitude_contrast,
                         args.astigmatism)
    N = args.micrograph_size or 100 * L
    command = "numbaem " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    with use_threads(args.threads):
        sim = simulate_micrographs(vol, L, micrograph_size=N, method=args.method, density=args.density,
                                   snr=args.snr, spacing=args.spacing, count=args.count, lmax=args.lmax, rng=args.seed,
                                   ctf=ctf, pixel_size=voxel, noise_psd=args.noise, views=views, junk=args.junk)
    paths = write_simulation(sim, args.output, force=args.force, command=command, pixel_size=voxel)
    if args.json:
        emit_json(dict(outputs=[str(p) for p in paths] if paths else None, sigma2=sim.sigma2, snr=sim.snr,
                       snr_downsampled=sim.snr_downsampled, L=L, method=args.method,
                       projections=int(sum(len(p) for p in sim.positions))))
