"""An estimate against a known truth, as the EM records it per iteration (theory sections 8-9)."""

from ..model.basis import synthesize
from .align import align_to_reference
from .fsc import fsc, resolution


__all__ = ["compare_to_truth"]


def compare_to_truth(theta, basis, truth, n_coarse=1000, return_alignment=False):
    """FSC resolution and relative error of an estimate against a true volume (sections 8-9).

    The estimate (coefficients, already in the Fourier-Bessel span) is aligned over
    rotations and the reflection to the truth's expansion in the largest basis for its
    side, and the two are compared there, like with like
    (:func:`numbaem.analysis.align.align_to_reference`; the module docstring of
    :mod:`numbaem.analysis.align` says why). Orders above ``basis.lmax`` that the truth
    holds and the estimate lacks count as error.

    Parameters
    ----------
    theta : ndarray, shape (basis.M,)
    basis : FBBasis
    truth : ndarray, shape (L, L, L)
    n_coarse : int, optional
        Size of the coarse rotation grid.
    return_alignment : bool, optional
        Also return the :class:`~numbaem.analysis.align.VolumeAlignment`, whose
        ``estimate`` and ``reference`` are the compared pair (use ``alignment.fsc()``
        for the curve).

    Returns
    -------
    out : dict
        ``fsc_resolution`` and ``relative_error`` of the aligned pair;
        ``fsc_resolution_unaligned`` of ``synthesize(theta)`` against ``truth`` as given.
    alignment : VolumeAlignment, with ``return_alignment``
    """
    pair = align_to_reference(theta, basis, truth, n_coarse=n_coarse)
    f, c = fsc(synthesize(theta, basis), truth)
    fa, ca = pair.fsc()
    out = dict(fsc_resolution=float(resolution(fa, ca)), relative_error=float(pair.relative_error),
               fsc_resolution_unaligned=float(resolution(f, c)))
    if return_alignment:
        return out, pair
    return out
