"""E-step (theory sections 4-5) against the brute-force sum over states."""
import math

import numpy as np
import pytest

from numbaem.model.basis import FBBasis
from numbaem.runtime.errors import NumbaemError
from numbaem.em.estep import (SufficientStats, choose_precision, e_step_chunk, projection_spectra, score_rounding,
                               stream_stats)
from numbaem.em.mstep import data_images
from numbaem.model.projection import projection_matrices
from numbaem.model.rotations import random_rotations

import naive


def _case(rng, L=5, lmax=2, K=4, n=3, sigma2=0.7):
    basis = FBBasis(L, lmax)
    rots = random_rotations(K, rng)
    A = projection_matrices(basis, rots)
    theta = rng.standard_normal(basis.M)
    proj = (A @ theta).reshape(K, L, L)
    patches = rng.standard_normal((n, L, L)) * math.sqrt(sigma2)
    # put a shifted projection into the first patch so the posteriors are not flat
    patches[0] += naive.shift_crop(proj[1], (2, 7), L)
    return basis, A, theta, proj, patches, sigma2


@pytest.mark.parametrize("route", ["direct", "fft"])
def test_estep_matches_brute_force(rng, route):
    basis, A, theta, proj, patches, sigma2 = _case(rng)
    L, K = basis.L, len(A)
    upsilon = 0.3
    stats = SufficientStats.zeros(K, L)
    loglik, w, w_empty = e_step_chunk(patches, projection_spectra(proj, route=route), upsilon, sigma2, stats,
                                      keep_posteriors=True)
    logp_empty, logp, ll_ref = naive.brute_log_posteriors(patches, A, theta, upsilon, sigma2)
    np.testing.assert_allclose(loglik, ll_ref, rtol=1e-13)
    w_ref = np.exp(logp - ll_ref[:, None, None, None])
    np.testing.assert_allclose(w, w_ref, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(w_empty, np.exp(logp_empty - ll_ref), rtol=1e-11)
    # every patch's posteriors sum to one, the empty state counted once
    np.testing.assert_allclose(w.sum(axis=(1, 2, 3)) + w_empty, 1.0, rtol=1e-13)
    # dropped shifts carry nothing
    assert np.all(w[:, :, L, :] == 0) and np.all(w[:, :, :, L] == 0)
    np.testing.assert_allclose(stats.W, w.sum(axis=0), rtol=1e-13, atol=1e-16)
    # the data images g_k = sum_jl w_jkl (C T_l Z)^T y_j (theory section 6), summed literally
    g_ref = np.zeros((K, L * L))
    for (a, b) in naive.nonempty_shifts(L):
        S = naive.shift_operator(L, (a, b))
        g_ref += w[:, :, a, b].T @ (patches.reshape(len(patches), -1) @ S)
    np.testing.assert_allclose(data_images(stats.G, L), g_ref, rtol=1e-12, atol=1e-14 * np.abs(g_ref).max())
    assert stats.n_patches == len(patches)
    np.testing.assert_allclose(stats.loglik, ll_ref.sum(), rtol=1e-13)
    np.testing.assert_allclose(stats.sum_empty, w_empty.sum(), rtol=1e-13)


def test_estep_chunks_add_up(rng):
    """Two chunks (the second padded to the plan size) give the statistics of one."""
    basis, A, theta, proj, patches, sigma2 = _case(rng, n=5)
    L, K = basis.L, len(A)
    spectra = projection_spectra(proj)
    one = SufficientStats.zeros(K, L)
    e_step_chunk(patches, spectra, 0.4, sigma2, one)
    two = SufficientStats.zeros(K, L)
    e_step_chunk(patches[:3], spectra, 0.4, sigma2, two, n_chunk=3)
    e_step_chunk(patches[3:], spectra, 0.4, sigma2, two, n_chunk=3)
    np.testing.assert_allclose(two.W, one.W, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(two.G, one.G, rtol=1e-12, atol=1e-13)
    assert two.n_patches == one.n_patches == 5
    np.testing.assert_allclose(two.loglik, one.loglik, rtol=1e-13)


def test_estep_no_underflow(rng):
    """A patch far brighter than the model: every state's likelihood underflows exp,
    the log-sum-exp does not."""
    basis, A, theta, proj, patches, sigma2 = _case(rng)
    patches = patches * 1e4
    stats = SufficientStats.zeros(len(A), basis.L)
    loglik, w, w_empty = e_step_chunk(patches, projection_spectra(proj), 0.3, 1e-4, stats,
                                      keep_posteriors=True)
    assert np.all(np.isfinite(loglik)) and np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(axis=(1, 2, 3)) + w_empty, 1.0, rtol=1e-12)


def test_estep_zero_patch(rng):
    basis, A, theta, proj, patches, sigma2 = _case(rng)
    patches[:] = 0.0
    stats = SufficientStats.zeros(len(A), basis.L)
    loglik, w, w_empty = e_step_chunk(patches, projection_spectra(proj), 0.3, sigma2, stats,
                                      keep_posteriors=True)
    _, _, ll_ref = naive.brute_log_posteriors(patches, A, theta, 0.3, sigma2)
    np.testing.assert_allclose(loglik, ll_ref, rtol=1e-13)
    assert np.all(w_empty > 0.3)  # nothing is the most likely explanation of a zero patch


@pytest.mark.parametrize("kw,match", [(dict(upsilon=0.0), "upsilon"), (dict(upsilon=1.0), "upsilon"),
                                      (dict(sigma2=0.0), "sigma2"), (dict(sigma2=-1.0), "sigma2")])
def test_estep_rejects_bad_parameters(rng, kw, match):
    basis, A, theta, proj, patches, sigma2 = _case(rng)
    args = dict(upsilon=0.3, sigma2=sigma2)
    args.update(kw)
    with pytest.raises(NumbaemError, match=match):
        e_step_chunk(patches, projection_spectra(proj), args["upsilon"], args["sigma2"],
                     SufficientStats.zeros(len(A), basis.L))


def test_vectorisable_exp_matches_libm(rng):
    """The E-step's own exp (no libm call, so its loops vectorise) against math.exp on [-50, 0]."""
    from numbaem.em.estep import _exp_neg
    d = np.concatenate([-50 * rng.random(20000), [0.0, -50.0, -1e-300, -math.log(2) / 2, -math.log(2) * 72]])
    got = np.array([_exp_neg(x) for x in d])
    ref = np.array([math.exp(x) for x in d])
    assert np.max(np.abs(got - ref) / ref) < 4e-16


def test_estep_high_snr_matches_brute_force(rng):
    """At high SNR most (patch, rotation) blocks lie 50 below the best state and are
    skipped whole; the posteriors still equal the brute-force ones."""
    basis, A, theta, proj, patches, sigma2 = _case(rng, sigma2=0.02)
    L, K = basis.L, len(A)
    stats = SufficientStats.zeros(K, L)
    loglik, w, w_empty = e_step_chunk(patches, projection_spectra(proj), 0.3, sigma2, stats, keep_posteriors=True)
    logp_empty, logp, ll_ref = naive.brute_log_posteriors(patches, A, theta, 0.3, sigma2)
    np.testing.assert_allclose(loglik, ll_ref, rtol=1e-13)
    w_ref = np.exp(logp - ll_ref[:, None, None, None])
    assert np.sum(w_ref.max(axis=(2, 3)) < np.exp(-50)) > 0  # some blocks are skipped
    np.testing.assert_allclose(w, w_ref, rtol=1e-11, atol=1e-21)


def test_concurrent_estep_calls_in_threads_are_independent(rng):
    """Two E-steps running at once in one process (a user's thread pool, a Dask worker with
    several threads) on the same shapes give exactly what each gives alone: the FFT
    workspaces are per thread (defect 1 of issue 9: they were shared by shape)."""
    from concurrent.futures import ThreadPoolExecutor
    L, K, n = 7, 40, 64
    basis = FBBasis(L, 3)
    rots = random_rotations(K, rng)
    A = projection_matrices(basis, rots)
    spectra = projection_spectra((A @ rng.standard_normal(basis.M)).reshape(K, L, L))
    chunks = [rng.standard_normal((n, L, L)) for _ in range(8)]

    def one(patches):
        stats = SufficientStats.zeros(K, L)
        for _ in range(3):  # several calls per thread: each reuses its buffers between them
            e_step_chunk(patches, spectra, 0.4, 1.0, stats, n_chunk=n)
        return stats

    alone = [one(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(one, chunks))
    for a, b in zip(alone, together):
        assert np.array_equal(a.W, b.W) and np.array_equal(a.G, b.G) and a.loglik == b.loglik


@pytest.mark.parametrize("route", ["direct", "fft"])
@pytest.mark.parametrize("window", [0, 1, 2])
def test_restricted_shifts_match_brute_force(rng, window, route):
    """Boxes around picks (shifts |l| <= w): the E-step equals the brute-force sum over the
    allowed shifts only, each with prior (1 - upsilon) / ((2w + 1)^2 K)."""
    from numbaem.em.estep import restrict_shifts

    basis, A, theta, proj, patches, sigma2 = _case(rng)
    patches[1] += naive.shift_crop(proj[2], (1, 9), 5)     # shift (+1, -1): inside every window >= 1
    L, K = basis.L, len(A)
    upsilon = 0.3
    stats = SufficientStats.zeros(K, L)
    spectra = restrict_shifts(projection_spectra(proj, route=route), window)
    loglik, w, w_empty = e_step_chunk(patches, spectra, upsilon, sigma2, stats, keep_posteriors=True)
    logp_empty, logp, ll_ref = naive.brute_log_posteriors(patches, A, theta, upsilon, sigma2, window=window)
    np.testing.assert_allclose(loglik, ll_ref, rtol=1e-13)
    np.testing.assert_allclose(w, np.exp(logp - ll_ref[:, None, None, None]), rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(w_empty, np.exp(logp_empty - ll_ref), rtol=1e-11)
    np.testing.assert_allclose(w_empty + w.sum(axis=(1, 2, 3)), 1.0, rtol=1e-12)
    np.testing.assert_allclose(stats.W, w.sum(axis=0), rtol=1e-11, atol=1e-15)


def test_best_states_are_the_posterior_maxima(rng):
    """best_states: the shift with the largest posterior summed over rotations, the rotation
    with the largest posterior at it, signed as theory section 4 reads the shift index."""
    from numbaem.em.estep import signed_shifts

    basis, A, theta, proj, patches, sigma2 = _case(rng, n=4)
    patches[0] = naive.shift_crop(proj[1], (2, 7), 5) + 0.01 * patches[0]    # shift (+2, -3), rotation 1
    L, K = basis.L, len(A)
    stats = SufficientStats.zeros(K, L)
    _, w, w_empty, best = e_step_chunk(patches, projection_spectra(proj), 0.3, sigma2, stats, keep_posteriors=True,
                                       return_best=True)
    assert (best["shift0"][0], best["shift1"][0], best["rotation"][0]) == (2, -3, 1)
    sh = signed_shifts(L)
    for j in range(len(patches)):
        per_shift = w[j].sum(axis=0)
        l0, l1 = np.unravel_index(np.argmax(per_shift), per_shift.shape)
        assert (best["shift0"][j], best["shift1"][j]) == (sh[l0], sh[l1])
        assert best["rotation"][j] == np.argmax(w[j][:, l0, l1])
        assert best["shift_probability"][j] == pytest.approx(per_shift[l0, l1], rel=1e-12)
        assert best["occupied"][j] == pytest.approx(1 - w_empty[j], rel=1e-12)


def _group_case(rng, L=5, lmax=2, K=3, sigma2=0.5):
    """Three micrographs of 2 x 2 patches in two CTF groups (micrographs 0, 2 in group 1)."""
    from numbaem.data.patches import PatchSource
    from numbaem.model.ctf import CTFParams, ImageFilter, filter_matrices
    from numbaem.model.noise import RadialProfile

    basis = FBBasis(L, lmax)
    A = projection_matrices(basis, random_rotations(K, rng))
    theta = rng.standard_normal(basis.M)
    filters = [ImageFilter(6.0, CTFParams(12000, 11000, 30, 300, 2.7, 0.1)),
               ImageFilter(6.0, CTFParams(25000, 25000, 0, 300, 2.7, 0.1),
                           RadialProfile(np.array([0.0, 0.3, 0.7]), np.array([1.5, 1.0, 0.8])))]
    Psi = filter_matrices(filters, L)
    mics = [rng.standard_normal((2 * L, 2 * L)) * math.sqrt(sigma2) for _ in range(3)]
    p = (Psi[1] @ A[1] @ theta).reshape(L, L)
    mics[0][:L, L:] += naive.shift_crop(p, (2, 6), L)          # a filtered projection in a patch of group 1
    source = PatchSource(mics, L, groups=np.array([1, 0, 1]), filters=filters)
    return basis, A, theta, Psi, source, sigma2


@pytest.mark.parametrize("route", ["direct", "fft"])
def test_estep_with_ctf_groups_matches_brute_force(rng, route):
    """stream_stats with per-group spectra against the brute-force sum over states with the
    explicit matrices Psi_g A_k (theory section 11): posteriors summed per group, log-likelihood."""
    from numbaem.em.estep import GroupSpectra, stream_stats
    basis, A, theta, Psi, source, sigma2 = _group_case(rng)
    L, K = basis.L, len(A)
    idx = np.arange(source.n_patches)
    proj = (A @ theta).reshape(K, L, L)
    stats = stream_stats(source, idx, GroupSpectra(proj, Psi, route=route), 0.3, sigma2, n_chunk=3)
    patches, groups = source.get(idx), source.patch_groups(idx)
    assert groups.tolist() == [1] * 4 + [0] * 4 + [1] * 4
    logp_empty, logp, ll = naive.brute_log_posteriors_groups(patches, groups, A, Psi, theta, 0.3, sigma2)
    w = np.exp(logp - ll[:, None, None, None])
    assert stats.W.shape == (2, K, 2 * L, 2 * L)
    for g in (0, 1):
        np.testing.assert_allclose(stats.W[g], w[groups == g].sum(axis=0), rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(stats.loglik, ll.sum(), rtol=1e-13)
    np.testing.assert_allclose(stats.sum_empty, np.exp(logp_empty - ll).sum(), rtol=1e-11)
    assert stats.n_patches == 12
    # the filter matters: scoring group 1's patches against group 0's filter changes the posteriors
    wrong = stream_stats(source, idx, GroupSpectra(proj, Psi[::-1].copy(), route=route), 0.3, sigma2, n_chunk=3)
    assert abs(wrong.loglik - stats.loglik) > 1e-3 * abs(stats.loglik)


def test_estep_one_group_of_identity_equals_no_groups(rng):
    """An identity filter for one group gives the statistics of the ungrouped E-step (to round-off:
    the filtered projections pass through a matrix product)."""
    from numbaem.data.patches import PatchSource
    from numbaem.em.estep import GroupSpectra, stream_stats
    from numbaem.model.ctf import ImageFilter
    basis, A, theta, proj, patches, sigma2 = _case(rng, n=4)
    L, K = basis.L, len(A)
    mic = np.concatenate([np.concatenate(list(patches[:2]), axis=1), np.concatenate(list(patches[2:]), axis=1)])
    plain = PatchSource([mic], L)
    grouped = PatchSource([mic], L, groups=np.array([0]), filters=[ImageFilter()])
    idx = np.arange(4)
    a = stream_stats(plain, idx, projection_spectra(proj), 0.3, sigma2, n_chunk=4)
    b = stream_stats(grouped, idx, GroupSpectra(proj, grouped.filter_matrices()), 0.3, sigma2, n_chunk=4)
    np.testing.assert_allclose(b.W[0], a.W, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b.G[0], a.G, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(b.loglik, a.loglik, rtol=1e-14)


def test_routes_give_the_same_statistics(rng):
    """The direct route (sums over pixels, lane blocks of rotations with padding lanes)
    and the FFT route agree to round-off on W, the data images g, the log-likelihood
    and the empty-state sum, over two chunks."""
    L, K = 7, 21   # 21 rotations: lane blocks with padding
    basis = FBBasis(L, 3)
    proj = (projection_matrices(basis, random_rotations(K, rng)) @ rng.standard_normal(basis.M)).reshape(K, L, L)
    patches = rng.standard_normal((9, L, L))
    patches[2] += naive.shift_crop(proj[4], (3, 12), L)
    out = {}
    for route in ("direct", "fft"):
        st = SufficientStats.zeros(K, L)
        spectra = projection_spectra(proj, route=route)
        e_step_chunk(patches[:5], spectra, 0.4, 0.5, st, n_chunk=5)
        e_step_chunk(patches[5:], spectra, 0.4, 0.5, st, n_chunk=5)
        out[route] = st
    a, b = out["direct"], out["fft"]
    np.testing.assert_allclose(a.W, b.W, rtol=1e-12, atol=1e-14 * np.abs(b.W).max())
    np.testing.assert_allclose(data_images(a.G, L), data_images(b.G, L), rtol=1e-11,
                               atol=1e-13 * np.abs(data_images(b.G, L)).max())
    np.testing.assert_allclose(a.loglik, b.loglik, rtol=1e-13)
    np.testing.assert_allclose(a.sum_empty, b.sum_empty, rtol=1e-12)


def test_single_precision_against_brute_force(rng):
    """float32 scores (double-precision sums over patches): posteriors within the stated
    score rounding of the brute-force ones. A score error of ``d`` nats moves a
    posterior by a factor ``exp(+-2d)`` at most (its own score and the normaliser), so
    the relative error is bounded by ``2 d`` with ``d = score_rounding`` (a conservative
    estimate, here about 1e-4); the test allows 4 d."""
    basis, A, theta, proj, patches, sigma2 = _case(rng, sigma2=2.0)
    L, K = basis.L, len(A)
    d = score_rounding(proj, sigma2)
    assert choose_precision(proj, sigma2) == np.float32 and d < 1e-3
    stats = SufficientStats.zeros(K, L)
    loglik, w, w_empty = e_step_chunk(patches, projection_spectra(proj, precision="float32"), 0.3, sigma2, stats,
                                      keep_posteriors=True)
    logp_empty, logp, ll_ref = naive.brute_log_posteriors(patches, A, theta, 0.3, sigma2)
    w_ref = np.exp(logp - ll_ref[:, None, None, None])
    big = w_ref > 1e-6
    assert np.max(np.abs(w[big] / w_ref[big] - 1)) < 4 * d
    np.testing.assert_allclose(loglik, ll_ref, rtol=0, atol=4 * d)
    np.testing.assert_allclose(stats.W, w_ref.sum(axis=0), rtol=4 * d, atol=1e-6)


def test_auto_precision_falls_back_to_double_at_high_snr(rng):
    """At an SNR where single-precision scores would round by more than 1e-3 nats the
    automatic choice is float64 (and without a noise variance it is float64)."""
    basis, A, theta, proj, patches, sigma2 = _case(rng, L=7)
    energy = np.max(np.sum(proj ** 2, axis=(1, 2)))
    assert choose_precision(proj, None) == np.float64
    assert choose_precision(proj, energy / 49) == np.float32        # SNR ~ 1 per pixel
    assert choose_precision(proj, energy / (49 * 1e4)) == np.float64  # SNR ~ 1e4 per pixel
    with pytest.raises(NumbaemError, match="precision"):
        choose_precision(proj, 1.0, "half")


@pytest.mark.parametrize("dtype, tol", [(np.float64, 4e-16), (np.float32, 2.4e-7)])
def test_direct_route_exp(rng, dtype, tol):
    """The direct route's vectorised exp (Cody-Waite, Taylor, 2^k from its bit pattern)
    against math.exp on [-50, 0], and exactly 0 below -50."""
    from numbaem.em.kernels import exp_shifted
    d = np.concatenate([-50 * rng.random(4000), [0.0, -1e-30, -49.999, -math.log(2) / 2, -math.log(2) * 72]])
    v = (d + 3.0).astype(dtype)
    bits = np.empty(len(v), np.int32 if dtype == np.float32 else np.int64)
    ref = np.array([math.exp(float(x - dtype(3.0))) for x in v])   # the difference as the kernel forms it
    exp_shifted(v, dtype(3.0), bits)
    assert np.max(np.abs(v / ref - 1)) < tol
    low = np.array([-50.0, -60.0, -np.inf], dtype)
    exp_shifted(low, dtype(0.0), np.empty(3, bits.dtype))
    assert np.all(low == 0)


def test_stream_stats_direct_equals_chunks(rng):
    """stream_stats on the direct route (its sums kept in lane-block layout across chunks)
    equals one e_step_chunk over all the patches."""
    from numbaem.data.patches import PatchSource
    L, K = 5, 12
    basis = FBBasis(L, 2)
    proj = (projection_matrices(basis, random_rotations(K, rng)) @ rng.standard_normal(basis.M)).reshape(K, L, L)
    src = PatchSource([rng.standard_normal((5 * L, 4 * L))], L)
    spectra = projection_spectra(proj, route="direct")
    idx = np.arange(src.n_patches)
    st = stream_stats(src, idx, spectra, 0.3, 1.0, n_chunk=7)
    one = SufficientStats.zeros(K, L)
    e_step_chunk(src.get(idx), spectra, 0.3, 1.0, one)
    np.testing.assert_allclose(st.W, one.W, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(st.G, one.G, rtol=1e-12, atol=1e-14)
    assert st.n_patches == src.n_patches
    np.testing.assert_allclose(st.loglik, one.loglik, rtol=1e-13)
