"""Orientation distributions of simulated particles (numbaem.sim.views)."""
import numpy as np
import pytest

from numbaem.runtime.errors import NumbaemError
from numbaem.sim.views import (ViewDistribution, parse_views, rotations_viewing, sample_directions,
                               sample_rotations, viewing_directions)


def test_rotation_has_the_viewing_direction_asked(rng):
    v = rng.standard_normal((50, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    w = rotations_viewing(v, rng.uniform(0, 2 * np.pi, 50))
    np.testing.assert_allclose(np.einsum("nij,nj->ni", np.transpose(w, (0, 2, 1)), np.tile([0, 0, 1.0], (50, 1))),
                               v, atol=1e-12)
    np.testing.assert_allclose(w @ np.transpose(w, (0, 2, 1)), np.tile(np.eye(3), (50, 1, 1)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(w), 1.0, atol=1e-12)
    np.testing.assert_allclose(viewing_directions(w), v, atol=1e-12)


def test_uniform_views_are_haar(rng):
    """Haar moments: E[w_ij] = 0, E[w_ij^2] = 1/3, E[tr w] = 0, E[(tr w)^2] = 1 (20,000 draws:
    standard errors below 0.01; bounds at five of them)."""
    w = sample_rotations(20000, "uniform", rng)
    assert np.abs(w.mean(axis=0)).max() < 0.02
    np.testing.assert_allclose((w ** 2).mean(axis=0), np.full((3, 3), 1 / 3), atol=0.02)
    tr = np.trace(w, axis1=1, axis2=2)
    assert abs(tr.mean()) < 0.04 and abs((tr ** 2).mean() - 1) < 0.06


@pytest.mark.parametrize("spec", ["uniform", "top:0.6", "side:0.5", "vmf:3"])
def test_sampled_directions_follow_the_density(rng, spec):
    """The fraction of directions in bands of v_z matches the density integrated over the band
    (60,000 draws; the bound is five standard errors of a binomial fraction)."""
    views = parse_views(spec)
    v = sample_directions(60000, views, rng)
    edges = np.linspace(-1, 1, 11)
    z = np.linspace(-1, 1, 20001)
    dens = views.density(np.stack([np.sqrt(1 - z ** 2), 0 * z, z], axis=1))
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (z >= a) & (z <= b)
        expected = np.trapezoid(dens[sel], z[sel]) * 2 * np.pi     # area element dz dphi on the sphere
        got = np.mean((v[:, 2] >= a) & (v[:, 2] < b))
        assert abs(got - expected) < 5 * np.sqrt(expected * (1 - expected) / len(v)) + 1e-4, (a, got, expected)


def test_top_views_are_what_the_name_says(rng):
    """top:0.6: sixty percent of the particles within a cap about +z (plus the uniform share there)."""
    v = sample_directions(40000, "top:0.6", rng)
    near = np.mean(v[:, 2] > np.cos(np.radians(30)))
    cap = (1 - np.cos(np.radians(30))) / 2
    assert 0.6 * 0.97 + 0.4 * cap < near < 0.6 + 0.4 * cap + 0.01


def test_parse_refusals():
    assert parse_views("top:0.6") == ViewDistribution("top", 0.6)
    assert str(parse_views("uniform")) == "uniform"
    for bad, match in (("diagonal:1", "not one of"), ("top:x", "needs a number"), ("top:1.5", r"\[0, 1\]"),
                       ("vmf:-1", ">= 0"), ("uniform:3", "takes no value")):
        with pytest.raises(NumbaemError, match=match):
            parse_views(bad)
