"""M-step (theory section 6): H, b from sufficient statistics against brute-force sums."""
import numpy as np

from numbaem.model.basis import FBBasis
from numbaem.em.estep import SufficientStats, e_step_chunk, projection_spectra
from numbaem.em.mstep import normal_equations, solve, update_sigma2, update_upsilon
from numbaem.model.projection import projection_matrices
from numbaem.model.rotations import random_rotations

import naive


def _posteriors(rng, L=5, lmax=2, K=3, n=4):
    basis = FBBasis(L, lmax)
    A = projection_matrices(basis, random_rotations(K, rng))
    theta = rng.standard_normal(basis.M)
    proj = (A @ theta).reshape(K, L, L)
    patches = rng.standard_normal((n, L, L))
    patches[0] += naive.shift_crop(proj[0], (1, 3), L)
    stats = SufficientStats.zeros(K, L)
    _, w, w_empty = e_step_chunk(patches, projection_spectra(proj), 0.2, 1.0, stats, keep_posteriors=True)
    return basis, A, theta, patches, stats, w


def test_normal_equations_match_brute_force(rng):
    basis, A, theta, patches, stats, w = _posteriors(rng)
    H, b = normal_equations([(slice(None), A)], stats.W, stats.G, basis.L, basis.M)
    H_ref, b_ref = naive.brute_normal_equations(patches, A, w, basis.L)
    np.testing.assert_allclose(H, H_ref, rtol=1e-12, atol=1e-12 * np.abs(H_ref).max())
    np.testing.assert_allclose(b, b_ref, rtol=1e-12, atol=1e-12 * np.abs(b_ref).max())


def test_normal_equations_blocks(rng):
    """Rotation blocks give the same H and b as one block."""
    basis, A, theta, patches, stats, w = _posteriors(rng, K=5)
    H1, b1 = normal_equations([(slice(None), A)], stats.W, stats.G, basis.L, basis.M)
    blocks = [(slice(i, min(i + 2, 5)), A[i:i + 2]) for i in range(0, 5, 2)]
    H2, b2 = normal_equations(blocks, stats.W, stats.G, basis.L, basis.M)
    np.testing.assert_allclose(H2, H1, rtol=1e-13, atol=1e-13 * np.abs(H1).max())
    np.testing.assert_allclose(b2, b1, rtol=1e-13, atol=1e-13 * np.abs(b1).max())


def test_wrong_conjugate_would_be_caught(rng):
    """The conjugate on the wrong factor gives a large error; the check above sees it."""
    basis, A, theta, patches, stats, w = _posteriors(rng)
    H_ref, b_ref = naive.brute_normal_equations(patches, A, w, basis.L)
    _, b_bad = normal_equations([(slice(None), A)], stats.W, np.conj(stats.G), basis.L, basis.M)
    assert np.linalg.norm(b_bad - b_ref) > 0.05 * np.linalg.norm(b_ref)


def test_sigma2_update_matches_residuals(rng):
    """sigma2_new from (H, b) equals the posterior-weighted residual norms, computed explicitly."""
    basis, A, theta, patches, stats, w = _posteriors(rng)
    L = basis.L
    H, b = normal_equations([(slice(None), A)], stats.W, stats.G, L, basis.M)
    th = solve(H, b).theta
    s2 = update_sigma2(stats, H, b, th, L)
    proj = (A @ th).reshape(len(A), L, L)
    tot = 0.0
    w_empty = 1 - w.sum(axis=(1, 2, 3))
    for j, y in enumerate(patches):
        tot += w_empty[j] * np.sum(y ** 2)
        for k in range(len(A)):
            for sh in naive.nonempty_shifts(L):
                tot += w[j, k, sh[0], sh[1]] * np.sum((y - naive.shift_crop(proj[k], sh, L)) ** 2)
    np.testing.assert_allclose(s2, tot / (len(patches) * L * L), rtol=1e-10)


def test_upsilon_update(rng):
    basis, A, theta, patches, stats, w = _posteriors(rng)
    w_empty = 1 - w.sum(axis=(1, 2, 3))
    np.testing.assert_allclose(update_upsilon(stats), w_empty.mean(), rtol=1e-12)


