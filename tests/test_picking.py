"""Template matching and the blob detector against slow twins and the simulation's truth; boxes
around picks; posterior picks."""
import math

import numpy as np
import pytest

from numbaem.analysis.picking import (Picks, find_peaks, log_template, match_picks, merge_duplicates,
                                      pick_particles, score_map)
from numbaem.data.boxes import BoxSource
from numbaem.model.basis import FBBasis
from numbaem.model.projection import project
from numbaem.model.rotations import rotation_grid
from numbaem.runtime.errors import NumbaemError
from numbaem.sim.molecule import synthetic_molecule
from numbaem.sim.simulate import simulate_micrographs

import naive


def test_score_map_matches_direct_correlation(rng):
    img = rng.standard_normal((23, 19))
    tpl = rng.standard_normal((3, 5, 5))
    z, best = score_map(img, tpl, 0.7, batch=2)
    z_ref, best_ref = naive.score_map(img, tpl, 0.7)
    np.testing.assert_allclose(z, z_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(best, best_ref)


def test_score_is_standard_normal_on_noise(rng):
    """On white noise of the stated variance each template's score is N(0, 1)."""
    sigma2 = 2.5
    img = rng.normal(0, math.sqrt(sigma2), (300, 300))
    z, _ = score_map(img, rng.standard_normal((1, 7, 7)), sigma2)
    sub = z[::7, ::7]        # non-overlapping placements: independent
    assert abs(sub.mean()) < 0.1 and abs(sub.std() - 1) < 0.05     # 1764 samples: 4 standard errors


def test_find_peaks_greedy_with_distance():
    z = np.zeros((10, 10))
    z[2, 2], z[2, 4], z[7, 7], z[5, 5] = 5.0, 4.0, 3.0, 0.5
    pos, sc = find_peaks(z, 3, 1.0)
    np.testing.assert_array_equal(pos, [[2, 2], [7, 7]])        # (2, 4) is within 3 of (2, 2)
    np.testing.assert_array_equal(sc, [5.0, 3.0])


def test_log_template():
    t = log_template(11, 8.0)
    assert abs(t.sum()) < 1e-12 and np.unravel_index(np.argmax(t), t.shape) == (5, 5)
    np.testing.assert_allclose(t, t.T, atol=1e-15)


def test_match_picks_counts():
    picks = [np.array([[10, 10], [30, 31], [50, 50]]), np.zeros((0, 2))]
    truth = [np.array([[11, 9], [30, 30], [30, 33]]), np.array([[5, 5]])]
    m = match_picks(picks, truth, tolerance=2)
    assert (m["matched"], m["picks"], m["particles"]) == (2, 3, 4)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(0.5)


def test_merge_duplicates_keeps_the_best():
    p = Picks(np.array([0, 0, 0, 1]), np.array([[10, 10], [12, 13], [30, 30], [11, 11]]), np.array([0.6, 0.9, 0.7, 0.5]))
    q = merge_duplicates(p, 7)
    np.testing.assert_array_equal(q.centre, [[12, 13], [30, 30], [11, 11]])


@pytest.fixture(scope="module")
def high_snr():
    vol = synthetic_molecule(7, rng=0)
    sim = simulate_micrographs(vol, 7, micrograph_size=140, method=2, density=0.1, snr=4.0, count=2, rng=3)
    return sim


def test_template_picking_finds_the_particles(high_snr):
    """At SNR 4 with the truth's own projections as templates: precision and recall near 1."""
    sim = high_snr
    b = FBBasis(7, sim.lmax)
    tpl = project(sim.truth_theta, b, rotation_grid(100))
    picks, tk, thr = pick_particles(sim.micrographs, tpl, sim.sigma2, rng=0)
    truth = [p + 3 for p in sim.positions]
    m = match_picks(picks.per_micrograph(2), truth, 1)
    assert m["precision"] >= 0.95 and m["recall"] >= 0.95, m
    assert thr > 3


def test_blob_detector_finds_most_particles(high_snr):
    sim = high_snr
    picks, _, _ = pick_particles(sim.micrographs, log_template(7, 5.6)[None], sim.sigma2, rng=0)
    m = match_picks(picks.per_micrograph(2), [p + 3 for p in sim.positions], 1)
    assert m["precision"] >= 0.9 and m["recall"] >= 0.7, m


def test_box_source_cuts_boxes_around_picks():
    img = np.arange(30 * 40, dtype=float).reshape(30, 40)
    src = BoxSource([img, img], 5, [np.array([[2, 2], [10, 20], [28, 5]]), np.array([[7.4, 7.6]])], 1)
    assert src.n_patches == 3                 # (28, 5) is within L/2 of the edge: dropped
    boxes = src.get([0, 1, 2])
    np.testing.assert_array_equal(boxes[0], img[0:5, 0:5])
    np.testing.assert_array_equal(boxes[1], img[8:13, 18:23])
    np.testing.assert_array_equal(boxes[2], img[5:10, 6:11])     # centre rounded to (7, 8)
    with pytest.raises(NumbaemError, match="shift_window=5 must be below L=5"):
        BoxSource([img], 5, [np.array([[10, 10]])], 5)
    with pytest.raises(NumbaemError, match="no pick has a whole box"):
        BoxSource([img], 5, [np.array([[0, 0]])], 1)


def test_posterior_picks_find_the_particles(high_snr):
    """The E-step's own picks (truth volume, 100 rotations): each particle found once, at its place."""
    from numbaem.data.patches import PatchSource
    from numbaem.em.particles import posterior_particles

    sim = high_snr
    src = PatchSource(sim.micrographs, 7)
    picks = posterior_particles(src, sim.truth_theta, FBBasis(7, sim.lmax), 100, 0.6, sim.sigma2)
    m = match_picks(picks.per_micrograph(2), [p + 3 for p in sim.positions], 1)
    assert m["precision"] >= 0.95 and m["recall"] >= 0.95, m
    assert np.all(picks.score >= 0.5) and picks.rotation.shape == (len(picks), 3, 3)


def test_posterior_picks_leave_out_what_the_junk_field_explains(high_snr):
    """With the junk field (theory 14.4) a bright contaminant is background, not a particle:
    picked without it, not with it; the particles are still found."""
    from numbaem.data.patches import PatchSource
    from numbaem.em.estep import Background
    from numbaem.em.particles import posterior_particles
    from numbaem.model.junkfield import shell_powers, shells
    from numbaem.sim.junk import junk_images

    sim = high_snr
    mic = sim.micrographs[0].copy()
    L = 7
    energy = 4.0 * L * L * sim.sigma2           # a particle's mean projection energy at SNR 4
    blob = junk_images(1, L, 4.0 * energy, np.random.default_rng(3))[0]
    # a free place: the patch grid cell farthest from every particle
    pos = np.asarray(sim.positions[0]) + 3
    cells = [(r, c) for r in range(mic.shape[0] // L) for c in range(mic.shape[1] // L)]
    r, c = max(cells, key=lambda rc: np.min(np.hypot(pos[:, 0] - (rc[0] * L + 3), pos[:, 1] - (rc[1] * L + 3))))
    mic[r * L:(r + 1) * L, c * L:(c + 1) * L] += blob
    src = PatchSource([mic], L)
    basis = FBBasis(L, sim.lmax)
    centre = np.array([r * L + 3, c * L + 3])

    def near(picks):
        return np.any(np.hypot(*(picks.centre - centre).T) <= 2) if len(picks) else False

    plain = posterior_particles(src, sim.truth_theta, basis, 100, 0.6, sim.sigma2)
    lam = shell_powers(blob[None])[0] / shells(L)[1] + sim.sigma2      # a field of this blob's spectrum
    field = posterior_particles(src, sim.truth_theta, basis, 100, Background(0.6, 0.05, lam), sim.sigma2)
    assert near(plain) and not near(field)
    m = match_picks(field.per_micrograph(1), [pos], 1)
    assert m["recall"] >= 0.95, m
