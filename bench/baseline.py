"""Suite ``baseline``: the paper's own route (its eqs. 28-30), written in NumPy, against numbaem.

The paper's route (MODEL section 6, "The paper forms A_{k,l}^T A_{k,l} for every
rotation and shift"), implemented faithfully and vectorised in :class:`PaperRoute`:

1. once per stage: for every rotation ``k`` and every non-empty shift ``l`` form
   ``A_kl = (C T_l Z) A_k`` explicitly (``L^2 x M``) and ``A_kl^T A_kl`` (``M x M``);
   both are stored (``K (2L-1)^2 (L^2 M + M^2)`` numbers);
2. per iteration, E-step: correlations by FFT (the paper's "by utilizing convolutions",
   ``scipy.fft`` with all threads), scores, a log-sum-exp, and the posteriors of *every*
   patch, rotation and shift stored (``n x K x (2L-1)^2`` plus the empty state), as the
   sums of eqs. 29-30 need them;
3. per iteration, M-step: ``H = sum_{k,l} (sum_j w_jkl) A_kl^T A_kl`` (eq. 29, one
   ``M x M`` term per rotation and shift), ``b = sum_{k,l} A_kl^T (sum_j w_jkl y_j)``
   (eq. 30; the paper precomputes ``A_kl^T y_j`` for every patch, which would take
   ``n K (2L-1)^2 M`` numbers, 276 GB at the ``small`` size, so the patch sum is taken
   first, one GEMM, and then one ``A_kl^T`` product per rotation and shift), Cholesky.

The suite times it at the ``small`` size. The baseline really runs on
``--baseline-patches`` patches (default 2,000: its posterior store alone is 0.8 GB
there, 8 GB at 20,000) and the patch-proportional parts (E-step, the patch sums) are
scaled linearly to the full patch count; ``--baseline-rotations`` caps the rotations of
the per-shift precompute and of the ``H`` / ``b`` sums, which are then scaled by
``K / K_pre``. The JSON says which figure was measured and which extrapolated.

Honesty check: on a tiny case (and on the measured subset when nothing is capped) the
baseline's posteriors, ``H`` and ``b`` are compared with numbaem's; the relative
differences are in the JSON.
"""
import math

import numpy as np
import scipy.fft
from scipy import linalg

from numbaem.runtime import fft
from numbaem.model.basis import FBBasis
from numbaem.em.run import stream_stats
from numbaem.em.estep import SufficientStats, e_step_chunk, projection_spectra
from numbaem.runtime.memory import default_budget
from numbaem.em.mstep import normal_equations, solve
from numbaem.model.projection import projection_matrices
from numbaem.model.rotations import rotation_grid

from ._common import Phases, PeakMemory, synthetic_source
from ._iteration import IterationSetup

FULL = dict(L=7, lmax=4, K=300, patches=20_000, baseline_patches=2000)
QUICK = dict(L=7, lmax=4, K=24, patches=400, baseline_patches=100)
TINY = dict(L=5, lmax=2, K=6, patches=30)


def kept_shifts(L):
    """Indices ``0..2L-1`` without ``L`` (a shift with ``l1 = L`` or ``l2 = L`` leaves nothing)."""
    return np.array([i for i in range(2 * L) if i != L])


