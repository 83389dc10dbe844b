"""Slow, obviously correct twins of the fast paths (NumPy and loops only).

Each function here follows a formula of docs/theory.md literally, with no FFT trick, no
Wigner D and no sufficient statistic, so that a test comparing the fast path with it
pins the conventions down.
"""
import math

import numpy as np


def wigner_small_d(j, mp, m, beta):
    """Explicit factorial sum for ``d^j_{m',m}(beta)`` (fine for small ``j``)."""
    f = math.factorial
    tot = 0.0
    for s in range(0, 2 * j + 1):
        if j + m - s < 0 or mp - m + s < 0 or j - mp - s < 0:
            continue
        tot += ((-1) ** (mp - m + s) * math.cos(beta / 2) ** (2 * j + m - mp - 2 * s)
                * math.sin(beta / 2) ** (mp - m + 2 * s)
                / (f(j + m - s) * f(s) * f(mp - m + s) * f(j - mp - s)))
    return math.sqrt(f(j + mp) * f(j - mp) * f(j + m) * f(j - m)) * tot


def direct_projection(theta, basis, rot, n_kappa=None, n_phi=None):
    """``p_w[p] = integral_{|k| <= c} F(w^T (k, 0)) e^{2 pi i k . x_p} d^2k`` by polar quadrature.

    ``F`` is evaluated straight from the basis (spherical Bessel times spherical
    harmonics) at the rotated points; no Wigner D, no Hankel transform.
    Returns the image (L, L).
    """
    L, c = basis.L, 0.5
    R = L // 2
    n_kappa = n_kappa or 6 * L + 40
    n_phi = n_phi or 8 * L + 4 * basis.lmax + 64
    nodes, weights = np.polynomial.legendre.leggauss(n_kappa)
    kappa = c * (nodes + 1) / 2
    wk = c / 2 * weights * kappa
    phis = 2 * np.pi * np.arange(n_phi) / n_phi
    kk, pp = np.meshgrid(kappa, phis, indexing="ij")
    k2 = np.stack([kk * np.cos(pp), kk * np.sin(pp)], axis=-1).reshape(-1, 2)
    wts = (wk[:, None] * np.full(n_phi, 2 * np.pi / n_phi)[None, :]).ravel()
    k3 = np.concatenate([k2, np.zeros((len(k2), 1))], axis=1)
    q = k3 @ rot  # rows: (w^T k)^T = k^T w
    F = basis.evaluate_fourier_real(q) @ theta
    x = np.arange(L) - R
    X0, X1 = np.meshgrid(x, x, indexing="ij")
    xs = np.stack([X0.ravel(), X1.ravel()], axis=1)
    img = (np.exp(2j * np.pi * xs @ k2.T) @ (F * wts))
    return img.reshape(L, L)


def shift_crop(img, shift, L):
    """``C T_l Z img``: zero-pad to 2L x 2L, shift circularly by ``l``, keep the top-left L x L."""
    z = np.zeros((2 * L, 2 * L))
    z[:L, :L] = img
    z = np.roll(z, shift, axis=(0, 1))
    return z[:L, :L]


def nonempty_shifts(L):
    """The (2L-1)^2 non-empty shifts (l1 != L and l2 != L), in row-major order of (l1, l2)."""
    return [(a, b) for a in range(2 * L) for b in range(2 * L) if a != L and b != L]


def shift_operator(L, shift):
    """Matrix of ``C T_l Z`` acting on flat L^2 images (L^2 x L^2)."""
    P = L * L
    Mtx = np.zeros((P, P))
    for q in range(P):
        e = np.zeros(P)
        e[q] = 1.0
        Mtx[:, q] = shift_crop(e.reshape(L, L), shift, L).ravel()
    return Mtx


def circulant_covariance(lam_k):
    """The covariance (L^2, L^2) of a stationary field on the periodic L x L grid whose DFT
    eigenvalue at integer frequency ``(k1, k2)`` is ``lam_k[k1, k2]``, by the explicit cosine
    sum ``C[x, x'] = L^-2 sum_k lam_k cos(2 pi k . (x - x') / L)``."""
    L = lam_k.shape[0]
    x = np.arange(L)
    X1, X2 = np.meshgrid(x, x, indexing="ij")
    X1, X2 = X1.ravel(), X2.ravel()
    C = np.zeros((L * L, L * L))
    for k1 in range(L):
        for k2 in range(L):
            ph = 2 * np.pi * (k1 * (X1[:, None] - X1[None, :]) + k2 * (X2[:, None] - X2[None, :])) / L
            C += lam_k[k1, k2] * np.cos(ph)
    return C / (L * L)


