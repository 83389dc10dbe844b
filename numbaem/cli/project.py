"""Project a volume with the band-limited Fourier-Bessel operator (theory section 3).

The volume is Fourier-downsampled to the patch size L, expanded up to --lmax, and
projected for K rotations of the deterministic near-uniform grid (or the rotations in
an .npy file of shape (K, 3, 3)). Writes an MRC stack (K, L, L) and, beside it,
PROJ.rotations.npy with the rotations used.
"""
import logging
import os

import numpy as np

from ..model.basis import FBBasis, expand
from ..runtime.validate import check_L
from ..runtime.errors import NumbaemError
from ..runtime.fourier import downsample
from ..data.io import read_volume, write_stack, atomic_path
from ..model.projection import project
from ..model.rotations import rotation_grid
from ..runtime.threads import use_threads
from ._common import add_threads, check_outputs, emit_json, positive_int

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("volume", metavar="VOLUME.mrc", help="cubic MRC map (any odd or even side >= L)")
    p.add_argument("-o", "--output", required=True, metavar="PROJ.mrcs", help="output MRC stack")
    p.add_argument("--patch-size", type=int, required=True, metavar="L", help="side of the projections, odd, in pixels")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rotations", type=positive_int, default=100, metavar="K",
                   help="number of rotations of the near-uniform grid (default 100)")
    g.add_argument("--rotations-file", metavar="R.npy", help="rotations as a (K, 3, 3) .npy array")
    p.add_argument("--lmax", type=int, default=None, help="angular band limit (default: the highest for L)")
    add_threads(p)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def _load_rotations(path):
    try:
        rots = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise NumbaemError(f"cannot read rotations from {path} ({exc}); give a .npy array of shape (K, 3, 3)") from None
    if rots.ndim != 3 or rots.shape[1:] != (3, 3) or not np.all(np.isfinite(rots)):
        raise NumbaemError(f"rotations in {path} have shape {rots.shape}; expected finite (K, 3, 3) matrices")
    err = np.abs(np.einsum("kij,kil->kjl", rots, rots) - np.eye(3)).max()
    if err > 1e-6 or np.any(np.linalg.det(rots) < 0):
        raise NumbaemError(f"the matrices in {path} are not rotations (orthogonality error {err:.2g} or a "
                           "negative determinant); give proper rotation matrices")
    return rots.astype(np.float64)


def main(args):
    L = check_L(args.patch_size, "--patch-size")
    rot_out = os.path.splitext(args.output)[0] + ".rotations.npy"
    check_outputs([args.output, rot_out], args.force)
    vol, voxel = read_volume(args.volume)
    if vol.shape[0] < L:
        raise NumbaemError(f"--patch-size {L} is larger than the map ({vol.shape[0]}^3); use L <= {vol.shape[0]}")
    lmax = FBBasis.max_lmax(L) if args.lmax is None else args.lmax
    basis = FBBasis(L, lmax)
    rots = _load_rotations(args.rotations_file) if args.rotations_file else rotation_grid(args.rotations)
    with use_threads(args.threads):
        theta = expand(downsample(vol, L), basis)
        imgs = project(theta, basis, rots)
    pixel = voxel * vol.shape[0] / L if voxel else None
    write_stack(args.output, imgs, pixel_size=pixel, force=args.force)
    with atomic_path(rot_out, force=args.force) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, rots)
    logger.info("wrote %d projections of side %d (lmax %d, M=%d) to %s", len(rots), L, lmax, basis.M, args.output)
    if args.json:
        emit_json(dict(output=args.output, rotations=rot_out, K=len(rots), L=L, lmax=lmax, M=basis.M))