class PaperRoute:
    """The paper's per-shift EM route in NumPy (see the module docstring).

    Parameters
    ----------
    A : ndarray, shape (K, L^2, M)
        The projection operators (numbaem's, so both routes see the same ``A_k``).
    L : int
    workers : int
        Threads for ``scipy.fft``.
    """

    def __init__(self, A, L, workers=1):
        self.A = A
        self.K, _, self.M = A.shape
        self.L = L
        self.keep = kept_shifts(L)
        self.S = len(self.keep) ** 2
        self.workers = workers
        self.Akl = None
        self.AtA = None

    # ------------------------------------------------------------------ once per stage
    def shifted_operators(self, K_pre):
        """``A_kl = (C T_l Z) A_k`` for the first ``K_pre`` rotations: (K_pre, S, L^2, M).

        Shifts in row-major order of ``(l1, l2)`` over :func:`kept_shifts`;
        ``(C T_l Z u)[q] = u_padded[(q - l) mod 2L]``.
        """
        L, M = self.L, self.M
        Z = np.zeros((K_pre, 2 * L, 2 * L, M))
        Z[:, :L, :L] = self.A[:K_pre].reshape(K_pre, L, L, M)
        out = np.empty((K_pre, self.S, L * L, M))
        q = np.arange(L)
        s = 0
        for l1 in self.keep:
            rows = (q - l1) % (2 * L)
            Zr = Z[:, rows]
            for l2 in self.keep:
                out[:, s] = Zr[:, :, (q - l2) % (2 * L)].reshape(K_pre, L * L, M)
                s += 1
        return out

    def precompute(self, K_pre=None, phases=None):
        """Form and store every ``A_kl`` and ``A_kl^T A_kl`` (eq. 29's matrices)."""
        K_pre = self.K if K_pre is None else int(K_pre)
        ph = phases or Phases()
        with ph("precompute_Akl"):
            self.Akl = self.shifted_operators(K_pre)
        with ph("precompute_AtA"):
            self.AtA = np.matmul(self.Akl.transpose(0, 1, 3, 2), self.Akl)   # (K_pre, S, M, M)
        return ph

    @property
    def K_pre(self):
        return 0 if self.AtA is None else self.AtA.shape[0]

    # ------------------------------------------------------------------ per iteration
    def spectra(self, theta):
        """``conj(FFT2(Z p_k))`` and ``e_k`` at the kept shifts (MODEL section 5)."""
        L, K = self.L, self.K
        proj = (self.A @ theta).reshape(K, L, L)
        zp = np.zeros((K, 2 * L, 2 * L))
        zp[:, :L, :L] = proj
        Pc = np.conj(scipy.fft.rfft2(zp, workers=self.workers))
        zp[:, :L, :L] = proj ** 2
        P2c = np.conj(scipy.fft.rfft2(zp, workers=self.workers))
        one = np.zeros((2 * L, 2 * L))
        one[:L, :L] = 1.0
        e = scipy.fft.irfft2(scipy.fft.rfft2(one)[None] * P2c, s=(2 * L, 2 * L), workers=self.workers)
        return Pc, e[:, self.keep][:, :, self.keep]

    def e_step(self, patches, theta, upsilon, sigma2, chunk=64, phases=None):
        """Posteriors of every patch, rotation and non-empty shift, stored.

        Returns
        -------
        w : ndarray, shape (n, K, S)
        w_empty, loglik : ndarray, shape (n,)
        """
        L, K, S = self.L, self.K, self.S
        ph = phases or Phases()
        with ph("projections_spectra"):
            Pc, e = self.spectra(theta)
        n = len(patches)
        with ph("estep"):
            w = np.empty((n, K, S))
            w_empty = np.empty(n)
            loglik = np.empty(n)
            lsp = math.log1p(-upsilon) - math.log(S * K)
            lu = math.log(upsilon)
            const = 0.5 * L * L * math.log(2 * math.pi * sigma2)
            for j0 in range(0, n, chunk):
                y = patches[j0:j0 + chunk]
                c = len(y)
                zy = np.zeros((c, 2 * L, 2 * L))
                zy[:, :L, :L] = y
                Yh = scipy.fft.rfft2(zy, workers=self.workers)
                corr = scipy.fft.irfft2(Yh[:, None] * Pc[None], s=(2 * L, 2 * L), workers=self.workers)
                corr = corr[:, :, self.keep][:, :, :, self.keep]
                sc = (lsp + (2.0 * corr - e[None]) / (2.0 * sigma2)).reshape(c, K * S)
                mx = np.maximum(sc.max(axis=1), lu)
                ex = np.exp(sc - mx[:, None])
                tot = ex.sum(axis=1) + np.exp(lu - mx)
                w[j0:j0 + c] = (ex / tot[:, None]).reshape(c, K, S)
                w_empty[j0:j0 + c] = np.exp(lu - mx) / tot
                yy = np.einsum("jab,jab->j", y, y)
                loglik[j0:j0 + c] = mx + np.log(tot) - yy / (2.0 * sigma2) - const
        return w, w_empty, loglik

    def normal_equations(self, patches, w, phases=None):
        """``H`` (eq. 29) and ``b`` (eq. 30) over the precomputed rotations (the first ``K_pre``)."""
        if self.AtA is None:
            raise RuntimeError("call precompute() first")
        ph = phases or Phases()
        Kp, S, M, L = self.K_pre, self.S, self.M, self.L
        n = len(patches)
        wk = w if Kp == self.K else w[:, :Kp]
        with ph("sum_patches_W"):
            Wkl = wk.sum(axis=0)                                                  # (Kp, S)
        with ph("H_per_shift"):
            H = np.tensordot(Wkl, self.AtA, axes=([0, 1], [0, 1]))                # sum_kl W_kl A_kl^T A_kl
        with ph("sum_patches_y"):
            z = wk.reshape(n, Kp * S).T @ patches.reshape(n, L * L)               # sum_j w_jkl y_j
        with ph("b_per_shift"):
            b = self.Akl.reshape(Kp * S * L * L, M).T @ z.ravel()                 # sum_kl A_kl^T z_kl
        return H, b

    def solve(self, H, b, phases=None):
        ph = phases or Phases()
        with ph("solve"):
            theta = linalg.cho_solve(linalg.cho_factor(H, lower=False, check_finite=False), b, check_finite=False)
        return theta

    def iteration(self, patches, theta, upsilon, sigma2, phases=None):
        """One EM iteration; returns ``(theta_new, upsilon_new, phases)``."""
        ph = phases or Phases()
        w, w_empty, _ = self.e_step(patches, theta, upsilon, sigma2, phases=ph)
        H, b = self.normal_equations(patches, w, phases=ph)
        theta_new = self.solve(H, b, phases=ph)
        return theta_new, float(np.mean(w_empty)), ph


