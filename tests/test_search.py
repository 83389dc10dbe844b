"""Coarse-to-fine search (numbaem.em.search) against the exhaustive E-step on the fine grid,
its pruning bound, local searches and records, and the single-precision EM."""
import math

import numpy as np
import pytest

from numbaem.data.patches import PatchSource
from numbaem.em import run as em
from numbaem.em.estep import Records, SufficientStats, e_step_chunk, projection_spectra, shift_index, stream_stats
from numbaem.em.mstep import normal_equations
import numbaem.em.search as search
from numbaem.em.search import (SearchAccumulator, SearchModel, SearchSpec, SearchStats, search_chunk,
                               search_normal_equations, search_stats)
from numbaem.model import hopf
from numbaem.model.basis import FBBasis, expand, synthesize
from numbaem.model.projection import project, project_hopf, projection_matrices
from numbaem.model.rotations import random_rotations
from numbaem.runtime.errors import NumbaemError

import naive


def _molecule_theta(L, lmax):
    """A smooth, compact volume (a projection of it fades at the box's edge, as a particle's does)."""
    from numbaem.runtime.fourier import downsample
    from numbaem.sim.molecule import synthetic_molecule
    basis = FBBasis(L, lmax)
    return basis, expand(downsample(synthetic_molecule(3 * L, rng=0), L), basis)


