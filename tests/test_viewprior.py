"""The orientation prior (numbaem.model.viewprior, theory section 14.1):
its E-step against the brute-force sum over states on both routes and in the search, its
M-step update against a numerical maximiser, the floor, and the switched-off bits."""
import json
import logging
import math

import numpy as np
import pytest
from scipy import optimize

from numbaem.data.patches import PatchSource
from numbaem.em import run as em
from numbaem.em import schedule
from numbaem.em.schedule import Stage
from numbaem.em.estep import SufficientStats, e_step_chunk, fold_log_prior, projection_spectra
from numbaem.em.search import SearchAccumulator, SearchModel, SearchSpec, search_chunk
from numbaem.model import hopf, viewprior
from numbaem.model.basis import FBBasis
from numbaem.model.projection import project_hopf, projection_matrices
from numbaem.model.rotations import random_rotations, rotation_grid
from numbaem.runtime.errors import NumbaemError

import naive
from test_em import make_micrograph, perturbed
from test_search import _molecule_theta, _patches


def _case(rng, L=5, lmax=2, K=6, n=3, sigma2=0.7):
    basis = FBBasis(L, lmax)
    rots = random_rotations(K, rng)
    A = projection_matrices(basis, rots)
    theta = rng.standard_normal(basis.M)
    proj = (A @ theta).reshape(K, L, L)
    patches = rng.standard_normal((n, L, L)) * math.sqrt(sigma2)
    patches[0] += naive.shift_crop(proj[1], (2, 7), L)
    return basis, A, theta, proj, patches, sigma2


