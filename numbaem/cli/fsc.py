"""Compare two maps: FSC curve, resolution and relative error, optionally after alignment.

Without --align the maps are compared as given, voxel by voxel: the FSC over spherical
shells of their Fourier transforms and the relative error ||A - B|| / ||B||.

With --align, A is first rotated (and point-reflected, if that fits better) onto B. A
voxel map cannot be rotated without interpolating, so both maps are expanded in the
Fourier-Bessel basis of their size (band-limited to the ball |k| <= 1/2 cycle/pixel,
density within L//2 pixels of the centre), A's expansion is rotated exactly, and the
FSC and the relative error are those of the two expansions: a map against itself gives
0. The output says how much of each map that representation holds. --align works up to
L = 25; crop larger maps with --size.

The resolution is the frequency where the FSC first falls below the threshold (0.5),
in cycles/pixel and, when the pixel size is known (MRC header or --pixel-size), in
Angstrom. If the FSC stays above it up to the last shell (the band limit of the grid),
the resolution is only known to be at least that, and the output says so.
"""
import logging
import math

import numpy as np

from ..data.io import read_volume
from ..runtime.errors import NumbaemError
from ._common import emit_json, positive_float, positive_int

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("volume_a", metavar="A.mrc", help="the map to measure (e.g. the estimate); --align rotates it")
    p.add_argument("volume_b", metavar="B.mrc", help="the reference (e.g. the truth), of the same size")
    p.add_argument("--align", action="store_true",
                   help="rotate (and point-reflect, if that fits better) A onto B first, and compare the two "
                        "maps' Fourier-Bessel expansions (see above)")
    p.add_argument("--lmax", type=positive_int, default=None, metavar="N",
                   help="highest angular order of the coarse rotation search (default: 12, or the highest for "
                        "the size if lower); the refinement and the comparison use every order")
    p.add_argument("--size", type=positive_int, default=None, metavar="L",
                   help="Fourier-crop both maps to L x L x L first (odd; the pixel size grows by the same factor)")
    p.add_argument("--pixel-size", type=positive_float, default=None, metavar="ANGSTROM",
                   help="Angstrom per pixel of the maps as given, instead of the MRC headers' (needed for a "
                        "resolution in Angstrom when the headers lack it)")
    p.add_argument("--threshold", type=float, default=0.5, metavar="T", help="FSC level that defines the resolution (default 0.5)")
    p.add_argument("--plot", metavar="fsc.png", help="write the FSC curve as a PNG")
    p.add_argument("--json", action="store_true", help="print the curve and the figures as JSON instead of text")
    p.add_argument("--force", action="store_true", help="overwrite an existing plot")


def _pixel_size(args, pa, pb):
    """The maps' pixel size in Angstrom (None if unknown) and where it came from."""
    if args.pixel_size is not None:
        return args.pixel_size, "--pixel-size"
    if pa and pb and abs(pa - pb) > 1e-4 * max(pa, pb):
        raise NumbaemError(f"{args.volume_a} has {pa:g} A/pixel but {args.volume_b} has {pb:g} A/pixel in its "
                           "header; resample one to the other's pixel size, or pass --pixel-size if a header is wrong")
    pixel = pa or pb
    return pixel, ("MRC header" if pixel else None)