def _patches(rng, basis, theta, n, snr):
    """``n`` patches, every other one holding a projection at a Haar-random rotation and some shift."""
    L = basis.L
    P = project(theta, basis, random_rotations(n, rng))
    sigma2 = float(np.mean(np.sum(P ** 2, axis=(1, 2)))) / (L * L * snr)
    y = rng.standard_normal((n, L, L)) * math.sqrt(sigma2)
    shifts = [(0, 0), (1, 0), (0, 1), (1, 1), (2 * L - 1, 0), (2 * L - 1, 2 * L - 1), (0, 2 * L - 1), (3, 2)]
    for j in range(0, n, 2):
        y[j] += naive.shift_crop(P[j], shifts[(j // 2) % len(shifts)], L)
    return y, sigma2


def _exhaustive(patches, theta, basis, level, upsilon, sigma2):
    proj = project_hopf(theta, basis, level)
    st = SufficientStats.zeros(len(proj), basis.L)
    ll, w, we = e_step_chunk(patches, projection_spectra(proj, route="direct"), upsilon, sigma2, st,
                             keep_posteriors=True)
    return st, ll, w, we


def _level_scores(patches, proj, upsilon, sigma2, delta=None):
    """Every (patch, rotation) of the projections ``proj`` exhaustively, by the direct route's
    kernels (tested against brute force in test_estep.py): ``(lhat, mass, lse, lp)`` with
    ``lhat`` the log of the pair's sum over the shifts (prior included; a sum the kernels cut
    to 0, every shift more than exp(-50) below the block's best, read as exp(-50)), its
    posterior mass summed over the shifts, the patch's log normaliser (these states and the
    empty state) and the log prior of one state (``delta``: per-rotation log prior offsets,
    folded into the energies)."""
    from numbaem.em import kernels
    from numbaem.em.estep import block_scales, direct_spectra, fold_log_prior
    L = patches.shape[1]
    sp = direct_spectra(proj)
    if delta is not None:
        sp = fold_log_prior(sp, delta, sigma2)
    n = len(patches)
    B, KB = sp.P.shape[0], sp.KB
    bmax, lsum = np.empty((n, B)), np.empty((n, B, KB))
    kernels.dense_scores(np.ascontiguousarray(patches), sp.P, sp.E, n, 1.0 / sigma2, 0.5 / sigma2, False,
                         np.empty((1, 1, 1, 1, 1)), bmax, lsum)
    lp = math.log1p(-upsilon) - math.log((2 * L - 1) ** 2 * sp.K)
    f, _, lse = block_scales(bmax + lp, lsum.sum(axis=2), math.log(upsilon))
    lhat = np.repeat(bmax + lp, KB, axis=1)[:, :sp.K] + np.log(np.maximum(lsum.reshape(n, -1)[:, :sp.K],
                                                                          math.exp(kernels.LOG_NEGLIGIBLE)))
    return lhat, (f[:, :, None] * lsum).reshape(n, -1)[:, :sp.K], lse, lp


def _exhaustive_masses(patches, theta, basis, level, upsilon, sigma2):
    """Posterior mass of every (patch, rotation) of ``level`` (summed over shifts), exhaustively."""
    return _level_scores(patches, project_hopf(theta, basis, level), upsilon, sigma2)[1]


@pytest.mark.parametrize("snr", [5.0, 100.0])
def test_nothing_pruned_equals_the_exhaustive_search(rng, snr):
    """prune = 0 and no cap: every patch refines to the fine level having scored every
    rotation, and the posteriors, log-likelihoods, statistics and normal equations equal
    those of the exhaustive E-step on the fine level to round-off (two refinement steps).
    At SNR 100 most coarse rotations score more than exp(-50) below the best (mass 0) while
    some of their children do not: they are refined all the same."""
    basis, theta = _molecule_theta(5, 2)
    L = basis.L
    patches, sigma2 = _patches(rng, basis, theta, 6, snr=snr)
    spec = SearchSpec(0, 2, prune=0.0, cap=0, margin=0.0)
    model = SearchModel(theta, basis, spec, precision="float64")
    acc = SearchAccumulator(model)
    ll, post, w_empty, final = search_chunk(patches, model, 0.4, sigma2, acc, patch_ids=np.arange(6),
                                            keep_posteriors=True)
    st_ex, ll_ex, w_ex, we_ex = _exhaustive(patches, theta, basis, 2, 0.4, sigma2)
    assert np.all(final == 2)
    np.testing.assert_allclose(ll, ll_ex, rtol=1e-13)
    np.testing.assert_allclose(w_empty, we_ex, rtol=1e-12)
    for j in range(6):
        assert {lv for lv, _, _ in post[j]} == {2}                # nothing of levels 0 and 1 counts
        rots = np.concatenate([r for _, r, _ in post[j]])
        w = np.concatenate([x for _, _, x in post[j]])
        assert np.array_equal(np.sort(rots), np.arange(hopf.size(2)))
        assert np.abs(w - w_ex[j, rots]).max() < 1e-13 * w_ex.max()
    stats = acc.to_stats()
    rows = stats.rotations - model.offset(2)
    assert np.all(rows >= 0)
    idx = shift_index(L)
    np.testing.assert_allclose(stats.W, st_ex.W[rows][:, idx][:, :, idx], rtol=1e-12, atol=1e-15)
    H, b = search_normal_equations(stats, spec, basis)
    A = projection_matrices(basis, hopf.rotations(2))
    H_ex, b_ex = normal_equations([(slice(0, len(A)), A)], st_ex.W, st_ex.G, L, basis.M)
    assert np.abs(H - H_ex).max() < 1e-12 * np.abs(H_ex).max()
    assert np.abs(b - b_ex).max() < 1e-12 * np.abs(b_ex).max()
    rep = acc.report
    assert rep["pairs_level_2"] == 6 * hopf.size(2) and rep["mass_pruned"] == 0.0


def test_pruned_mass_is_reported_and_bounded():
    """A refined patch leaves the tail of its coarse posterior (at most prune, reported)
    at the coarse resolution; its fine posterior mass outside the region refined (against
    the exhaustive search on the fine level) stays within 5 prune where the coarse level
    resolves the posterior (here SNR 30, levels 15 -> 7.5 degrees; measured at most 2.1
    prune over four data sets, the coarse grid being a quadrature of the same integral; at
    30 degrees the same SNR misses up to 6% on some patches, which is why the coarse step
    is a stage option), and the patches with diffuse posteriors (no signal) stay coarse."""
    basis, theta = _molecule_theta(7, 4)
    rng = np.random.default_rng(100)
    patches, sigma2 = _patches(rng, basis, theta, 16, snr=30.0)
    prune_mass = 1e-3
    spec = SearchSpec(2, 3, prune=prune_mass, cap=32, margin=1.5)
    model = SearchModel(theta, basis, spec, precision="float64")
    acc = SearchAccumulator(model)
    ll, post, _, final = search_chunk(patches, model, 0.5, sigma2, acc, patch_ids=np.arange(16),
                                      keep_posteriors=True)
    assert acc.report["max_mass_pruned"] <= prune_mass
    refined = final == 3
    assert 4 <= refined.sum() <= 8 and not refined[1::2].any()   # the empty patches stay at 15 degrees
    masses = _exhaustive_masses(patches, theta, basis, 3, 0.5, sigma2)
    outside = []
    for j in np.nonzero(refined)[0]:
        coarse = sum(w.sum() for lv, _, w in post[j] if lv < 3)
        if coarse > prune_mass:                                   # refined in part only
            continue
        fine = np.zeros(hopf.size(3), bool)
        for lv, rots, _ in post[j]:
            if lv == 3:
                fine[rots] = True
        outside.append(masses[j][~fine].sum())
    assert len(outside) >= 3 and max(outside) <= 5 * prune_mass
    # far fewer pairs scored than an exhaustive search on the fine level
    assert acc.report["pairs_level_3"] < 0.05 * 16 * hopf.size(3)


def test_prune_matches_a_greedy_twin(rng):
    """The refinement decision drops, per patch, the longest tail of smallest masses whose sum
    stays within eps (no cap, no margin: every other rotation is refined, the tail stays and
    its mass is reported)."""
    from numbaem.em.search import decide
    ptr = np.array([0, 5, 5, 12])
    mass = rng.random(12) ** 3 * 0.01
    rot = np.array([3, 7, 1, 0, 9, 2, 5, 4, 11, 8, 6, 10])
    spec = SearchSpec(0, 1, prune=2e-3 / (1.0 - search.STATS_SHARE), cap=0, margin=0.0)
    assert spec.eps == pytest.approx(2e-3, rel=1e-15)
    keep, dropped, partial = np.ones(12, bool), np.zeros(3), np.zeros(3, bool)
    rptr, ridx = decide(0, ptr, rot, mass, np.ones(3, bool), spec, 0, keep, dropped, partial)
    for j in range(3):
        m = mass[ptr[j]:ptr[j + 1]]
        order = np.argsort(m)
        tot, drop = 0.0, np.zeros(len(m), bool)
        for i in order:
            if tot + m[i] > spec.eps:
                break
            tot += m[i]
            drop[i] = True
        assert np.array_equal(keep[ptr[j]:ptr[j + 1]], drop)          # the tail stays at this level
        assert np.array_equal(ridx[rptr[j]:rptr[j + 1]], np.sort(rot[ptr[j]:ptr[j + 1]][~drop]))
        assert dropped[j] == pytest.approx(tot, rel=1e-12, abs=1e-18)
    assert not partial.any()


def test_search_statistics_merge_by_rotation(rng):
    """Two tasks' statistics on different rows add into the sorted union (the Dask reduce)."""
    from numbaem.em.search import add_stat_arrays, stats_from_arrays
    a = SearchStats(rng.random((3, 9, 9)), rng.random((3, 5, 5)), np.array([1, 4, 7]), 3, 0.5, 2.0, -1.0,
                    search=dict(patches=3, max_mass_pruned=1e-4), records=Records({0: np.ones((1, 4), np.float32)}))
    b = SearchStats(rng.random((2, 9, 9)), rng.random((2, 5, 5)), np.array([4, 9]), 2, 0.25, 1.0, -2.0,
                    search=dict(patches=2, max_mass_pruned=3e-4), records=Records({5: np.zeros((0, 4), np.float32)}))
    out = stats_from_arrays(add_stat_arrays(a.to_arrays(), b.to_arrays()))
    assert np.array_equal(out.rotations, [1, 4, 7, 9])
    np.testing.assert_allclose(out.W[1], a.W[1] + b.W[0])
    np.testing.assert_allclose(out.g[3], b.g[1])
    assert out.n_patches == 5 and out.search == dict(patches=5, max_mass_pruned=3e-4)
    assert set(out.records.quats) == {0, 5}


def test_local_search_starts_near_the_record(rng):
    """A patch with a record is scored only near it (at two levels above the fine one), and
    still finds its rotation: a record at the true rotation gives the exhaustive
    posterior's peak; a record far from it does not (the local search cannot leave)."""
    basis, theta = _molecule_theta(7, 4)
    L = basis.L
    R = random_rotations(1, rng)
    P = project(theta, basis, R)
    sigma2 = float(np.sum(P ** 2)) / (L * L * 50.0)
    y = P + rng.standard_normal((1, L, L)) * math.sqrt(sigma2)
    from numbaem.model.rotations import geodesic_distance, matrices_to_quaternions
    spec = SearchSpec(0, 3, prune=1e-3, cap=32, margin=1.5, local=20.0)
    out = {}
    for name, rot in (("near", R[0]), ("far", R[0] @ random_rotations(1, np.random.default_rng(9))[0])):
        rec = Records({7: matrices_to_quaternions(rot[None]).astype(np.float32)})
        model = SearchModel(theta, basis, spec, precision="float64", previous=rec)
        acc = SearchAccumulator(model)
        new = Records()
        search_chunk(y, model, 0.3, sigma2, acc, patch_ids=np.array([7]), records=new)
        assert acc.report["patches_local"] == 1 and "pairs_level_0" not in acc.report   # no global pass
        assert acc.report["pairs_level_1"] < hopf.size(1) // 10                          # a few cells near the record
        from numbaem.model.rotations import quaternions_to_matrices
        best = quaternions_to_matrices(new.quats[7][:1].astype(np.float64))[0]
        out[name] = math.degrees(geodesic_distance(best, R[0]))
    assert out["near"] < 6.0          # level 3 is 7.5 degrees apart
    assert out["far"] > 20.0


def test_search_stage_runs_through_reconstruct_and_records(rng):
    """A schedule with an exhaustive stage, a search and a local search: the log carries the
    search figures, the patches holding a whole projection get records and are searched
    locally, and the likelihood stays within the exhaustive stage's range (the wiring)."""
    basis, theta = _molecule_theta(7, 4)
    L = basis.L
    mic = np.zeros((70, 70))
    P = project(theta, basis, random_rotations(9, rng))
    for k, p in enumerate(P):
        r, c = divmod(k, 3)
        mic[3 * L * r:3 * L * r + L, 3 * L * c:3 * L * c + L] += p     # each inside one patch
    sigma2 = float(np.mean(np.sum(P ** 2, axis=(1, 2)))) / (L * L * 50.0)
    mic += rng.standard_normal(mic.shape) * math.sqrt(sigma2)
    src = PatchSource([mic], L)
    sched = em.parse_schedule("lmax=4,iters=1,rotations=300;lmax=4,iters=1,fine=15,coarse=30;"
                              "lmax=4,iters=2,fine=7.5,coarse=30,local=25")
    res = em.reconstruct(src, synthesize(theta, basis), sigma2=sigma2, schedule=sched, rng=rng, progress=False)
    h = res.history
    assert "search_levels" not in h[0] and h[1]["search_levels"] == [1, 2] and h[2]["search_levels"] == [1, 2, 3]
    assert h[1]["search_local"] == 0 and 6 <= h[3]["search_local"] <= 20
    assert h[2]["search_final_level"][3] >= 6                           # the whole projections reach 7.5 degrees
    assert 0 < h[3]["search_fraction_all"] < 0.1
    assert len(res.state.records) == src.n_patches
    assert sum(len(q) > 0 for q in res.state.records.quats.values()) >= 6
    for r in h[1:]:
        assert r["search_mass_pruned_max"] <= 1e-3
        assert abs(r["loglik"] - h[0]["loglik"]) < 0.05 * abs(h[0]["loglik"])


def test_schedule_keys_for_the_search():
    st = em.parse_schedule("lmax=4,iters=2,fine=7.5,coarse=30,prune=1e-2,local=15")[0]
    spec = st.search_spec()
    assert (spec.coarse, spec.fine, spec.prune, spec.local) == (1, 3, 1e-2, 15.0)
    assert st.size == sum(hopf.size(r) for r in (1, 2, 3))
    assert em.parse_schedule("lmax=4,iters=2,fine=7.5")[0].search_spec().coarse == 1   # default 30 degrees
    assert em.parse_schedule("lmax=4,iters=2,fine=30")[0].search_spec().coarse == 0    # one level above
    assert "fine" not in em.parse_schedule("lmax=4,iters=2,rotations=50")[0].to_dict()
    for bad, match in [("lmax=4,iters=2,prune=0.1", "fine"), ("lmax=4,iters=2,fine=7.5,rotations=100", "either"),
                       ("lmax=4,iters=2,fine=7.5,prune=1.5", "prune"), ("lmax=4,iters=2,fine=0.01", "finer"),
                       ("lmax=4,iters=2,fine=30,coarse=15", "finer than its coarse"), ("lmax=4,iters=2,fine=x", "fine=.x. is not an angle")]:
        with pytest.raises(NumbaemError, match=match):
            em.parse_schedule(bad)


@pytest.mark.slow
def test_single_precision_em_stays_with_double(rng):
    """The EM in single precision (scores and correlations in float32, sums over patches in
    float64) stays within 1e-4 relative of the float64 run over four iterations at an SNR
    where the automatic choice takes float32 (SNR 10; its score rounding estimate 4e-4)."""
    basis, theta = _molecule_theta(7, 4)
    L = basis.L
    src_rng = np.random.default_rng(11)
    N = 140
    mic = np.zeros((N, N))
    P = project(theta, basis, random_rotations(36, src_rng))
    for k, p in enumerate(P):
        r, c = divmod(k, 6)
        s = (2 * L + 1) * np.array([r, c]) + src_rng.integers(0, 3, 2)
        mic[s[0]:s[0] + L, s[1]:s[1] + L] += p
    sigma2 = float(np.mean(np.sum(P ** 2, axis=(1, 2)))) / (L * L * 10.0)
    mic += src_rng.standard_normal(mic.shape) * math.sqrt(sigma2)
    src = PatchSource([mic], L)
    th0 = theta + 0.3 * np.linalg.norm(theta) / math.sqrt(len(theta)) * src_rng.standard_normal(len(theta))
    sched = [em.Stage(4, 4, 1.0, 200)]
    runs = {}
    for prec in ("float64", "float32"):
        res = em.reconstruct(src, synthesize(th0, basis), sigma2=sigma2, schedule=sched, rng=np.random.default_rng(1),
                             progress=False, precision=prec)
        runs[prec] = res
        assert all(r["precision"] == prec for r in res.history)
    a, b = runs["float64"], runs["float32"]
    for ra, rb in zip(a.history, b.history):
        assert abs(ra["loglik"] - rb["loglik"]) <= 1e-4 * abs(ra["loglik"])
    assert np.linalg.norm(b.theta - a.theta) <= 1e-4 * np.linalg.norm(a.theta)
    # and the automatic choice at this SNR is single precision
    from numbaem.em.estep import choose_precision
    assert choose_precision(project(th0, basis, random_rotations(50, rng)), sigma2) == np.float32


def test_search_on_ctf_groups_equals_the_brute_force_grouped_em(rng):
    """Nothing pruned, CTF groups (theory section 11): the search's log-likelihood, per-group
    statistics and normal equations equal the brute-force sums over every state of the fine
    level with the explicit matrices ``Psi_g A_k`` (tests/naive.py)."""
    from numbaem.em.search import GroupSearchStats
    from numbaem.model.ctf import CTFParams, ImageFilter, filter_matrices
    basis, theta = _molecule_theta(5, 2)
    L = basis.L
    filters = [ImageFilter(6.0, CTFParams(12000, 11000, 30, 300, 2.7, 0.1)),
               ImageFilter(6.0, CTFParams(25000, 25000, 0, 300, 2.7, 0.1))]
    Psi = filter_matrices(filters, L)
    mics = [rng.standard_normal((2 * L, 2 * L)) * 0.7 for _ in range(3)]
    A1 = projection_matrices(basis, hopf.rotations(1, np.array([17])))[0]
    mics[0][:L, L:] += naive.shift_crop((Psi[1] @ A1 @ theta).reshape(L, L), (2, 6), L)
    source = PatchSource(mics, L, groups=np.array([1, 0, 1]), filters=filters)
    idx = np.arange(source.n_patches)
    spec = SearchSpec(0, 1, prune=0.0, cap=0, margin=0.0)
    model = SearchModel(theta, basis, spec, precision="float64")
    stats = search_stats(source, idx, model, 0.3, 0.49, n_chunk=5)
    assert isinstance(stats, GroupSearchStats)
    A = projection_matrices(basis, hopf.rotations(1))
    patches, groups = source.get(idx), source.patch_groups(idx)
    logp_empty, logp, ll = naive.brute_log_posteriors_groups(patches, groups, A, Psi, theta, 0.3, 0.49)
    np.testing.assert_allclose(stats.loglik, ll.sum(), rtol=1e-12)
    w = np.exp(logp - ll[:, None, None, None])
    idx_s = shift_index(L)
    for g in (0, 1):
        part = stats.parts[g]
        rows = part.rotations - model.offset(1)
        ref = w[groups == g].sum(axis=0)[rows][:, idx_s][:, :, idx_s]
        np.testing.assert_allclose(part.W, ref, rtol=1e-10, atol=1e-14)
    H, b = search_normal_equations(stats, spec, basis, filters=Psi)
    H_ref, b_ref = naive.brute_normal_equations_groups(patches, groups, A, Psi, w, L)
    assert np.abs(H - H_ref).max() < 1e-10 * np.abs(H_ref).max()
    assert np.abs(b - b_ref).max() < 1e-10 * np.abs(b_ref).max()


def test_search_iteration_on_ctf_groups_is_the_composition_of_its_parts(rng):
    """em_iteration of a search stage on a source with CTF groups: the grouped search statistics,
    the normal equations through each group's Psi_g and the solve, composed by hand, give the
    same bits (the wiring of theory sections 11 and 12 together)."""
    from numbaem.em.mstep import solve, update_upsilon
    from numbaem.em.schedule import Stage
    from numbaem.model.ctf import CTFParams, ImageFilter
    basis, theta = _molecule_theta(5, 2)
    L = basis.L
    filters = [ImageFilter(6.0, CTFParams(12000, 11000, 30, 300, 2.7, 0.1)),
               ImageFilter(6.0, CTFParams(25000, 25000, 0, 300, 2.7, 0.1))]
    mics = [rng.standard_normal((4 * L, 4 * L)) * 0.5 for _ in range(3)]
    source = PatchSource(mics, L, groups=np.array([1, 0, 1]), filters=filters)
    stage = Stage(2, 1, 1.0, fine=30.0, coarse=60.0, prune=1e-3)
    spec = stage.search_spec()
    state = em.EMState(theta=theta.copy(), lmax=2, upsilon=0.4, sigma2=0.25, rng=np.random.default_rng(3))
    rec = em.em_iteration(state, source, em.SearchOperator(basis, spec), stage, budget=1 << 30)
    idx = source.sample(1.0, np.random.default_rng(3))
    model = SearchModel(theta, basis, spec, sigma2=0.25)
    stats = search_stats(source, idx, model, 0.4, 0.25, rec["chunk"])
    H, b = search_normal_equations(stats, spec, basis, filters=source.filter_matrices())
    assert np.array_equal(state.theta, solve(H, b).theta)
    assert state.upsilon == update_upsilon(stats) and rec["loglik"] == stats.loglik
    assert rec["filter_groups"] == 2


def test_records_of_the_top_rotations_match_a_full_sort(rng):
    """record_of takes the top RECORD_MAX + 1 masses by partition: the same rotations, in the same
    order, as sorting them all; the search's records of a whole chunk at once (_write_records,
    states on several levels) equal record_of patch by patch."""
    from numbaem.em.estep import RECORD_EPS, RECORD_MAX, Records, record_of
    from numbaem.em.search import _write_records
    from numbaem.model.rotations import matrices_to_quaternions
    for m in (5, 40, 600):
        mass = rng.random(m) ** 8
        got = record_of(mass, lambda pos: np.asarray(pos, float)[:, None] * np.ones(4), 0.3)
        top = np.argsort(-mass, kind="stable")[:RECORD_MAX + 1]
        need = int(np.searchsorted(np.cumsum(mass[top]), 0.7 * mass.sum(), side="left")) + 1
        ref = top[:need] if need <= RECORD_MAX else np.zeros(0)
        np.testing.assert_array_equal(got[:, 0], np.asarray(ref, np.float32))
    n, kept, per_patch = 6, [], {}
    for part in range(3):                          # three passes, each with states of some patches
        lev = part
        P = np.repeat(np.arange(n), rng.integers(0, 12, n))
        R = rng.integers(0, hopf.size(lev), len(P))
        Mm = rng.random(len(P)) ** (4 + 20 * (P % 2))   # odd patches: a few states hold the mass
        kept.append((P, np.full(len(P), lev), R, Mm))
        for j, r, m in zip(P, R, Mm):
            per_patch.setdefault(int(j), []).append((lev, int(r), m))
    ids = np.arange(n) + 100
    rec = Records()
    _write_records(kept, n, ids, rec)
    for j in range(n):
        states = per_patch.get(j, [])
        mass = np.array([m for _, _, m in states])
        ref = record_of(mass, lambda pos: matrices_to_quaternions(np.stack(
            [hopf.rotations(states[k][0], np.array([states[k][1]]))[0] for k in pos])), RECORD_EPS)
        np.testing.assert_array_equal(rec.quats[int(ids[j])], ref)
    assert sum(len(q) > 0 for q in rec.quats.values()) >= 2
    # down to level 0: a patch without a record is recorded one level coarser (its states as
    # their parents there, masses summed in the order given), and so on
    rec0 = Records()
    _write_records(kept, n, ids, rec0, level=0)
    coarser = 0
    for j in range(n):
        states = per_patch.get(j, [])
        ref = np.zeros((0, 4), np.float32)
        top = max([lev for lev, _, _ in states], default=0)
        for lv in range(top, -1, -1):
            if lv == top:                                                 # the states as given
                cells, mass = [(lev, r) for lev, r, _ in states], [m for _, _, m in states]
            else:
                agg = {}
                for lev, r, m in states:
                    key = (min(lev, lv), int(r) // 8 ** max(lev - lv, 0))
                    agg[key] = agg.get(key, 0.0) + m
                cells = sorted(agg)
                mass = [agg[c] for c in cells]
            ref = record_of(np.array(mass), lambda pos: matrices_to_quaternions(np.stack(
                [hopf.rotations(cells[k][0], np.array([cells[k][1]]))[0] for k in pos])), RECORD_EPS)
            if len(ref) or not states:
                coarser += lv < top and len(ref) > 0
                break
        np.testing.assert_array_equal(rec0.quats[int(ids[j])], ref)
        if len(rec.quats[int(ids[j])]):                              # a record at the states' own level stays
            np.testing.assert_array_equal(rec0.quats[int(ids[j])], rec.quats[int(ids[j])])
    assert coarser >= 1


def test_search_mstep_is_the_same_on_any_thread_count():
    """The search's M-step runs blocks of rows on several threads (each block's products on one
    BLAS thread) and adds them in block order: 1 and 2 threads give the same bits, and the
    blocks equal one whole-matrix sum to round-off."""
    import numba
    from numbaem.em.search import search_normal_equations
    basis, theta = _molecule_theta(7, 4)
    patches, sigma2 = _patches(np.random.default_rng(3), basis, theta, 10, snr=30.0)
    spec = SearchSpec(1, 2, prune=1e-3, cap=32, margin=1.0)
    model = SearchModel(theta, basis, spec, precision="float64")
    acc = SearchAccumulator(model)
    search_chunk(patches, model, 0.5, sigma2, acc)
    stats = acc.to_stats()
    before = numba.get_num_threads()
    out = []
    try:
        for t in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(t)
            out.append(search_normal_equations(stats, spec, basis, max_block_bytes=1 << 20))
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1])
    H1, b1 = search_normal_equations(stats, spec, basis, max_block_bytes=1 << 30)   # one block
    np.testing.assert_allclose(out[0][0], H1, rtol=1e-12, atol=1e-12 * np.abs(H1).max())
    np.testing.assert_allclose(out[0][1], b1, rtol=1e-12, atol=1e-12 * np.abs(b1).max())


def test_memory_plan_bounds_the_rows_of_fine_levels():
    """Where every rotation of every level fits, the plan counts them all (as before); where
    a fine level does not (1.875 degrees: 2.7 million rotations), it holds the rows the budget
    allows beside a chunk, within the budget, and refuses a budget that holds not even the
    coarse level."""
    from numbaem.em.plan import plan_search
    basis = FBBasis(7, 4)
    coarse = SearchSpec(0, 2)
    p = plan_search(2 << 30, basis, coarse, 6400)
    assert p.parts["max_rows"] == sum(hopf.size(r) for r in coarse.levels)
    fine = SearchSpec(0, 5)
    q = plan_search(2 << 30, basis, fine, 6400)
    total = sum(hopf.size(r) for r in fine.levels)
    assert hopf.size(0) <= q.parts["max_rows"] < total
    assert q.parts["peak"] <= (2 << 30) - (256 << 20)
    S = 13
    assert q.parts["max_rows"] * ((S * S + 49) * 8 * 2 + 8) > (2 << 30) - (512 << 20)   # most of the budget is rows
    with pytest.raises(NumbaemError, match="too small for a search"):
        plan_search(280 << 20, basis, fine, 6400)


def test_accumulator_stops_past_the_rows_the_budget_holds(rng):
    """The finer levels share ``model.max_rows`` less the coarse level's rows (reserved for
    the fold of its lane-block sums): a level's spare rows are given back (sums kept) before
    another level is refused, the rows actually used may reach the bound, and one more is
    an error naming the budget."""
    basis, theta = _molecule_theta(7, 2)
    model = SearchModel(theta, basis, SearchSpec(0, 2))
    model.max_rows = hopf.size(0) + 150
    acc = SearchAccumulator(model)
    assert list(acc.rows_of(1, np.arange(40))) == list(range(40))       # level 1 holds 64 rows (doubling)
    acc.W[1][:40] = np.arange(40)[:, None, None]
    assert list(acc.rows_of(2, np.arange(100))) == list(range(100))     # 40 + 100 used: fits (64 + 100 would not)
    assert np.array_equal(acc.W[1][:40, 0, 0], np.arange(40))
    assert list(acc.rows_of(2, np.arange(100))) == list(range(100))     # rows already held: no new ones
    acc.rows_of(2, np.arange(100, 110))                                  # 150 used: the bound itself
    assert len(acc.W[1]) + len(acc.W[2]) <= 150
    with pytest.raises(NumbaemError, match="memory budget"):
        acc.rows_of(2, np.arange(110, 111))
    assert acc.n_rows[2] == 110 and acc.slot[2][110] == -1              # nothing half-assigned
    acc.rows_of(0, np.arange(hopf.size(0)))                              # the coarse level's rows are reserved
    assert sum(len(w) for w in acc.W.values()) <= model.max_rows