# ---------------------------------------------------------------------------- checks

def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-300))


def verify_tiny(cfg, sizes=TINY, threads=1):
    """Baseline against numbaem on a tiny case: posteriors, ``H``, ``b`` and the solution."""
    L, lmax, K, n = sizes["L"], sizes["lmax"], sizes["K"], sizes["patches"]
    rng = cfg.rng(7)
    source, theta_true = synthetic_source(L, lmax, n, rng, snr=2.0, occupancy=0.5)
    theta = theta_true * (1 + 0.3 * rng.standard_normal(theta_true.shape))
    patches = source.get(np.arange(n))
    A = projection_matrices(FBBasis(L, lmax), rotation_grid(K))
    M = A.shape[2]
    upsilon, sigma2 = 0.4, 1.0
    # numbaem
    stats = SufficientStats.zeros(K, L)
    spectra = projection_spectra((A @ theta).reshape(K, L, L))
    loglik_n, post, w_empty_n = e_step_chunk(patches, spectra, upsilon, sigma2, stats, keep_posteriors=True)
    H_n, b_n = normal_equations([(slice(None), A)], stats.W, stats.G, L, M)
    # paper route
    pr = PaperRoute(A, L, workers=threads)
    pr.precompute()
    w, w_empty_b, loglik_b = pr.e_step(patches, theta, upsilon, sigma2)
    H_b, b_b = pr.normal_equations(patches, w)
    keep = pr.keep
    post_kept = post[:, :, keep][:, :, :, keep].reshape(n, K, -1)
    return dict(L=L, lmax=lmax, M=M, K=K, patches=n,
                posteriors_rel_diff=_rel(w, post_kept), empty_rel_diff=_rel(w_empty_b, w_empty_n),
                loglik_rel_diff=_rel(loglik_b, loglik_n), H_rel_diff=_rel(H_b, H_n), b_rel_diff=_rel(b_b, b_n),
                theta_rel_diff=_rel(pr.solve(H_b, b_b), solve(H_n, b_n).theta),
                posterior_normalisation_error=float(np.abs(post.sum(axis=(1, 2, 3)) + w_empty_n - 1).max()))


# ---------------------------------------------------------------------------- suite

LINEAR_IN_PATCHES = ("estep", "sum_patches_W", "sum_patches_y")
LINEAR_IN_KPRE = ("sum_patches_W", "H_per_shift", "sum_patches_y", "b_per_shift", "precompute_Akl", "precompute_AtA")
PER_ITERATION = ("projections_spectra", "estep", "sum_patches_W", "H_per_shift", "sum_patches_y", "b_per_shift",
                 "solve")
PER_STAGE = ("precompute_Akl", "precompute_AtA")


