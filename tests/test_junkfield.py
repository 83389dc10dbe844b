"""The junk class as a stationary Gaussian field (numbaem.model.junkfield, theory section 14.4)."""
import math

import numpy as np
import pytest

import naive
from numbaem.data.patches import PatchSource
from numbaem.em import run as em
from numbaem.em import schedule
from numbaem.em.estep import Background, SufficientStats, e_step_chunk, projection_spectra
from numbaem.model import junkfield
from numbaem.model.basis import FBBasis
from numbaem.model.projection import projection_matrices
from numbaem.model.rotations import rotation_grid
from numbaem.runtime.errors import NumbaemError
from test_em import make_micrograph


def _lam(L, s2):
    """A junk spectrum falling from 11 sigma^2 at the centre towards sigma^2."""
    n = len(junkfield.shells(L)[1])
    return s2 * (1.0 + 10.0 * np.exp(-1.2 * np.arange(n)))


def _lam_k(lam, L):
    s, _ = junkfield.shells(L)
    return np.asarray(lam)[s]


def test_shells_count_every_frequency_once_and_powers_sum_to_the_energy(rng):
    for L in (5, 6, 7):
        s, ns = junkfield.shells(L)
        assert ns.sum() == L * L and s[0, 0] == 0 and np.array_equal(s, s.T)
        # a real field's spectrum is symmetric: k and -k share a shell
        assert np.array_equal(s, np.roll(s[::-1, ::-1], 1, axis=(0, 1)))
        y = rng.standard_normal((4, L, L))
        np.testing.assert_allclose(junkfield.shell_powers(y).sum(axis=1), np.sum(y ** 2, axis=(1, 2)), rtol=1e-12)


def test_log_ratio_is_that_of_the_explicit_gaussians(rng):
    """log N(y; 0, C_lambda) - log N(y; 0, sigma^2 I) with C_lambda the explicit circulant matrix."""
    L, s2 = 5, 0.7
    lam = _lam(L, s2)
    C = naive.circulant_covariance(_lam_k(lam, L))
    np.testing.assert_allclose(C, C.T, atol=1e-13)
    y = rng.standard_normal((6, L, L)) * np.sqrt(2 * s2)
    got = junkfield.log_ratio(junkfield.shell_powers(y), lam, s2, L)
    want = [naive.gaussian_logpdf(v, C) - naive.gaussian_logpdf(v, s2 * np.eye(L * L)) for v in y]
    np.testing.assert_allclose(got, want, rtol=1e-11)
    # white: no difference from the empty patch
    np.testing.assert_allclose(junkfield.log_ratio(junkfield.shell_powers(y), np.full(len(lam), s2), s2, L), 0, atol=1e-12)


def test_spectrum_update_maximises_the_expected_complete_loglik(rng):
    """lambda_s = sum_j r_j p_js / (n_s sum_j r_j): the maximiser of sum_j r_j log N(y_j; 0, C_lambda)."""
    L = 5
    y = rng.standard_normal((30, L, L)) * rng.uniform(0.5, 3.0, (30, 1, 1))
    r = rng.uniform(0, 1, 30)
    p = junkfield.shell_powers(y)
    lam = junkfield.update_spectrum(r @ p, r.sum(), 1e-6, L)
    _, ns = junkfield.shells(L)

    def q(lmb):
        return float(r @ (-0.5 * (p @ (1 / lmb)) - 0.5 * ns @ np.log(lmb)))

    best = q(lam)
    for i in range(len(lam)):
        for f in (0.97, 1.03):
            other = lam.copy()
            other[i] *= f
            assert q(other) < best
    # the floor
    assert np.all(junkfield.update_spectrum(np.zeros(len(ns)), 1.0, 2.0, L) == junkfield.SPECTRUM_FLOOR * 2.0)


