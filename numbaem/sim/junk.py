"""Contaminants for simulated micrographs: objects that are neither empty ice nor the molecule.

Real micrographs hold ice crystals, aggregates and debris among the particles. The
simulator models each contaminant as the projection of a small cluster of one to three
ellipsoidal Gaussian blobs (an aggregate, or a single dense crystal), randomly oriented,
of total size comparable to the particle's box and of energy 1 to 4 times the mean
particle projection's: bright enough to pull an estimate that has no place for them.
They are not spherically symmetric, so the junk class of the EM (an isotropic
low-resolution volume) describes them only approximately, as it would real debris.
"""
import numpy as np

from ..runtime.validate import as_rng, whole_number

#: Energy of a contaminant relative to the mean particle projection energy (uniform range).
ENERGY_RANGE = (1.0, 4.0)
#: Blob widths (standard deviation) as a fraction of the box side (uniform range).
WIDTH_RANGE = (0.06, 0.14)


def junk_images(n, side, mean_energy, rng):
    """``n`` contaminant images of ``side x side`` pixels (module doc).

    Parameters
    ----------
    n : int
    side : int
        Box side in pixels (the generation size: ``L0`` for Method 1, ``L`` for Method 2).
    mean_energy : float
        Mean ``||projection||^2`` of the particles at this size; each contaminant gets
        a multiple of it drawn from :data:`ENERGY_RANGE`.
    rng : numpy.random.Generator or int

    Returns
    -------
    images : ndarray, shape (n, side, side)
        Axis 0 is x, axis 1 y; centred on pixel ``side // 2``, like a projection.
    """
    rng, _ = as_rng(rng)
    n = whole_number("n", n, 0)
    side = whole_number("side", side, 3)
    R = side // 2
    x = np.arange(side) - R
    X, Y = np.meshgrid(x, x, indexing="ij")
    out = np.zeros((n, side, side))
    for i in range(n):
        img = np.zeros((side, side))
        for _ in range(int(rng.integers(1, 4))):
            c = rng.normal(0.0, 0.08 * side, 2)
            s1, s2 = rng.uniform(*WIDTH_RANGE, 2) * side
            t = rng.uniform(0, np.pi)
            u = (X - c[0]) * np.cos(t) + (Y - c[1]) * np.sin(t)
            v = -(X - c[0]) * np.sin(t) + (Y - c[1]) * np.cos(t)
            img += rng.uniform(0.5, 1.5) * np.exp(-0.5 * ((u / s1) ** 2 + (v / s2) ** 2))
        energy = float(np.sum(img ** 2))
        out[i] = img * np.sqrt(rng.uniform(*ENERGY_RANGE) * mean_energy / energy)
    return out