def run(cfg):
    sizes = dict(QUICK if cfg.quick else FULL)
    n_full, K, L, lmax = sizes["patches"], sizes["K"], sizes["L"], sizes["lmax"]
    n_sub = min(n_full, cfg.baseline_patches or sizes["baseline_patches"])
    K_pre = min(K, cfg.baseline_rotations or K)
    reps = 1 if cfg.quick else 2

    tiny = verify_tiny(cfg, threads=cfg.threads)

    # numbaem at the full size: one whole iteration (and its E-step split)
    rng = cfg.rng(1)
    source, theta_true = synthetic_source(L, lmax, n_full, rng)
    theta = theta_true * (1.0 + 0.3 * rng.standard_normal(theta_true.shape))
    st = IterationSetup(source, lmax, K, theta, cfg.memory or default_budget(), seed=cfg.seed)
    st.warm_up()
    it = st.iteration(reps=reps)
    numbaem_full = dict(iteration=it["seconds"]["best"], estep=it["seconds_estep"], mstep=it["seconds_mstep"],
                        peak_memory=it["peak_memory"], chunk=st.n_chunk, patches=n_full)

    # numbaem on the subset, phase by phase (same patches as the baseline)
    patches = source.get(np.arange(n_sub))
    idx = np.arange(n_sub)
    ch = min(st.n_chunk, n_sub)
    A = st.operator.A if st.operator.A is not None else projection_matrices(st.basis, st.rots)
    sp = st.spectra()
    fft.clear_cache()                                          # drop the full-size chunk workspace
    stream_stats(source, idx, sp, st.upsilon, st.sigma2, ch)   # warm the subset's plan
    nph = Phases()
    for _ in range(reps):
        with nph("projections_spectra"):
            sp = st.spectra()
        with nph("estep"):
            stats = stream_stats(source, idx, sp, st.upsilon, st.sigma2, ch)
        with nph("normal_equations"):
            H_n, b_n = normal_equations(st.operator.blocks(), stats.W, stats.G, L, st.M)
        with nph("solve"):
            solve(H_n, b_n)
    numbaem_sub = {k: v / reps for k, v in nph.seconds.items()}
    numbaem_sub_total = sum(numbaem_sub.values())

    # the paper's route on the subset (numbaem's cached FFT workspaces released first, so the
    # peak memory below is the baseline's own)
    fft.clear_cache()
    pr = PaperRoute(A, L, workers=cfg.threads)
    with PeakMemory() as pm:
        pre = pr.precompute(K_pre)
        bph = Phases()
        for _ in range(reps):
            w, w_empty, _ = pr.e_step(patches, theta, st.upsilon, st.sigma2, phases=bph)
            H_b, b_b = pr.normal_equations(patches, w, phases=bph)
            pr.solve(H_b, b_b, phases=bph)
    measured = {k: v / reps for k, v in bph.seconds.items()}
    measured.update(pre.seconds)
    check_subset = None
    if K_pre == K:
        check_subset = dict(H_rel_diff=_rel(H_b, H_n), b_rel_diff=_rel(b_b, b_n), patches=n_sub)
    del w

    # extrapolation to the full size
    scale = {}
    for k in measured:
        f = 1.0
        if k in LINEAR_IN_PATCHES:
            f *= n_full / n_sub
        if k in LINEAR_IN_KPRE:
            f *= K / K_pre
        scale[k] = f
    extrapolated = {k: measured[k] * scale[k] for k in measured}
    base_iter_sub = sum(measured[k] for k in PER_ITERATION)
    base_iter_full = sum(extrapolated[k] for k in PER_ITERATION)
    base_stage_full = sum(extrapolated[k] for k in PER_STAGE)
    S, M = pr.S, pr.M
    store = dict(posteriors_bytes_full=n_full * (K * S + 1) * 8, posteriors_bytes_measured=n_sub * (K * S + 1) * 8,
                 Akl_bytes_full=K * S * L * L * M * 8, AtA_bytes_full=K * S * M * M * 8,
                 peak_rss_measured=pm.peak)
    paper_size = _paper_size_costs()
    results = dict(
        ratio_iteration=base_iter_full / numbaem_full["iteration"],
        ratio_iteration_with_precompute=(base_iter_full + base_stage_full) / numbaem_full["iteration"],
        ratio_subset_measured=base_iter_sub / numbaem_sub_total,
        baseline=dict(iteration_full_extrapolated=base_iter_full, precompute_full_extrapolated=base_stage_full,
                      iteration_subset_measured=base_iter_sub, measured=measured, extrapolated=extrapolated,
                      scale=scale, fft="scipy.fft (pocketfft), workers=threads", blas="numpy's BLAS"),
        numbaem=dict(full=numbaem_full, subset=numbaem_sub, subset_total=numbaem_sub_total,
                     build_A=st.seconds_operator),
        verify_tiny=tiny, verify_subset=check_subset, storage=store, paper_v1_size=paper_size,
        measured_patches=n_sub, full_patches=n_full, precompute_rotations=K_pre, rotations=K,
    )
    notes = [
        f"baseline measured on {n_sub} of {n_full} patches; E-step and the patch sums (sum_patches_W, "
        "sum_patches_y) scaled linearly by patches to the full count" if n_sub < n_full else
        "baseline measured on all patches (nothing extrapolated in patches)",
        f"per-shift precompute and H/b sums over {K_pre} of {K} rotations, scaled by K/K_pre" if K_pre < K else
        "per-shift precompute over all rotations (nothing extrapolated in K)",
        "ratio_iteration = baseline per-iteration time (extrapolated to the full size) / numbaem em_iteration "
        "time measured at the full size; the per-stage precompute (A_kl, A_kl^T A_kl) is excluded there and "
        "included in ratio_iteration_with_precompute",
        "ratio_subset_measured: both routes measured on the same subset, nothing extrapolated",
        "the paper precomputes A_kl^T y_j for every patch (n K (2L-1)^2 M numbers); the baseline sums over "
        "patches first (one GEMM) instead, which is cheaper, so the baseline is if anything flattered",
    ]
    return dict(params=dict(st.params, baseline_patches=n_sub, baseline_precompute_rotations=K_pre, S=S),
                results=results, peak_memory=max(pm.peak, it["peak_memory"]), notes=notes)