def _case(rng, L=5, lmax=2, K=6):
    basis = FBBasis(L, lmax)
    rots = rotation_grid(K)
    theta = rng.standard_normal(basis.M)
    mic, s2 = make_micrograph(rng, theta, basis, rots, 40, 3, snr=4.0)
    mic[20:25, 2:7] += 3.0 * np.sqrt(s2) * np.outer(np.hanning(5) + 0.2, np.hanning(5) + 0.5)   # a contaminant
    return basis, rots, theta, mic, s2


@pytest.mark.parametrize("route", ["direct", "fft"])
def test_estep_with_the_junk_field_matches_brute_force(rng, route):
    """Posteriors, log-likelihood and sums against the explicit states: empty, the field (its
    explicit covariance) and every (rotation, shift) of the molecule with prior 1 - upsilon - varsigma."""
    basis, rots, theta, mic, s2 = _case(rng)
    L, K = basis.L, len(rots)
    patches = PatchSource([mic], L).get(np.arange(64))
    A = projection_matrices(basis, rots)
    lam = _lam(L, s2)
    bg = Background(0.4, 0.15, lam)
    spectra = projection_spectra((A @ theta).reshape(K, L, L), route=route, precision="float64")
    stats = SufficientStats.zeros(K, L)
    ll, post, w_bg = e_step_chunk(patches, spectra, bg, s2, stats, keep_posteriors=True)
    C = naive.circulant_covariance(_lam_k(lam, L))
    le, lp, bll, lf = naive.brute_log_posteriors(patches, A, theta, 0.4, s2, field=(C, 0.15))
    np.testing.assert_allclose(ll, bll, rtol=1e-11)
    np.testing.assert_allclose(stats.loglik, bll.sum(), rtol=1e-11)
    w = np.exp(lp - bll[:, None, None, None])
    np.testing.assert_allclose(post, w, atol=1e-11)
    r_e, r_j = np.exp(le - bll), np.exp(lf - bll)
    np.testing.assert_allclose(w_bg, r_e + r_j, rtol=1e-10)
    np.testing.assert_allclose(stats.sum_empty, r_e.sum(), rtol=1e-10)
    np.testing.assert_allclose(stats.junk[0], r_j.sum(), rtol=1e-10)
    np.testing.assert_allclose(stats.junk[1:], r_j @ junkfield.shell_powers(patches), rtol=1e-10)
    np.testing.assert_allclose(stats.W.sum(), w.sum(), rtol=1e-10)
    assert r_j.max() > 0.5           # the contaminant's patches go to the field


@pytest.mark.parametrize("route", ["direct", "fft"])
def test_iteration_with_the_junk_field_matches_brute_force(rng, monkeypatch, route):
    """One whole iteration (noise estimated): the molecule's normal equations from its states
    alone, upsilon and varsigma the empty and junk masses over Nd, lambda the junk-weighted
    shell powers, sigma^2 from the empty and molecule states' residuals only."""
    monkeypatch.setenv("NUMBAEM_ROUTE", route)
    basis, rots, theta, mic, s2 = _case(rng)
    L, K = basis.L, len(rots)
    src = PatchSource([mic], L)
    A = projection_matrices(basis, rots)
    lam = _lam(L, s2)
    state = em.EMState(theta=theta.copy(), lmax=basis.lmax, upsilon=0.4, sigma2=s2, rng=np.random.default_rng(0),
                       varsigma=0.15, junk_lam=lam.copy())
    rec = em.em_iteration(state, src, em.Operator(basis, rots, 1 << 30), schedule.Stage(basis.lmax, 1, 1.0, K),
                          budget=1 << 30, precision="float64", estimate_noise=True)
    patches = src.get(np.arange(src.n_patches))
    n = len(patches)
    le, lp, bll, lf = naive.brute_log_posteriors(patches, A, theta, 0.4, s2,
                                                 field=(naive.circulant_covariance(_lam_k(lam, L)), 0.15))
    np.testing.assert_allclose(rec["loglik"], bll.sum(), rtol=1e-11)
    w = np.exp(lp - bll[:, None, None, None])
    r_e, r_j = np.exp(le - bll), np.exp(lf - bll)
    H, b = naive.brute_normal_equations(patches, A, w, L)
    th = np.linalg.solve(H, b)
    np.testing.assert_allclose(state.theta, th, rtol=1e-8, atol=1e-8 * np.abs(th).max())
    np.testing.assert_allclose(state.upsilon, r_e.sum() / n, rtol=1e-10)
    np.testing.assert_allclose(state.varsigma, r_j.sum() / n, rtol=1e-10)
    _, ns = junkfield.shells(L)
    np.testing.assert_allclose(state.junk_lam, r_j @ junkfield.shell_powers(patches) / (ns * r_j.sum()), rtol=1e-10)
    # sigma^2: the expected squared residual of the empty and molecule states per pixel
    yy = np.sum(patches ** 2, axis=(1, 2))
    res = r_e @ yy
    for j in range(n):
        for k in range(K):
            for l1 in range(2 * L):
                for l2 in range(2 * L):
                    if w[j, k, l1, l2] > 0:
                        r = patches[j] - naive.shift_crop((A[k] @ th).reshape(L, L), (l1, l2), L)
                        res += w[j, k, l1, l2] * np.sum(r ** 2)
    np.testing.assert_allclose(state.sigma2, res / ((n - r_j.sum()) * L * L), rtol=1e-8)
    assert rec["varsigma"] == state.varsigma