@pytest.mark.parametrize("route", ["direct", "fft"])
def test_estep_with_a_rotation_prior_matches_brute_force(rng, route):
    """Folding delta_k = log(K p_k) into the energies gives the posteriors and log-likelihood
    of the prior (1 - upsilon) p_k / (2L-1)^2 per state, summed literally (rtol 1e-11: the
    folded energy rounds at 2 sigma^2 |delta| eps, far below)."""
    basis, A, theta, proj, patches, sigma2 = _case(rng)
    L, K = basis.L, len(A)
    p = rng.dirichlet(np.ones(K))
    delta = np.log(K * p)
    stats = SufficientStats.zeros(K, L)
    spectra = fold_log_prior(projection_spectra(proj, route=route, precision="float64"), delta, sigma2)
    ll, w, w_empty = e_step_chunk(patches, spectra, 0.3, sigma2, stats, keep_posteriors=True)
    logp_empty, logp, ll_ref = naive.brute_log_posteriors(patches, A, theta, 0.3, sigma2, log_prior=np.log(p))
    np.testing.assert_allclose(ll, ll_ref, rtol=1e-12)
    np.testing.assert_allclose(w, np.exp(logp - ll_ref[:, None, None, None]), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(w_empty, np.exp(logp_empty - ll_ref), rtol=1e-11)
    # a prior of 1/K folds nothing: the same bits as no prior
    st0, st1 = SufficientStats.zeros(K, L), SufficientStats.zeros(K, L)
    sp = projection_spectra(proj, route=route, precision="float64")
    a = e_step_chunk(patches, sp, 0.3, sigma2, st0, keep_posteriors=True)
    b = e_step_chunk(patches, fold_log_prior(sp, viewprior.log_offsets(np.ones(48), np.zeros(K, int)), sigma2), 0.3,
                     sigma2, st1, keep_posteriors=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and np.array_equal(st0.W, st1.W)


def test_uniform_weights_give_one_over_K_and_offsets_are_normalised(rng):
    rots = random_rotations(50, rng)
    bins = viewprior.bins_of_rotations(rots, 2)
    assert np.array_equal(viewprior.log_offsets(np.ones(48), bins), np.zeros(50))
    q = rng.uniform(0.1, 3, 48)
    d = viewprior.log_offsets(q, bins)
    np.testing.assert_allclose(np.sum(np.exp(d)) / 50, 1.0, rtol=1e-14)        # sum_k p_k = 1
    np.testing.assert_allclose(np.exp(d) / 50, q[bins] / q[bins].sum(), rtol=1e-13)
    # cells: nearest centre, equal counts for a fine uniform sample (equal areas)
    v = rng.standard_normal((200000, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    counts = np.bincount(viewprior.bins_of_directions(v, 2), minlength=48) / len(v)
    # HEALPix cells have equal areas; nearest-centre cells agree to a few per cent
    assert np.abs(counts * 48 - 1).max() < 0.25


def _expected_loglik(logq, bins, mass):
    """``sum_k N_k log p_k`` with ``p_k = q_{b(k)} / sum_k' q_{b(k')}``: the part of the
    expected complete log-likelihood that depends on the prior."""
    lq = logq[bins]
    return float(np.sum(mass * (lq - np.log(np.sum(np.exp(lq))))))


def test_update_maximises_the_expected_complete_loglik_and_respects_the_floor(rng):
    """With a vanishing floor the update is the maximiser of sum_k N_k log p_k (found here by
    BFGS over log q); with lambda the grid's p_k is (1 - lambda) p*_k + lambda / K >= lambda / K."""
    K = 120
    rots = random_rotations(K, rng)
    bins = viewprior.bins_of_rotations(rots, 1)           # 12 cells, about 10 rotations each
    mass = rng.gamma(0.5, 1.0, K) * (1 + 5 * (bins == 3))
    q0 = np.ones(12)
    q = viewprior.update_weights(q0, bins, mass, floor=1e-12)
    occ = np.bincount(bins, minlength=12) > 0
    res = optimize.minimize(lambda x: -_expected_loglik(x, bins, mass), np.zeros(12), method="BFGS",
                            options=dict(gtol=1e-10))
    p_opt = np.exp(res.x[bins]) / np.exp(res.x[bins]).sum()
    p = np.exp(viewprior.log_offsets(q, bins)) / K
    np.testing.assert_allclose(p, p_opt, rtol=1e-5)        # BFGS's own accuracy
    assert _expected_loglik(np.log(q), bins, mass) >= -res.fun - 1e-9
    lam = 0.05
    q_f = viewprior.update_weights(q0, bins, mass, floor=lam)
    p_f = np.exp(viewprior.log_offsets(q_f, bins)) / K
    # rtol 1e-10: p passes through log and exp (error ~ eps |log p| ~ 1e-15 * 6, times K sums)
    np.testing.assert_allclose(p_f, (1 - lam) * p + lam / K, rtol=1e-10)
    assert p_f.min() >= lam / K * (1 - 1e-12)
    assert np.all(occ)                                     # every cell on this grid


def test_bad_bins_and_floor_are_refused():
    for bad in (0, 3, -2, 32, 1.5):
        with pytest.raises(NumbaemError, match="power of two"):
            viewprior.check_nside(bad)
    for bad in (0, -0.1, 1.5, "x"):
        with pytest.raises(NumbaemError, match="floor"):
            viewprior.check_floor(bad)


def test_search_with_a_prior_and_nothing_pruned_equals_the_exhaustive_search(rng):
    """The search folds the level's p_k into the coarse and the sparse passes; with prune = 0
    it equals the exhaustive E-step on the fine level with the same prior (rtol 1e-12)."""
    basis, theta = _molecule_theta(5, 2)
    patches, sigma2 = _patches(rng, basis, theta, 6, snr=5.0)
    q = rng.uniform(0.2, 4.0, 12)
    spec = SearchSpec(0, 1, prune=0.0, cap=0, margin=0.0)
    model = SearchModel(theta, basis, spec, precision="float64", view_weights=q)
    acc = SearchAccumulator(model)
    ll, post, w_empty, final = search_chunk(patches, model, 0.4, sigma2, acc, patch_ids=np.arange(6),
                                            keep_posteriors=True)
    proj = project_hopf(theta, basis, 1)
    delta = viewprior.log_offsets(q, viewprior.bins_of_rotations(hopf.rotations(1), 1))
    st = SufficientStats.zeros(len(proj), basis.L)
    ll_ex, w_ex, we_ex = e_step_chunk(patches, fold_log_prior(projection_spectra(proj, route="direct",
                                                                                 precision="float64"), delta, sigma2),
                                      0.4, sigma2, st, keep_posteriors=True)
    assert np.all(final == 1)
    np.testing.assert_allclose(ll, ll_ex, rtol=1e-12)
    np.testing.assert_allclose(w_empty, we_ex, rtol=1e-11)
    for j in range(6):
        rots = np.concatenate([r for _, r, _ in post[j]])
        w = np.concatenate([x for _, _, x in post[j]])
        assert np.abs(w - w_ex[j, rots]).max() < 1e-12 * w_ex.max()


def _iteration_case(rng, K=40):
    L, lmax = 7, 3
    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M)
    mic, s2 = make_micrograph(rng, theta, basis, rotation_grid(K), 140, 12, snr=2.0)
    return basis, theta, mic, s2, schedule.Stage(lmax, 1, 1.0, K), em.Operator(basis, rotation_grid(K), 1 << 30)


def test_switched_off_and_uniform_prior_give_the_same_bits(rng):
    """No prior (view_weights None) and a uniform prior: the same iteration to the bit
    (delta_k = 0 exactly); the uniform prior's update then moves the weights."""
    basis, theta, mic, s2, stage, op = _iteration_case(rng)
    start = perturbed(rng, theta, 0.3)
    runs = []
    for q in (None, np.ones(48)):
        state = em.EMState(theta=start.copy(), lmax=stage.lmax, upsilon=0.5, sigma2=s2,
                           rng=np.random.default_rng(0), view_weights=q, view_grid_ratio=math.inf)
        rec = em.em_iteration(state, PatchSource([mic], basis.L), op, stage, budget=1 << 30)
        runs.append((state, rec))
    (a, ra), (b, rb) = runs
    assert np.array_equal(a.theta, b.theta) and a.upsilon == b.upsilon and ra["loglik"] == rb["loglik"]
    assert "view_weights" not in ra and len(rb["view_weights"]) == 48
    np.testing.assert_allclose(np.mean(b.view_weights), 1.0, rtol=1e-14)


def test_iteration_update_is_the_grid_mass_per_cell(rng):
    """The weights after an iteration follow from the E-step's W alone: N_k = sum_l W[k, l]."""
    from numbaem.em.estep import stream_stats
    basis, theta, mic, s2, stage, op = _iteration_case(rng)
    q = rng.uniform(0.5, 2.0, 12)
    state = em.EMState(theta=theta.copy(), lmax=stage.lmax, upsilon=0.5, sigma2=s2, rng=np.random.default_rng(0),
                       view_weights=q.copy(), view_floor=0.1, view_grid_ratio=math.inf)
    rec = em.em_iteration(state, PatchSource([mic], basis.L), op, stage, budget=1 << 30)
    src = PatchSource([mic], basis.L)
    bins = viewprior.bins_of_rotations(op.rots, 1)
    sp = fold_log_prior(projection_spectra(op.project(theta), sigma2=s2), viewprior.log_offsets(q, bins), s2)
    stats = stream_stats(src, np.arange(src.n_patches), sp, 0.5, s2, rec["chunk"])
    assert rec["loglik"] == stats.loglik
    np.testing.assert_allclose(state.view_weights,
                               viewprior.update_weights(q, bins, stats.W.sum(axis=(1, 2)), 0.1), rtol=1e-12)


@pytest.mark.parametrize("route", ["direct", "fft"])
def test_iteration_with_prior_and_junk_class_matches_brute_force(rng, monkeypatch, route):
    """One whole iteration with the orientation prior and the junk class against the explicit
    sum over states (naive.brute_log_posteriors with the per-rotation prior and the junk row)
    and the brute-force normal equations: the molecule from rows 0..K-1 only, the junk
    coefficients from row K, varsigma = junk mass / Nd, upsilon as before, the prior's update.
    Tolerances: the solves amplify round-off by cond(H) (about 1e3 here): rtol 1e-8."""
    monkeypatch.setenv("NUMBAEM_ROUTE", route)
    L, lmax, K = 5, 2, 8
    basis = FBBasis(L, lmax)
    rots = rotation_grid(K)
    theta = rng.standard_normal(basis.M)
    mic, s2 = make_micrograph(rng, theta, basis, rots, 40, 3, snr=4.0)
    mic[20:25, 2:7] += 3.0 * np.sqrt(s2)                           # a contaminant
    src = PatchSource([mic], L)
    A = projection_matrices(basis, rots)
    A_J = em.junk_operator(L)
    q = rng.uniform(0.5, 2.0, 12)
    junk_theta = np.array([0.5] * A_J.shape[1])
    state = em.EMState(theta=theta.copy(), lmax=lmax, upsilon=0.4, sigma2=s2, rng=np.random.default_rng(0),
                       view_weights=q.copy(), view_floor=0.05, junk_theta=junk_theta.copy(), varsigma=0.1,
                       view_grid_ratio=math.inf)
    stage = schedule.Stage(lmax, 1, 1.0, K)
    rec = em.em_iteration(state, src, em.Operator(basis, rots, 1 << 30), stage, budget=1 << 30,
                          precision="float64")
    patches = src.get(np.arange(src.n_patches))
    bins = viewprior.bins_of_rotations(rots, 1)
    p = q[bins] / q[bins].sum()
    logp_empty, logp, ll = naive.brute_log_posteriors(patches, A, theta, 0.4, s2, log_prior=np.log(p),
                                                      junk=((A_J @ junk_theta).reshape(L, L), 0.1))
    np.testing.assert_allclose(rec["loglik"], ll.sum(), rtol=1e-11)
    w = np.exp(logp - ll[:, None, None, None])
    H, b = naive.brute_normal_equations(patches, A, w[:, :K], L)
    np.testing.assert_allclose(state.theta, np.linalg.solve(H, b), rtol=1e-8, atol=1e-8 * np.abs(state.theta).max())
    H_J, b_J = naive.brute_normal_equations(patches, A_J[None], w[:, K:], L)
    np.testing.assert_allclose(state.junk_theta, np.linalg.solve(H_J, b_J), rtol=1e-8)
    np.testing.assert_allclose(state.varsigma, w[:, K].sum() / len(patches), rtol=1e-11)
    np.testing.assert_allclose(state.upsilon, np.exp(logp_empty - ll).sum() / len(patches), rtol=1e-11)
    np.testing.assert_allclose(state.view_weights,
                               viewprior.update_weights(q, bins, w[:, :K].sum(axis=(0, 2, 3)), 0.05), rtol=1e-10)
    assert rec["varsigma"] == state.varsigma


def test_junk_class_refuses_the_search(rng):
    """The search has no junk row: one sentence (switched off, the iteration is the primitives'
    composition to the bit: test_em.py::test_without_ctf_or_whitening...)."""
    basis, theta, mic, s2, stage, op = _iteration_case(rng)
    start = perturbed(rng, theta, 0.3)
    c = em.EMState(theta=start.copy(), lmax=stage.lmax, upsilon=0.5, sigma2=s2, rng=np.random.default_rng(0),
                   junk_theta=np.zeros(em.junk_operator(basis.L).shape[1]), varsigma=0.1)
    with pytest.raises(NumbaemError, match="exhaustive"):
        em.em_iteration(c, PatchSource([mic], basis.L), em.SearchOperator(basis, schedule.Stage(
            stage.lmax, 1, 1.0, fine=30.0).search_spec()), schedule.Stage(stage.lmax, 1, 1.0, fine=30.0),
            budget=1 << 30)


@pytest.mark.parametrize("model", ["image", "field"])
def test_checkpoint_resume_with_both_extensions_is_bit_exact(tmp_path, model):
    """Stopped after 2 of 4 iterations and resumed from the checkpoint: the prior weights, varsigma
    and the junk volume (or the junk field's spectrum) travel in state.json and the run ends with
    the same bits."""
    from numbaem.em.checkpoint import Checkpointer, run_inputs
    from test_checkpoint import L as LC, MEMORY as MEM, SIGMA2, make_micrograph as ck_micrograph

    mic = ck_micrograph(tmp_path / "m.mrc")
    sched = [schedule.Stage(2, 2, 0.5, 16), schedule.Stage(3, 2, 0.5, 32)]
    kw = dict(sigma2=SIGMA2, schedule=sched, memory=MEM, progress=False, orientation_prior=1,
              prior_grid_ratio=math.inf, junk_class=model)      # updated on these coarse grids too
    inputs = run_inputs([mic], L=LC, sigma2=SIGMA2, estimate_noise=False, schedule=sched, seed=5, tikhonov=0.0,
                        upsilon0=0.5, init="random", memory=MEM)

    def go(directory, stop=None, resume=False):
        src = PatchSource.from_files([mic], LC)
        with Checkpointer(directory, inputs) as ck:
            state = ck.begin(resume=resume)
            return em.reconstruct(src, "random", rng=np.random.default_rng(5), state=state,
                                  callback=lambda st, rec: ck.save(st, rec), should_stop=stop, **kw).state

    ref = go(tmp_path / "a")
    n = []
    go(tmp_path / "b", stop=lambda: n.append(1) or len(n) > 2)
    with Checkpointer(tmp_path / "b", inputs) as ck:
        saved = ck.load()
    junk = "junk_theta" if model == "image" else "junk_lam"
    assert saved.total_iterations == 2 and saved.view_weights is not None and getattr(saved, junk) is not None
    assert saved.view_grid_ratio == math.inf           # written as null (JSON has no infinity), read back
    # a state.json written before the grid rule has no ratio: those runs updated on every grid
    doc = json.loads((tmp_path / "b" / "state.json").read_text())
    assert doc["view_grid_ratio"] is None
    del doc["view_grid_ratio"]
    (tmp_path / "b" / "state.json").write_text(json.dumps(doc))
    with Checkpointer(tmp_path / "b", inputs) as ck:
        assert ck.load().view_grid_ratio == math.inf
    out = go(tmp_path / "b", resume=True)
    assert np.array_equal(out.theta, ref.theta) and np.array_equal(out.view_weights, ref.view_weights)
    assert np.array_equal(getattr(out, junk), getattr(ref, junk)) and out.varsigma == ref.varsigma
    assert out.upsilon == ref.upsilon


def test_reconstruct_refuses_bad_extension_options(rng):
    basis, theta, mic, s2, stage, op = _iteration_case(rng)
    src = PatchSource([mic], basis.L)
    with pytest.raises(NumbaemError, match="power of two"):
        em.reconstruct(src, "random", sigma2=s2, schedule=[stage], orientation_prior=3, progress=False)
    with pytest.raises(NumbaemError, match="floor"):
        em.reconstruct(src, "random", sigma2=s2, schedule=[stage], orientation_prior=2, prior_floor=0,
                       progress=False)
    with pytest.raises(NumbaemError, match="grid ratio"):
        em.reconstruct(src, "random", sigma2=s2, schedule=[stage], orientation_prior=2, prior_grid_ratio=-1,
                       progress=False)
    with pytest.raises(NumbaemError, match="exhaustive"):
        em.reconstruct(src, "random", sigma2=s2, junk_class=True, progress=False,
                       schedule=[stage, Stage(stage.lmax, 1, 1.0, fine=30.0)])


def test_search_iteration_updates_the_prior_from_its_rows(rng):
    """A search stage: the weights' update bins each statistics row by its own direction, with
    the fine level's rotations per cell (theory section 14.1)."""
    basis, theta = _molecule_theta(5, 2)
    mic, s2 = make_micrograph(rng, theta, basis, hopf.rotations(1), 60, 6, snr=5.0)
    stage = schedule.Stage(2, 1, 1.0, fine=30.0)
    spec = stage.search_spec()
    q = rng.uniform(0.5, 2.0, 12)
    state = em.EMState(theta=theta.copy(), lmax=2, upsilon=0.5, sigma2=s2, rng=np.random.default_rng(0),
                       view_weights=q.copy())
    src = PatchSource([mic], basis.L)
    em.em_iteration(state, src, em.SearchOperator(basis, spec), stage, budget=1 << 30, precision="float64")
    model = SearchModel(theta, basis, spec, sigma2=s2, precision="float64", view_weights=q)
    stats = model.stream_stats(src, np.arange(src.n_patches), 0.5, s2, 64)
    ref = viewprior.update_weights(q, viewprior.bins_of_rotations(hopf.rotations(spec.fine), 1),
                                   viewprior.rotation_mass(stats.W), 0.05,
                                   mass_bins=viewprior.bins_of_rotations(model.rotations(stats.rotations), 1))
    np.testing.assert_allclose(state.view_weights, ref, rtol=1e-10)
    assert not np.allclose(state.view_weights, q)
    # the 30-degree level resolves 59-degree cells at the default ratio 0.6, not at 0.4: held
    coarse = em.EMState(theta=theta.copy(), lmax=2, upsilon=0.5, sigma2=s2, rng=np.random.default_rng(0),
                        view_weights=q.copy(), view_grid_ratio=0.4)
    rec = em.em_iteration(coarse, src, em.SearchOperator(basis, spec), stage, budget=1 << 30, precision="float64")
    assert rec["view_prior"] == "held" and np.array_equal(coarse.view_weights, q)


def test_grid_step_and_cell_size():
    """The grid step ``(8 pi^2 / K)^(1/3)`` is each Hopf level's step within 2%; the cell size is
    the side of a HEALPix cell's area (29.3 degrees at nside 2); with 48 cells and the default ratio
    0.6, 2,729 rotations and more and the 15-degree level resolve them, 1,000 and the 30-degree level
    do not."""
    for r in range(6):
        assert abs(math.degrees(viewprior.grid_step(hopf.size(r))) / hopf.level_step(r) - 1) < 0.02
    assert math.degrees(viewprior.cell_size(2)) == pytest.approx(29.316, abs=1e-3)
    assert viewprior.resolves(3000, 2) and viewprior.resolves(hopf.size(2), 2)
    assert not viewprior.resolves(1000, 2) and not viewprior.resolves(hopf.size(1), 2)
    assert viewprior.resolves(1000, 1) and viewprior.resolves(10, 2, math.inf)
    assert viewprior.resolves(2729, 2) and not viewprior.resolves(2728, 2)      # the README's threshold


def test_prior_is_held_on_a_coarse_grid_and_updated_on_a_fine_one(rng, caplog):
    """The rule ``grid_step(K) <= ratio * cell_size``: just below the ratio that 40 rotations need for
    12 cells the weights are held (the same array, the record says 'held', the log says why), just
    above they are updated; either way the E-step used them (the same log-likelihood and volume)."""
    basis, theta, mic, s2, stage, op = _iteration_case(rng)
    q = rng.uniform(0.5, 2.0, 12)
    need = viewprior.grid_step(40) / viewprior.cell_size(1)
    out = []
    for ratio in (need * (1 - 1e-9), need * (1 + 1e-9)):
        state = em.EMState(theta=theta.copy(), lmax=stage.lmax, upsilon=0.5, sigma2=s2, rng=np.random.default_rng(0),
                           view_weights=q.copy(), view_grid_ratio=ratio)
        with caplog.at_level(logging.INFO, logger="numbaem.em.run"):
            rec = em.em_iteration(state, PatchSource([mic], basis.L), op, stage, budget=1 << 30)
        out.append((state, rec))
    (held, rh), (upd, ru) = out
    assert rh["view_prior"] == "held" and np.array_equal(held.view_weights, q)
    assert "orientation prior held" in caplog.text
    assert ru["view_prior"] == "updated" and not np.allclose(upd.view_weights, q)
    assert rh["loglik"] == ru["loglik"] and np.array_equal(held.theta, upd.theta)


def test_a_schedule_that_never_resolves_the_cells_warns(rng, caplog):
    """No stage fine enough: one warning, and the prior ends uniform; a ratio that lets the stage
    update it: no warning, and the prior moves."""
    basis, theta, mic, s2, stage, op = _iteration_case(rng)
    src = PatchSource([mic], basis.L)
    kw = dict(sigma2=s2, schedule=[stage], progress=False, orientation_prior=1)
    with caplog.at_level(logging.WARNING, logger="numbaem.em.run"):
        held = em.reconstruct(src, "random", rng=np.random.default_rng(1), **kw)
    assert "never updated" in caplog.text and np.array_equal(held.state.view_weights, np.ones(12))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="numbaem.em.run"):
        moved = em.reconstruct(src, "random", rng=np.random.default_rng(1), prior_grid_ratio=2.0, **kw)
    assert "never updated" not in caplog.text and not np.allclose(moved.state.view_weights, 1.0)


def test_view_distribution_plot_is_written_and_bad_weights_refused(tmp_path):
    from numbaem.analysis.plots import plot_view_distribution
    q = np.ones(48)
    q[:4] = 10.0
    plot_view_distribution(q, tmp_path / "v.png", truth=np.full(48, 1 / 48))
    assert (tmp_path / "v.png").stat().st_size > 1000
    with pytest.raises(NumbaemError, match="HEALPix"):
        plot_view_distribution(np.ones(47), tmp_path / "w.png")
    with pytest.raises(NumbaemError):
        plot_view_distribution(q, tmp_path / "v.png")          # exists, no force


def test_known_weights_start_the_prior_and_fixed_weights_stay_fixed(rng):
    """prior_weights start the prior (scaled to mean 1); with prior_fixed the E-step uses them
    (the same iteration as a state holding them) and no M-step moves them; without it they move."""
    basis, theta, mic, s2, stage, op = _iteration_case(rng)
    src = PatchSource([mic], basis.L)
    q = rng.uniform(0.5, 2.0, 12)
    kw = dict(sigma2=s2, schedule=[Stage(stage.lmax, 2, 1.0, 40)], progress=False, estimate_noise=False)
    fixed = em.reconstruct(src, "random", rng=np.random.default_rng(1), prior_weights=q, prior_fixed=True, **kw)
    np.testing.assert_array_equal(fixed.state.view_weights, q / q.mean())
    assert fixed.state.view_fixed
    moved = em.reconstruct(src, "random", rng=np.random.default_rng(1), prior_weights=3 * q,
                           prior_grid_ratio=math.inf, **kw)
    assert not moved.state.view_fixed and not np.allclose(moved.state.view_weights, q / q.mean())
    # the fixed run's first iteration is em_iteration on a state holding q (its E-step used q)
    r = np.random.default_rng(1)
    th0 = em.initial_theta("random", basis.L, stage.lmax, rng=r, source=src, sigma2=s2)
    state = em.EMState(theta=th0, lmax=stage.lmax, upsilon=0.5, sigma2=s2, rng=r, view_weights=q / q.mean())
    rec = em.em_iteration(state, src, op, Stage(stage.lmax, 2, 1.0, 40), budget=1 << 30, estimate_noise=False)
    assert rec["loglik"] == fixed.history[0]["loglik"]
    assert moved.history[0]["loglik"] == rec["loglik"]       # the same start: the same first E-step


def test_known_weights_are_checked():
    with pytest.raises(NumbaemError, match="12 nside"):
        viewprior.check_weights(np.ones(40))
    with pytest.raises(NumbaemError, match="positive"):
        viewprior.check_weights(np.r_[np.ones(47), 0.0])
    with pytest.raises(NumbaemError, match="nside=1"):
        viewprior.check_weights(np.ones(48), 1)
    np.testing.assert_array_equal(viewprior.check_weights(np.ones(48), 2), np.ones(48))


def test_fixed_prior_without_weights_is_refused(rng):
    basis, theta, mic, s2, stage, op = _iteration_case(rng)
    with pytest.raises(NumbaemError, match="prior_weights"):
        em.reconstruct(PatchSource([mic], basis.L), "random", sigma2=s2, schedule=[stage], orientation_prior=2,
                       prior_fixed=True, progress=False)
