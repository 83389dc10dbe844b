"""An estimate against the truth: FSC and relative error after alignment (MODEL sections 8 and 9)."""
from ..model.basis import expand, synthesize
from .align import align
from .fsc import fsc as fsc_curve, relative_error, resolution


def compare_to_truth(theta, basis, truth, n_coarse=1000, return_aligned=False):
    """FSC resolution and relative error of an estimate against a true volume (section 8).

    The estimate is first aligned to the truth's expansion in the same basis over
    rotations and reflection (coarse grid of ``n_coarse`` rotations, then local
    refinement). Returns a dict with ``fsc_resolution`` and ``relative_error`` (aligned)
    and ``fsc_resolution_unaligned``; with ``return_aligned`` also the aligned volume.
    """
    from ..analysis.align import align
    from ..analysis.fsc import fsc as fsc_curve, relative_error, resolution

    est = synthesize(theta, basis)
    f, c = fsc_curve(est, truth)
    res = align(theta, expand(truth, basis), basis, n_coarse=n_coarse)
    aligned = synthesize(res.theta_aligned, basis)
    fa, ca = fsc_curve(aligned, truth)
    out = dict(fsc_resolution=float(resolution(fa, ca)), relative_error=float(relative_error(aligned, truth)),
               fsc_resolution_unaligned=float(resolution(f, c)))
    return (out, aligned) if return_aligned else out