def test_reconstruct_starts_the_field_and_refuses_bad_models(rng):
    basis, rots, theta, mic, s2 = _case(rng)
    src = PatchSource([mic], basis.L)
    stage = schedule.Stage(basis.lmax, 1, 1.0, 6)
    out = em.reconstruct(src, "random", sigma2=s2, schedule=[stage], junk_class=True, progress=False,
                         rng=np.random.default_rng(0))
    assert out.state.junk_lam is not None and out.state.junk_theta is None and 0 < out.state.varsigma < 1
    assert len(out.state.junk_lam) == len(junkfield.shells(basis.L)[1])
    img = em.reconstruct(src, "random", sigma2=s2, schedule=[stage], junk_class="image", progress=False,
                         rng=np.random.default_rng(0))
    assert img.state.junk_theta is not None and img.state.junk_lam is None
    with pytest.raises(NumbaemError, match="not one of"):
        em.reconstruct(src, "random", sigma2=s2, schedule=[stage], junk_class="blob", progress=False)
    with pytest.raises(NumbaemError, match="exhaustive"):
        em.reconstruct(src, "random", sigma2=s2, schedule=[schedule.Stage(basis.lmax, 1, 1.0, fine=30.0)],
                       junk_class=True, progress=False)


def test_start_spectrum_is_the_brightest_patches_mean(rng):
    L = 5
    y = rng.standard_normal((50, L, L))
    y[:5] *= 3.0
    lam = junkfield.start_spectrum(y, 0.01)
    _, ns = junkfield.shells(L)
    np.testing.assert_allclose(lam, junkfield.shell_powers(y[:5]).mean(axis=0) / ns, rtol=1e-12)
    assert np.all(junkfield.start_spectrum(y, 100.0) == 100.0)
    assert math.isclose(float(junkfield.shell_powers(y[:5]).sum(axis=1).mean()), float(lam @ ns), rel_tol=1e-12)


