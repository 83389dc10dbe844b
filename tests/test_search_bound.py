"""Branch and bound in the rotation search (theory section 12.11): the cell bounds against
brute force, the bound on a cell's fine posterior mass against the exhaustive E-step on the
fine level, and the search that refines by it against the exhaustive search."""
import math

import numpy as np
import pytest

from numbaem.em.schedule import parse_schedule
from numbaem.em.search import SearchAccumulator, SearchModel, SearchSpec, bound_log_mass, search_chunk
from numbaem.model import hopf
from numbaem.model.projection import project

from test_search import _level_scores as level_scores, _molecule_theta, _patches


def _level_scores(patches, model, level, upsilon, sigma2):
    """:func:`test_search._level_scores` on every rotation of ``level`` of ``model`` (under its
    orientation prior, if any)."""
    idx = np.arange(hopf.size(level))
    delta = model.view_offsets(level, idx) if model.view_weights is not None else None
    return level_scores(patches, model.projections(level, idx), upsilon, sigma2, delta)


def test_cell_bounds_match_brute_force(rng):
    """B[c] is the largest distance from cell c's projection to those of its descendants on
    the fine level (projections built by the operator, not steered), for every level, also
    for a CTF group's filtered projections; log_w[c] the log of the mean prior weight of the
    descendants over c's under an orientation prior."""
    basis, theta = _molecule_theta(5, 2)
    L = basis.L
    spec = SearchSpec(0, 2, bound=True)
    filt = np.eye(L * L) + 0.1 * rng.standard_normal((L * L, L * L))
    weights = rng.uniform(0.2, 3.0, 12 * 2 * 2)
    model = SearchModel(theta, basis, spec, precision="float64", view_weights=weights)
    for m, F in ((model, None), (model.for_group(filt), filt)):
        Pf = project(theta, basis, hopf.rotations(2)).reshape(-1, L * L)
        if F is not None:
            Pf = Pf @ F.T
        for r in (0, 1):
            Pr = project(theta, basis, hopf.rotations(r)).reshape(-1, L * L)
            if F is not None:
                Pr = Pr @ F.T
            B, log_w = m.cell_bounds(r)
            span = 8 ** (2 - r)
            want = [np.linalg.norm(Pf[c * span:(c + 1) * span] - Pr[c], axis=1).max() for c in range(hopf.size(r))]
            np.testing.assert_allclose(B, want, rtol=1e-10)
            df, dr = m.view_offsets(2, np.arange(hopf.size(2))), m.view_offsets(r, np.arange(hopf.size(r)))
            want_w = [np.log(np.mean(np.exp(df[c * span:(c + 1) * span]))) - dr[c] for c in range(hopf.size(r))]
            np.testing.assert_allclose(log_w, want_w, atol=1e-12)
    plain = SearchModel(theta, basis, spec, precision="float64")
    assert np.all(plain.cell_bounds(0)[1] == 0.0)


@pytest.mark.parametrize("prior", [False, True])
def test_bound_holds_for_every_cell_at_high_snr(rng, prior):
    """For every patch and every cell of levels 0 and 1, the fine-level (level 2) posterior
    mass of the cell's descendants, exhaustively, is at most the bound (both unnormalised:
    the bound is relative to the coarse pass's normaliser); at SNR 100 the centre's own
    share (the bound without the gain over the cell) falls short for some cells, so the
    gain is what makes it a bound. Also under an orientation prior (the descendants' prior
    mass against the centre's enters the bound)."""
    basis, theta = _molecule_theta(5, 2)
    patches, sigma2 = _patches(rng, basis, theta, 12, snr=100.0)
    n, ups = len(patches), 0.4
    weights = np.exp(rng.uniform(-8.0, 8.0, 48)) if prior else None     # strong: beyond the bound's slack
    model = SearchModel(theta, basis, SearchSpec(0, 2, bound=True), precision="float64", view_weights=weights)
    yy = np.einsum("jab,jab->j", patches, patches)
    _, fine_mass, fine_lse, _ = _level_scores(patches, model, 2, ups, sigma2)
    short = 0
    for r in (0, 1):
        lhat, _, lse, lp = _level_scores(patches, model, r, ups, sigma2)
        K = hopf.size(r)
        rot = np.tile(np.arange(K), n)
        ub = bound_log_mass(model, r, rot, lhat.ravel(), np.repeat(lse, K), np.repeat(yy, K), sigma2, lp).reshape(n, K)
        cell = fine_mass.reshape(n, K, -1).sum(axis=2)                  # the descendants' mass on level 2
        with np.errstate(divide="ignore"):
            have = np.log(cell) + fine_lse[:, None]
        assert np.all(have <= ub + lse[:, None] + 1e-9)
        centre = math.log((2 * basis.L - 1) ** 2) + lhat                # no gain
        short += int(np.sum(have > centre + 1e-9))
    assert short > 0


def test_bound_search_finds_the_peaks_the_masses_miss():
    """At SNR 100 the refinement by the centres' masses misses the fine peak of some patches
    (their log-likelihood over the states the search counts falls far below the exhaustive
    one's on the fine level); refining also the cells the bound cannot rule out finds every
    one (the log-likelihoods of the patches holding a projection equal the exhaustive ones),
    at a fraction of the exhaustive search's pairs."""
    basis, theta = _molecule_theta(7, 4)
    rng = np.random.default_rng(7)
    patches, sigma2 = _patches(rng, basis, theta, 24, snr=100.0)
    ups = 0.5

    def run(**kw):
        model = SearchModel(theta, basis, SearchSpec(0, 3, **kw), precision="float64")
        acc = SearchAccumulator(model)
        return search_chunk(patches, model, ups, sigma2, acc), acc.report

    exact, rep_exact = run(prune=0.0, cap=0, margin=0.0)
    masses, _ = run(margin=1.0)
    bound, rep = run(margin=1.0, bound=True)
    sig = np.arange(0, len(patches), 2)                      # the patches holding a projection
    assert np.sum(exact[sig] - masses[sig] > 1.0) >= 2
    np.testing.assert_allclose(bound[sig], exact[sig], rtol=1e-10)
    # the empty patches' diffuse posteriors stay on coarse levels (a quadrature of the same integral)
    assert np.all(np.abs(exact - bound) < 0.1)
    assert rep["pairs_level_3"] < 0.1 * rep_exact["pairs_level_3"]


def test_bound_is_a_stage_key():
    st = parse_schedule("lmax=2,iters=1,fine=7.5,coarse=30,bound=1")[0]
    assert st.search_spec().bound is True and st.to_dict()["bound"] == 1
    st0 = parse_schedule("lmax=2,iters=1,fine=7.5,coarse=30")[0]
    assert st0.search_spec().bound is False and "bound" not in st0.to_dict()
