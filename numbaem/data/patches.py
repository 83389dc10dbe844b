"""Patches (theory section 4): micrographs cut into non-overlapping ``L x L`` patches, read on demand.

Micrographs are opened memory-mapped (``mrcfile.mmap``) by :meth:`PatchSource.from_files`,
so a micrograph larger than memory works: only the patches asked for are read.
Rows and columns at the bottom / right that do not fill a whole patch are dropped; the
user is told how many.
"""
import dataclasses
import logging

import numpy as np

from ..runtime.validate import check_L
from ..runtime.errors import NumbaemError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PatchSource:
    """All patches of a set of micrographs.

    Parameters
    ----------
    images : list of 2-D arrays (ndarray or memmap), axis 0 the first pixel coordinate
    L : int
    names : list of str, optional
    pixel_size : float or None
    groups : array_like of int, shape (n_micrographs,), optional
        CTF group of each micrograph (theory section 11); requires ``filters``.
    filters : list of numbaem.model.ctf.ImageFilter, optional
        The filter ``t_g`` (CTF times whitening) of each group. None: the idealised
        model of sections 4-6 (no filter), today's path.

    Attributes
    ----------
    n_patches : int
        ``Nd``.
    grid : list of (rows, cols) per micrograph
    """

    images: list
    L: int
    names: list = None
    pixel_size: float = None
    groups: np.ndarray = None
    filters: list = None

    def __post_init__(self):
        self.L = check_L(self.L, "patch size L")
        if not self.images:
            raise NumbaemError("no micrographs were given; pass at least one micrograph file")
        if (self.groups is None) != (self.filters is None):
            raise NumbaemError("give both the group of each micrograph and one filter per group, or neither")
        if self.groups is not None:
            g = np.asarray(self.groups)
            if g.shape != (len(self.images),) or not np.issubdtype(g.dtype, np.integer) or \
                    (len(g) and (g.min() < 0 or g.max() >= len(self.filters))):
                raise NumbaemError(f"groups must give each of the {len(self.images)} micrographs a group number "
                                   f"in 0..{len(self.filters) - 1} (one filter per group)")
            self.groups = g.astype(np.int64)
            self.filters = list(self.filters)
        self.names = self.names or [f"micrograph {i}" for i in range(len(self.images))]
        self.grid = []
        for img, name in zip(self.images, self.names):
            if img.ndim != 2:
                raise NumbaemError(f"{name} has {img.ndim} dimensions; a micrograph must be a 2-D image")
            rows, cols = img.shape[0] // self.L, img.shape[1] // self.L
            if rows == 0 or cols == 0:
                raise NumbaemError(f"{name} is {img.shape[0]}x{img.shape[1]} pixels, smaller than one "
                                   f"{self.L}x{self.L} patch; use a smaller patch size")
            d0, d1 = img.shape[0] - rows * self.L, img.shape[1] - cols * self.L
            if d0 or d1:
                logger.warning("%s: %d x %d pixels do not divide into %d x %d patches; dropping the last "
                               "%d row(s) and %d column(s) of pixels", name, img.shape[0], img.shape[1],
                               self.L, self.L, d0, d1)
            self.grid.append((rows, cols))
        self._counts = np.array([r * c for r, c in self.grid], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)])

    @classmethod
    def from_files(cls, paths, L, groups=None, filters=None):
        """Open micrograph MRC files memory-mapped; all must share one pixel size."""
        from .io import read_image

        images, sizes = [], []
        for p in paths:
            img, px = read_image(p, mmap=True)
            images.append(img)
            sizes.append(px)
        known = {round(s, 6) for s in sizes if s}
        if len(known) > 1:
            raise NumbaemError(f"the micrographs have different pixel sizes ({', '.join(f'{s:g}' for s in sorted(known))} A); "
                               "resample them to one pixel size first")
        return cls(images, L, names=[str(p) for p in paths], pixel_size=known.pop() if known else None,
                   groups=groups, filters=filters)

    @property
    def n_groups(self):
        """Number of CTF groups (None without filters)."""
        return None if self.filters is None else len(self.filters)

    def filter_matrices(self):
        """``Psi_g`` of every group, ndarray (G, L^2, L^2) (built once; None without filters).

        See :func:`numbaem.model.ctf.filter_matrix`.
        """
        if self.filters is None:
            return None
        if getattr(self, "_psi", None) is None:
            from ..model.ctf import filter_matrices
            self._psi = filter_matrices(self.filters, self.L)
        return self._psi

    def patch_groups(self, indices):
        """The CTF group of each of the given patches (all 0 without groups): ndarray of int64."""
        mic = self.locate(indices)[0]
        if self.groups is None:
            return np.zeros(len(mic), np.int64)
        return self.groups[mic]

    @property
    def n_patches(self):
        return int(self._starts[-1])

    @property
    def dropped(self):
        """Pixels dropped per micrograph: list of (rows, cols)."""
        return [(img.shape[0] - r * self.L, img.shape[1] - c * self.L) for img, (r, c) in zip(self.images, self.grid)]

    def locate(self, indices):
        """Micrograph, patch row and patch column of global patch indices."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_patches):
            raise NumbaemError(f"patch index out of range 0..{self.n_patches - 1}")
        mic = np.searchsorted(self._starts, idx, side="right") - 1
        local = idx - self._starts[mic]
        cols = np.array([c for _, c in self.grid])[mic]
        return mic, local // cols, local % cols

    def get(self, indices, out=None):
        """The patches with the given global indices.

        Returns
        -------
        patches : ndarray, float64, shape (n, L, L)
        """
        L = self.L
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), L, L)) if out is None else out
        mic, r, c = self.locate(idx)
        for m in np.unique(mic):
            sel = np.nonzero(mic == m)[0]
            rows, cols = self.grid[m]
            view = self.images[m][:rows * L, :cols * L].reshape(rows, L, cols, L)
            out[sel] = view[r[sel], :, c[sel], :]
        if not np.all(np.isfinite(out)):
            bad = int(np.count_nonzero(~np.isfinite(out)))
            raise NumbaemError(f"the micrographs contain {bad} NaN or infinite pixels in the patches read; "
                               "replace or mask them before reconstructing")
        return out

    def sample(self, frac, rng):
        """Indices of a minibatch of ``ceil(frac Nd)`` patches drawn without replacement (section 7).

        ``frac = 1`` returns every patch without touching ``rng``. Sorted, so that reads
        from a memory-mapped file go forward.
        """
        if not 0 < frac <= 1:
            raise NumbaemError(f"stochastic factor frac={frac} must lie in (0, 1]")
        Nd = self.n_patches
        if frac >= 1:
            return np.arange(Nd)
        n = int(np.ceil(frac * Nd))
        return np.sort(rng.choice(Nd, size=n, replace=False))
