"""Fourier shell correlation between two volumes, optionally after alignment (MODEL sections 8-9).

Resolution is the frequency where the FSC first falls below 0.5, in 1/pixel and, when
the MRC header carries the voxel size, in Angstrom. With --align the first volume is
rotated (and reflected if that fits better) onto the second through their
Fourier-Bessel coefficients before the comparison.
"""
import logging

from ..runtime.errors import NumbaemError
from ..data.io import read_volume
from ._common import emit_json

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("volume_a", metavar="A.mrc", help="first volume (e.g. the estimate)")
    p.add_argument("volume_b", metavar="B.mrc", help="second volume (e.g. the truth), same size")
    p.add_argument("--align", action="store_true", help="align A to B over rotations and reflection first")
    p.add_argument("--lmax", type=int, default=None, help="band limit of the alignment's expansion (default: up to 12)")
    p.add_argument("--threshold", type=float, default=0.5, help="FSC threshold for the resolution (default 0.5)")
    p.add_argument("--plot", metavar="fsc.png", help="write the FSC curve as PNG")
    p.add_argument("--json", action="store_true", help="print the curve and figures as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing plot")


def main(args):
    from ..analysis.fsc import fsc, plot_fsc, relative_error, resolution, resolution_angstrom

    a, pa = read_volume(args.volume_a)
    b, pb = read_volume(args.volume_b)
    if a.shape != b.shape:
        raise NumbaemError(f"the volumes have different sizes ({a.shape[0]}^3 and {b.shape[0]}^3); "
                           "downsample the larger one to the other's size first")
    if args.plot:
        from ..data.io import check_output
        check_output(args.plot, args.force)
    out = {}
    if args.align:
        from ..analysis.align import align_volumes
        a, res = align_volumes(a, b, lmax=args.lmax)
        out.update(aligned=True, reflected=bool(res.reflected), correlation=float(res.correlation),
                   rotation=res.rotation.tolist())
    freq, curve = fsc(a, b)
    r = resolution(freq, curve, args.threshold)
    pixel = pa or pb
    out.update(resolution_per_pixel=float(r), relative_error=float(relative_error(a, b)),
               freq=freq.tolist(), fsc=[None if c != c else float(c) for c in curve])
    if pixel:
        out["resolution_angstrom"] = float(resolution_angstrom(r, pixel))
    if args.plot:
        plot_fsc({f"{args.volume_a} vs {args.volume_b}": (freq, curve)}, args.plot, pixel_size=pixel,
                 threshold=args.threshold, force=args.force)
    if args.json:
        emit_json(out)
    else:
        line = f"FSC {args.threshold} at {r:.4f} 1/pixel"
        if pixel:
            line += f" ({out['resolution_angstrom']:.2f} A)"
        line += f"; relative error {out['relative_error']:.4f}"
        if args.align:
            line += f"; aligned{' with reflection' if out['reflected'] else ''}"
        print(line)
