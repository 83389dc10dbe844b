"""Boxes around picked particles: the patch source of pick-then-EM (``reconstruct --particles``).

Each pick with centre ``(x, y)`` (pixels of its micrograph, :mod:`numbaem.data.coordinates`)
becomes one ``L x L`` box whose top-left pixel is ``(x - L // 2, y - L // 2)``, rounded
to the nearest pixel: the box a perfect pick would cut around the particle. The EM then
runs on these boxes exactly as on the patches of a regular grid (theory sections 4-6), with
the shifts restricted to a small window ``|l_a| <= w`` about the pick
(:func:`numbaem.em.estep.restrict_shifts`; the empty state stays, for false picks).
:class:`BoxSource` has the interface of :class:`numbaem.data.patches.PatchSource`
(``L``, ``n_patches``, ``get``, ``sample``, ``locate``, ``pixel_size``, ``names``) plus
``shift_window``.

Picks whose box does not lie inside its micrograph are dropped (the model has no pixels
outside), and the user is told how many.
"""
import logging

import numpy as np

from ..runtime.errors import NumbaemError
from ..runtime.validate import check_L, whole_number
from .patches import PatchSource

logger = logging.getLogger(__name__)


class BoxSource:
    """``L x L`` boxes around picks, read on demand.

    Parameters
    ----------
    images : list of 2-D arrays (ndarray or memmap), axis 0 the first pixel coordinate
    L : int
    centres : list of ndarray, shape (n_m, 2)
        The picks of each micrograph, centre ``(x, y)`` in pixels.
    shift_window : int
        ``w``: the EM considers shifts ``|l_0|, |l_1| <= w`` of the particle from the pick
        (``0 <= w < L``).
    names : list of str, optional
    pixel_size : float or None
    groups, filters : optional
        CTF group of each micrograph and one filter per group, as for :class:`PatchSource`.

    Attributes
    ----------
    n_patches : int
        Number of boxes (picks inside their micrograph).
    top_left : list of ndarray of int64, shape (n_m', 2)
        Top-left pixel of each box, per micrograph.
    """

    def __init__(self, images, L, centres, shift_window, names=None, pixel_size=None, groups=None, filters=None):
        self.L = check_L(L, "patch size L")
        if not images:
            raise NumbaemError("no micrographs were given; pass at least one micrograph file")
        if len(centres) != len(images):
            raise NumbaemError(f"{len(centres)} lists of picks for {len(images)} micrographs; give one per micrograph")
        self.shift_window = whole_number("shift_window", shift_window, 0, example=2)
        if self.shift_window >= self.L:
            raise NumbaemError(f"shift_window={self.shift_window} must be below L={self.L}; a window of a few pixels "
                               "(e.g. 2) is what a pick's error needs")
        self.images = images
        if (groups is None) != (filters is None):
            raise NumbaemError("groups and filters go together: give both (one filter per group) or neither")
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        self.filters = None if filters is None else list(filters)
        self.names = names or [f"micrograph {i}" for i in range(len(images))]
        self.pixel_size = pixel_size
        R = self.L // 2
        self.top_left = []
        dropped = 0
        for img, c, name in zip(images, centres, self.names):
            if img.ndim != 2:
                raise NumbaemError(f"{name} has {img.ndim} dimensions; a micrograph must be a 2-D image")
            c = np.asarray(c, dtype=np.float64).reshape(-1, 2)
            tl = np.rint(c).astype(np.int64) - R
            inside = ((tl[:, 0] >= 0) & (tl[:, 1] >= 0) & (tl[:, 0] + self.L <= img.shape[0])
                      & (tl[:, 1] + self.L <= img.shape[1]))
            dropped += int(np.count_nonzero(~inside))
            self.top_left.append(tl[inside])
        if dropped:
            logger.warning("%d pick(s) lie closer than L/2 = %d pixels to a micrograph's edge; their boxes are dropped",
                           dropped, R)
        self._counts = np.array([len(t) for t in self.top_left], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)])
        if self.n_patches == 0:
            raise NumbaemError("no pick has a whole box inside its micrograph; check that the coordinates are pixels of "
                               "these micrographs (rlnCoordinateX along the columns)")

    @classmethod
    def from_files(cls, paths, L, centres, shift_window):
        """Open micrograph MRC files memory-mapped (one pixel size, as :class:`PatchSource`)."""
        grid = PatchSource.from_files(paths, L)
        return cls(grid.images, L, centres, shift_window, names=grid.names, pixel_size=grid.pixel_size)

    # CTF groups exactly as the patch grid has them
    n_groups = PatchSource.n_groups
    filter_matrices = PatchSource.filter_matrices
    patch_groups = PatchSource.patch_groups

    @property
    def n_patches(self):
        return int(self._starts[-1])

    def locate(self, indices):
        """Micrograph and box top-left pixel ``(s0, s1)`` of global box indices."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_patches):
            raise NumbaemError(f"box index out of range 0..{self.n_patches - 1}")
        mic = np.searchsorted(self._starts, idx, side="right") - 1
        tl = np.concatenate(self.top_left)[idx] if len(idx) else np.zeros((0, 2), np.int64)
        return mic, tl

    def get(self, indices, out=None):
        """The boxes with the given global indices, float64, shape (n, L, L)."""
        L = self.L
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), L, L)) if out is None else out
        mic, tl = self.locate(idx)
        for i, (m, (s0, s1)) in enumerate(zip(mic, tl)):
            out[i] = self.images[m][s0:s0 + L, s1:s1 + L]
        if not np.all(np.isfinite(out)):
            raise NumbaemError("the micrographs contain NaN or infinite pixels in the boxes read; replace or mask them "
                               "before reconstructing")
        return out

    def sample(self, frac, rng):
        """Indices of a minibatch (as :meth:`PatchSource.sample`)."""
        return PatchSource.sample(self, frac, rng)