@pytest.mark.parametrize("route", ["direct", "fft"])
def test_estep_by_ctf_groups_with_the_junk_field_matches_brute_force(rng, route):
    """CTF groups (the path whitened micrographs take): each group's patches against its own
    filtered projections, the field unfiltered; sums over the groups against the explicit states."""
    from numbaem.em.estep import GroupSpectra, stream_stats
    from scipy.special import logsumexp
    from test_estep import _group_case
    basis, A, theta, Psi, source, s2 = _group_case(rng)
    L, K = basis.L, len(A)
    idx = np.arange(source.n_patches)
    lam = _lam(L, s2)
    ups, vs = 0.3, 0.2
    stats = stream_stats(source, idx, GroupSpectra((A @ theta).reshape(K, L, L), Psi, route=route),
                         Background(ups, vs, lam), s2, n_chunk=3)
    patches, groups = source.get(idx), source.patch_groups(idx)
    # molecule states with prior (1 - ups - vs): the brute force with upsilon = ups + vs, its empty state re-weighted
    le, lp, _ = naive.brute_log_posteriors_groups(patches, groups, A, Psi, theta, ups + vs, s2)
    le = le - math.log(ups + vs) + math.log(ups)
    C = naive.circulant_covariance(_lam_k(lam, L))
    lf = np.array([math.log(vs) + naive.gaussian_logpdf(y, C) for y in patches])
    ll = np.array([logsumexp(np.concatenate([[le[j], lf[j]], lp[j].ravel()])) for j in range(len(patches))])
    np.testing.assert_allclose(stats.loglik, ll.sum(), rtol=1e-12)
    w = np.exp(lp - ll[:, None, None, None])
    for g in (0, 1):
        np.testing.assert_allclose(stats.W[g], w[groups == g].sum(axis=0), rtol=1e-10, atol=1e-15)
    r_j = np.exp(lf - ll)
    np.testing.assert_allclose(stats.sum_empty, np.exp(le - ll).sum(), rtol=1e-10)
    np.testing.assert_allclose(stats.junk, np.concatenate([[r_j.sum()], r_j @ junkfield.shell_powers(patches)]),
                               rtol=1e-10)


@pytest.mark.parametrize("ext", ["none", "prior+image", "prior+field"])
def test_restarts_compare_runs_under_their_own_extensions(rng, ext):
    """log_likelihood(state=...) (what restarts rank runs by) is the log-likelihood an EM
    iteration from that state reports: the prior, the junk image or the junk field included."""
    basis, rots, theta, mic, s2 = _case(rng, K=20)
    L = basis.L
    src = PatchSource([mic], L)
    from numbaem.model.rotations import rotation_grid
    state = em.EMState(theta=theta.copy(), lmax=basis.lmax, upsilon=0.4, sigma2=s2, rng=np.random.default_rng(0))
    if ext != "none":
        state.view_weights = rng.uniform(0.5, 2.0, 12)
        state.varsigma = 0.12
        if ext == "prior+image":
            state.junk_theta = 0.4 * np.ones(em.junk_operator(L).shape[1])
        else:
            state.junk_lam = _lam(L, s2)
    ll = em.log_likelihood(src, theta, basis, 20, 0.4, s2, state=state)
    rec = em.em_iteration(state, src, em.Operator(basis, rotation_grid(20), 1 << 30),
                          schedule.Stage(basis.lmax, 1, 1.0, 20), budget=1 << 30, precision="float64")
    np.testing.assert_allclose(ll, rec["loglik"], rtol=1e-12)
    if ext != "none":    # the extensions change it
        assert abs(em.log_likelihood(src, theta, basis, 20, 0.4, s2) - ll) > 1e-3 * abs(ll)


def test_restarts_log_likelihood_filters_by_ctf_groups(rng):
    """With CTF groups the comparison's E-step filters the projections as the EM does (it did not)."""
    from numbaem.model.rotations import rotation_grid
    from test_estep import _group_case
    basis, A, theta, Psi, source, s2 = _group_case(rng)
    state = em.EMState(theta=theta.copy(), lmax=basis.lmax, upsilon=0.3, sigma2=s2, rng=np.random.default_rng(0),
                       varsigma=0.1, junk_lam=_lam(basis.L, s2))
    ll = em.log_likelihood(source, theta, basis, 12, 0.3, s2, state=state)
    rec = em.em_iteration(state, source, em.Operator(basis, rotation_grid(12), 1 << 30),
                          schedule.Stage(basis.lmax, 1, 1.0, 12), budget=1 << 30, precision="float64")
    np.testing.assert_allclose(ll, rec["loglik"], rtol=1e-12)