def main(args):
    from ..analysis.fsc import fsc, relative_error, resolution, resolution_angstrom

    a, pa = read_volume(args.volume_a)
    b, pb = read_volume(args.volume_b)
    if a.shape != b.shape:
        raise NumbaemError(f"the maps have different sizes ({a.shape[0]}^3 and {b.shape[0]}^3); "
                           f"pass --size L with an odd L <= {min(a.shape[0], b.shape[0])} to Fourier-crop both")
    if not math.isfinite(args.threshold) or not -1 < args.threshold < 1:
        raise NumbaemError(f"--threshold {args.threshold:g} is not an FSC level; pass a value between -1 and 1, "
                           "e.g. 0.5 or 0.143")
    pixel, pixel_source = _pixel_size(args, pa, pb)
    if args.plot:
        from ..data.io import check_output
        check_output(args.plot, args.force)
    N = a.shape[0]
    if args.size is not None and args.size != N:
        from ..runtime.fourier import downsample
        from ..runtime.validate import check_L
        if args.size > N:
            raise NumbaemError(f"--size {args.size} is larger than the maps ({N}^3); Fourier cropping only shrinks, "
                               f"pass --size <= {N}")
        L = check_L(args.size, "--size")
        a, b = downsample(a, L), downsample(b, L)
        if pixel:
            pixel, pixel_source = pixel * N / L, f"{pixel_source}, times {N}/{L} for --size"
    L = a.shape[0]

    out = dict(a=str(args.volume_a), b=str(args.volume_b), L=L, pixel_size=pixel, pixel_size_source=pixel_source,
               aligned=bool(args.align))
    if args.align:
        from ..analysis.align import align_volumes
        pair = align_volumes(a, b, lmax_search=args.lmax)
        a, b = pair.estimate, pair.reference
        from scipy.spatial.transform import Rotation
        angle = math.degrees(Rotation.from_matrix(pair.rotation).magnitude())  # accurate near 0, unlike acos
        out.update(compared=pair.describe().replace("the estimate's", "A's").replace("the reference's", "B's"),
                   reflected=bool(pair.reflected), rotation=pair.rotation.tolist(), rotation_degrees=angle,
                   correlation=float(pair.correlation), lmax=pair.basis.lmax, lmax_search=pair.lmax_search,
                   held_a=float(pair.held_estimate), held_b=float(pair.held_reference))
    else:
        out.update(compared="the maps as given, voxel by voxel")
    freq, curve = fsc(a, b)
    r = resolution(freq, curve, args.threshold)
    valid = ~np.isnan(curve)
    bound = not np.any(curve[valid] < args.threshold)
    out.update(threshold=args.threshold, resolution_per_pixel=float(r), resolution_is_lower_bound=bool(bound),
               band_limit_per_pixel=float(freq[valid][-1]) if valid.any() else None,
               relative_error=float(relative_error(a, b)),
               freq=freq.tolist(), fsc=[None if c != c else float(c) for c in curve])
    if pixel:
        out["resolution_angstrom"] = float(resolution_angstrom(r, pixel))
    if args.plot:
        from ..analysis.plots import plot_fsc
        label = "A vs B" + (" (aligned)" if args.align else "")
        plot_fsc({label: (freq, curve)}, args.plot, pixel_size=pixel, threshold=args.threshold, force=args.force,
                 title=f"A = {args.volume_a}, B = {args.volume_b}", note="compared: " + out["compared"])
    if args.json:
        emit_json(out)
    else:
        print(_summary(out))


def _summary(out):
    """The text report: what was compared, then the figures."""
    px = out["pixel_size"]
    lines = [f"A = {out['a']}, B = {out['b']}: {out['L']}^3"
             + (f", {px:.4g} A/pixel ({out['pixel_size_source']})" if px else ", pixel size unknown")]
    if out["aligned"]:
        lines.append(f"aligned: A {'point-reflected and ' if out['reflected'] else ''}rotated by "
                     f"{out['rotation_degrees']:.2f} degrees onto B (correlation {out['correlation']:.6f})")
        lines.append(f"compared: {out['compared']}; this holds {100 * out['held_a']:.1f}% of A's norm and "
                     f"{100 * out['held_b']:.1f}% of B's")
    else:
        lines.append(f"compared: {out['compared']} (not aligned)")
    lines.append(f"relative error ||A - B|| / ||B||: {out['relative_error']:.4g}")
    t = out["threshold"]
    res = f"{out['resolution_per_pixel']:.4f} cycles/pixel"
    if px:
        res += f" ({out['resolution_angstrom']:.2f} A)"
    if out["resolution_is_lower_bound"]:
        lines.append(f"FSC {t:g}: not reached; the FSC stays above {t:g} up to the last shell, the band limit "
                     f"{res}: the resolution is at least that")
    else:
        lines.append(f"FSC {t:g} at {res}")
    return "\n".join(lines)
