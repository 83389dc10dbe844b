"""Simulated contaminants (numbaem.sim.junk)."""
import numpy as np

from numbaem.sim.junk import ENERGY_RANGE, junk_images


def test_contaminants_have_the_stated_energy_and_stay_in_their_box(rng):
    imgs = junk_images(200, 21, 5.0, rng)
    e = np.sum(imgs ** 2, axis=(1, 2)) / 5.0
    assert e.min() >= ENERGY_RANGE[0] - 1e-12 and e.max() <= ENERGY_RANGE[1] + 1e-12
    assert abs(e.mean() - np.mean(ENERGY_RANGE)) < 0.2            # uniform on the range: sd 0.87 / sqrt(200)
    # the density is near the centre: the border rows and columns hold a small share of the energy
    border = np.sum(imgs[:, [0, -1], :] ** 2) + np.sum(imgs[:, :, [0, -1]] ** 2)
    assert border < 0.01 * np.sum(imgs ** 2)
    assert np.all(imgs >= 0)


def test_contaminants_are_not_isotropic(rng):
    """They must not be exactly what an isotropic junk class describes: the second moments of
    most images differ between their principal axes."""
    imgs = junk_images(50, 31, 1.0, rng)
    x = np.arange(31) - 15
    X, Y = np.meshgrid(x, x, indexing="ij")
    ratios = []
    for im in imgs:
        w = im / im.sum()
        mx, my = (w * X).sum(), (w * Y).sum()
        C = np.array([[(w * (X - mx) ** 2).sum(), (w * (X - mx) * (Y - my)).sum()],
                      [(w * (X - mx) * (Y - my)).sum(), (w * (Y - my) ** 2).sum()]])
        ev = np.linalg.eigvalsh(C)
        ratios.append(ev[1] / ev[0])
    assert np.median(ratios) > 1.3