def test_solve_solves_and_regularises(rng, caplog):
    M = 6
    X = rng.standard_normal((20, M))
    H = X.T @ X
    b = rng.standard_normal(M)
    sol = solve(H, b)
    np.testing.assert_allclose(H @ sol.theta, b, rtol=1e-10)
    assert sol.tikhonov == 0.0
    sol = solve(H, b, tikhonov=0.5)
    np.testing.assert_allclose((H + 0.5 * np.eye(M)) @ sol.theta, b, rtol=1e-10)
    # singular H: Tikhonov fallback, with a warning
    Hs = X[:3].T @ X[:3]
    with caplog.at_level("WARNING"):
        sol = solve(Hs, b)
    assert sol.tikhonov > 0 and np.all(np.isfinite(sol.theta))
    assert "Tikhonov" in caplog.text


def test_normal_equations_with_ctf_groups_match_brute_force(rng):
    """H = sum_g sum_k (Psi_g A_k)^T diag(h_gk) (Psi_g A_k) and b from per-group statistics, against
    the brute-force sums over (j, k, l) with S_l Psi_g A_k formed explicitly (theory section 11)."""
    from numbaem.em.estep import GroupSpectra, stream_stats
    from test_estep import _group_case
    basis, A, theta, Psi, source, sigma2 = _group_case(rng)
    L, K, M = basis.L, len(A), basis.M
    idx = np.arange(source.n_patches)
    stats = stream_stats(source, idx, GroupSpectra((A @ theta).reshape(K, L, L), Psi), 0.3, sigma2, n_chunk=5)
    patches, groups = source.get(idx), source.patch_groups(idx)
    logp_empty, logp, ll = naive.brute_log_posteriors_groups(patches, groups, A, Psi, theta, 0.3, sigma2)
    w = np.exp(logp - ll[:, None, None, None])
    H_ref, b_ref = naive.brute_normal_equations_groups(patches, groups, A, Psi, w, L)
    for route in ("gram", "direct"):
        H, b = normal_equations([(slice(None), A)], stats.W, stats.G, L, M, filters=Psi, route=route)
        np.testing.assert_allclose(H, H_ref, rtol=1e-11, atol=1e-11 * np.abs(H_ref).max())
        np.testing.assert_allclose(b, b_ref, rtol=1e-11, atol=1e-11 * np.abs(b_ref).max())
    # rotation blocks
    blocks = [(slice(0, 2), A[:2]), (slice(2, 3), A[2:])]
    H2, b2 = normal_equations(blocks, stats.W, stats.G, L, M, filters=Psi)
    np.testing.assert_allclose(H2, H_ref, rtol=1e-11, atol=1e-11 * np.abs(H_ref).max())
    # the groups' filters are not interchangeable: swapping them is caught
    Hs, bs = normal_equations([(slice(None), A)], stats.W, stats.G, L, M, filters=Psi[::-1].copy())
    assert np.linalg.norm(bs - b_ref) > 0.05 * np.linalg.norm(b_ref)
    assert np.linalg.norm(Hs - H_ref) > 0.05 * np.linalg.norm(H_ref)
    # sigma^2 from (H, b) equals the explicit weighted residuals with the filtered operators
    th = solve(H_ref, b_ref).theta
    s2 = update_sigma2(stats, H_ref, b_ref, th, L)
    AG = naive.filtered_operators(A, Psi)
    tot = 0.0
    w_empty = np.exp(logp_empty - ll)
    for j, y in enumerate(patches):
        tot += w_empty[j] * np.sum(y ** 2)
        proj = (AG[groups[j]] @ th).reshape(K, L, L)
        for k in range(K):
            for sh in naive.nonempty_shifts(L):
                tot += w[j, k, sh[0], sh[1]] * np.sum((y - naive.shift_crop(proj[k], sh, L)) ** 2)
    np.testing.assert_allclose(s2, tot / (len(patches) * L * L), rtol=1e-9)