def gaussian_logpdf(y, C):
    """``log N(y; 0, C)`` by a Cholesky factor (y flattened)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    c = np.linalg.cholesky(C)
    z = np.linalg.solve(c, y)
    return -0.5 * z @ z - np.sum(np.log(np.diag(c))) - 0.5 * len(y) * math.log(2 * math.pi)


def brute_log_posteriors(patches, A, theta, upsilon, sigma2, window=None, log_prior=None, junk=None, field=None):
    """Brute-force E-step: unnormalised log-probabilities of every state of every patch.

    With ``log_prior`` (K,) the rotations' prior is ``exp(log_prior_k)`` in place of ``1/K``
    (each state ``(1 - upsilon - varsigma) exp(log_prior_k) / (2L-1)^2``). With ``junk =
    (image (L, L), varsigma)`` a junk row ``K`` is added: the same image at every rotation,
    prior ``varsigma / (2L-1)^2`` per shift (``logp`` then has ``K + 1`` rows).

    With ``field = (C (L^2, L^2), varsigma)`` a junk state per patch whose likelihood is
    ``N(y; 0, C)`` with prior ``varsigma`` (theory section 14.4); the molecule's states then
    share ``1 - upsilon - varsigma`` and a fourth array ``logp_field (n,)`` is returned.

    Returns ``(logp_empty (n,), logp (n, K, 2L, 2L) with -inf at dropped shifts, loglik (n,))``
    where ``loglik`` is the full log-likelihood of each patch (theory section 4),
    computed from explicit residual norms. With ``window`` only the shifts whose signed
    offsets (index ``l`` is ``l`` below ``L`` and ``l - 2L`` above) are at most ``window``
    in size exist, each with prior ``(1 - upsilon) / ((2 window + 1)^2 K)``.
    """
    n, L, _ = patches.shape
    K = A.shape[0]
    P = L * L
    shifts = nonempty_shifts(L)
    logprior_shift = math.log((1 - upsilon) / ((2 * L - 1) ** 2 * K))
    if window is not None:
        def signed(i):
            return i if i < L else i - 2 * L
        shifts = [sh for sh in shifts if abs(signed(sh[0])) <= window and abs(signed(sh[1])) <= window]
        assert len(shifts) == (2 * window + 1) ** 2
        logprior_shift = math.log((1 - upsilon) / (len(shifts) * K))
    const = -P / 2 * math.log(2 * math.pi * sigma2)
    proj = (A @ theta).reshape(K, L, L)
    row_prior = np.full(K, logprior_shift)
    if log_prior is not None or junk is not None or field is not None:
        vs = junk[1] if junk is not None else field[1] if field is not None else 0.0
        lp = np.full(K, -math.log(K)) if log_prior is None else np.asarray(log_prior, dtype=np.float64)
        n_sh = len(shifts)
        row_prior = math.log(1 - upsilon - vs) + lp - math.log(n_sh)
        if junk is not None:
            row_prior = np.append(row_prior, math.log(vs) - math.log(n_sh))
            proj = np.concatenate([proj, np.asarray(junk[0], dtype=np.float64)[None]])
            K += 1
    logp = np.full((n, K, 2 * L, 2 * L), -np.inf)
    logp_empty = np.empty(n)
    logp_field = np.full(n, -np.inf)
    loglik = np.empty(n)
    for j in range(n):
        y = patches[j]
        logp_empty[j] = math.log(upsilon) - np.sum(y ** 2) / (2 * sigma2) + const
        if field is not None:
            logp_field[j] = math.log(field[1]) + gaussian_logpdf(y, field[0])
        for k in range(K):
            for sh in shifts:
                r = y - shift_crop(proj[k], sh, L)
                logp[j, k, sh[0], sh[1]] = row_prior[k] - np.sum(r ** 2) / (2 * sigma2) + const
        allv = np.concatenate([[logp_empty[j], logp_field[j]], logp[j].ravel()])
        mx = allv.max()
        loglik[j] = mx + math.log(np.sum(np.exp(allv - mx)))
    if field is not None:
        return logp_empty, logp, loglik, logp_field
    return logp_empty, logp, loglik


def brute_normal_equations(patches, A, w, L):
    """Brute-force ``H = sum_{j,k,l} w_jkl A_kl^T A_kl`` and ``b = sum w_jkl A_kl^T y_j``.

    ``w`` has shape (n, K, 2L, 2L) (posteriors over non-empty shifts; other entries ignored).
    ``A_kl = (C T_l Z) A_k`` is formed explicitly for every rotation and shift.
    """
    n = patches.shape[0]
    K, P, M = A.shape
    H = np.zeros((M, M))
    b = np.zeros(M)
    for sh in nonempty_shifts(L):
        S = shift_operator(L, sh)
        for k in range(K):
            Akl = S @ A[k]
            wk = w[:, k, sh[0], sh[1]]
            H += wk.sum() * (Akl.T @ Akl)
            b += Akl.T @ (patches.reshape(n, P).T @ wk)
    return H, b


def atomic_density(pos, occ, b_iso, a, b, L, pixel_size):
    """Band-limited density of Gaussian atoms by a direct sum over atoms and frequencies.

    ``F(k) = sum_atoms occ sum_i a_i exp(-(b_i + B) |k|^2 / 4) exp(-2 pi i k . r)`` at the
    centred grid frequencies ``k = (n - R) / (L pixel_size)`` inside the ball ``|k| <= 1/2``
    cycles per pixel, then ``vol = (1 / V) sum_k F(k) e^{2 pi i k . x}`` at the voxels
    ``x = (n - R) pixel_size`` (``V = (L pixel_size)^3``): the Fourier series of the
    periodic density, truncated to the ball. No FFT, no grid sampling, no blur.
    ``pos`` (n, 3) in Angstrom from the centre; ``a``, ``b`` (n, 5) the Gaussian
    coefficients of each atom.
    """
    R = L // 2
    m = np.arange(L) - R
    f = m / (L * pixel_size)
    kx, ky, kz = np.meshgrid(f, f, f, indexing="ij")
    ball = (kx ** 2 + ky ** 2 + kz ** 2) * pixel_size ** 2 <= 0.25 + 1e-12
    k = np.stack([kx[ball], ky[ball], kz[ball]], axis=1)            # (nk, 3)
    s2 = np.sum(k ** 2, axis=1)
    F = np.zeros(len(k), np.complex128)
    for r, q, B, ai, bi in zip(pos, occ, b_iso, a, b):
        amp = q * np.sum(ai[None, :] * np.exp(-(bi[None, :] + B) * s2[:, None] / 4.0), axis=1)
        F += amp * np.exp(-2j * np.pi * (k @ r))
    x = m * pixel_size
    X = np.stack(np.meshgrid(x, x, x, indexing="ij"), axis=-1).reshape(-1, 3)
    vol = np.zeros(L ** 3)
    for i0 in range(0, len(X), 4096):
        vol[i0:i0 + 4096] = (np.exp(2j * np.pi * (X[i0:i0 + 4096] @ k.T)) @ F).real
    return vol.reshape(L, L, L) / (L * pixel_size) ** 3


def score_map(image, templates, sigma2):
    """``max_k sum_u y[s + u] p_k[u] / (sigma ||p_k||)`` for every top-left ``s``, by explicit loops."""
    N0, N1 = image.shape
    K, L, _ = templates.shape
    z = np.full((N0 - L + 1, N1 - L + 1), -np.inf)
    best = np.zeros(z.shape, dtype=np.int64)
    for k in range(K):
        t = templates[k] / np.sqrt(np.sum(templates[k] ** 2))
        for a in range(N0 - L + 1):
            for b in range(N1 - L + 1):
                v = np.sum(image[a:a + L, b:b + L] * t) / math.sqrt(sigma2)
                if v > z[a, b]:
                    z[a, b] = v
                    best[a, b] = k
    return z, best


# --------------------------------------------------------------------------- CTF groups (theory section 11)

def filter_matrix(flt, L, P):
    """``Psi`` from its definition, column by column: pad the unit image to P x P (top left),
    multiply its DFT by the filter on the P-grid frequencies, invert, keep the top-left L x L."""
    T = flt.transfer((P, P))
    Psi = np.zeros((L * L, L * L))
    for r in range(L * L):
        e = np.zeros((P, P))
        e[r // L, r % L] = 1.0
        Psi[:, r] = np.fft.ifft2(np.fft.fft2(e) * T).real[:L, :L].ravel()
    return Psi


def apply_filter(flt, img, P):
    """``Psi img`` by padding, filtering and cropping one image."""
    L = img.shape[0]
    z = np.zeros((P, P))
    z[:L, :L] = img
    return np.fft.ifft2(np.fft.fft2(z) * flt.transfer((P, P))).real[:L, :L]


def filtered_operators(A, Psi):
    """``Psi_g A_k`` for every group and rotation, explicitly: (G, K, L^2, M)."""
    return np.einsum("gpq,kqm->gkpm", Psi, A)


def brute_log_posteriors_groups(patches, groups, A, Psi, theta, upsilon, sigma2):
    """Brute-force E-step with CTF groups: patch ``j`` of group ``g`` against ``C T_l Z Psi_g A_k theta``
    for every rotation and shift (:func:`brute_log_posteriors` with the explicit ``Psi_g A_k``)."""
    n, L, _ = patches.shape
    K = A.shape[0]
    AG = filtered_operators(A, Psi)
    logp = np.full((n, K, 2 * L, 2 * L), -np.inf)
    logp_empty = np.empty(n)
    loglik = np.empty(n)
    for g in np.unique(groups):
        sel = np.nonzero(groups == g)[0]
        e, p, ll = brute_log_posteriors(patches[sel], AG[g], theta, upsilon, sigma2)
        logp_empty[sel], logp[sel], loglik[sel] = e, p, ll
    return logp_empty, logp, loglik


def brute_normal_equations_groups(patches, groups, A, Psi, w, L):
    """Brute-force ``H = sum_{j,k,l} w_jkl (S_l Psi_{g_j} A_k)^T (S_l Psi_{g_j} A_k)`` and ``b``,
    the matrices ``S_l Psi_g A_k`` formed explicitly for every group, rotation and shift."""
    M = A.shape[2]
    AG = filtered_operators(A, Psi)
    H = np.zeros((M, M))
    b = np.zeros(M)
    for g in np.unique(groups):
        sel = np.nonzero(groups == g)[0]
        Hg, bg = brute_normal_equations(patches[sel], AG[g], w[sel], L)
        H += Hg
        b += bg
    return H, b