def _paper_size_costs(L=11, lmax=10, K=560, n=60_000, M=219):
    """What the per-shift route would need at the paper-v1 size (analytic; nothing run)."""
    S = (2 * L - 1) ** 2
    return dict(L=L, lmax=lmax, M=M, K=K, patches=n, shifts=S,
                AtA_bytes=K * S * M * M * 8, Akl_bytes=K * S * L * L * M * 8, posteriors_bytes=n * (K * S + 1) * 8,
                precompute_flops=2 * K * S * L * L * M * M, H_flops_per_iteration=2 * K * S * M * M,
                numbaem_H_flops_per_iteration=2 * K * L * L * M * M)


def plot(record, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = record["results"]
    fig = Figure(figsize=(11, 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.6, 1]))
    ex = r["baseline"]["extrapolated"]
    keys = [k for k in PER_ITERATION + PER_STAGE if k in ex]
    ax1.barh(keys[::-1], [ex[k] for k in keys[::-1]], color=["C3" if k in PER_STAGE else "C0" for k in keys[::-1]])
    for y, k in enumerate(keys[::-1]):
        ax1.text(ex[k], y, f" {ex[k]:.3g} s", va="center", fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds at the full size (extrapolated; red: once per stage)")
    ax1.set_title(f"paper's per-shift route (NumPy), {r['full_patches']} patches, K={r['rotations']}", fontsize=9)
    nb = r["numbaem"]["full"]
    vals = [r["baseline"]["iteration_full_extrapolated"], nb["iteration"]]
    ax2.bar(["paper route", "numbaem"], vals, color=["C0", "C2"])
    for x, v in enumerate(vals):
        ax2.text(x, v, f"{v:.3g} s", ha="center", va="bottom", fontsize=9)
    ax2.set_ylabel("seconds per iteration")
    ax2.set_title(f"ratio {r['ratio_iteration']:.1f}x per iteration "
                  f"({r['ratio_iteration_with_precompute']:.1f}x with the precompute)\n"
                  f"tiny check: H rel diff {r['verify_tiny']['H_rel_diff']:.1e}, b {r['verify_tiny']['b_rel_diff']:.1e}",
                  fontsize=9)
    fig.savefig(path, dpi=110)


def summary(record):
    r = record["results"]
    return (f"paper route {r['baseline']['iteration_full_extrapolated']:.3g} s/iteration (extrapolated from "
            f"{r['measured_patches']} patches) vs numbaem {r['numbaem']['full']['iteration']:.3g} s: "
            f"{r['ratio_iteration']:.1f}x ({r['ratio_iteration_with_precompute']:.1f}x with the precompute); "
            f"tiny-case H/b rel diff {r['verify_tiny']['H_rel_diff']:.1e}/{r['verify_tiny']['b_rel_diff']:.1e}")
