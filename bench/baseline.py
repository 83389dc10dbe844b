"""Suite ``baseline``: the paper's per-shift M-step (its eqs. 28-30) against numbaem's, on the same posteriors.

Both routes share everything but what the paper does differently: the same patches
(2,000 of the ``small`` suite's simulated micrographs by default, ``--baseline-patches``),
the same start, the same operators ``A_k`` (``projection_matrices``), the same
projections and spectra, and the package's own E-step (``e_step_chunk``, in the same
chunks). They differ only in

1. **the M-step.** numbaem: ``numbaem.em.mstep.normal_equations`` from the sufficient
   statistics ``W``, ``G`` (theory section 6: the sum over shifts collapses into a mask
   weight ``h_k``, so ``H = sum_k A_k^T diag(h_k) A_k``), then Cholesky. The paper
   (:class:`PaperRoute`): with ``A_kl = C T_l Z A_k`` formed explicitly for every
   rotation ``k`` and non-empty shift ``l`` and ``A_kl^T A_kl`` precomputed (once per
   stage, eq. 29's matrices),

       H = sum_{k,l} W_k[l] A_kl^T A_kl,        W_k[l] = sum_j w_jkl        (eq. 29)
       b = sum_{j,k,l} w_jkl A_kl^T y_j                                      (eq. 30)

   then Cholesky (eq. 28). For ``b`` the paper precomputes ``A_kl^T y_j`` for every
   patch (``Nd K (2L-1)^2 M`` numbers: 276 GB at the ``small`` size, 514 TB at paper-v1); the route
   here sums over patches first (``z_kl = sum_j w_jkl y_j``, one GEMM) and then takes
   ``A_kl^T z_kl``, which is cheaper: the baseline is if anything flattered;
2. **the posteriors.** The paper's M-step needs ``w_jkl`` of every patch, rotation and
   shift, so its E-step stores them (``n (K (2L-1)^2 + 1)`` numbers); numbaem's keeps
   only the sums ``W`` and ``G`` of each chunk. The paper route's E-step is the
   package's ``e_step_chunk(..., keep_posteriors=True)``, its posteriors copied at the
   kept shifts into the store; the steps of that E-step that only make numbaem's data
   sums (``fft_forward``, ``accumulate``) are taken out of its time (measured by the
   library's ``timer`` hook in the same call).

Reported: the M-step ratio (paper route / ``normal_equations`` + solve), the same with
numbaem's data sums counted on its side (they replace the paper's patch sums), the
iteration ratio, the per-stage precompute, both routes' ``H`` and ``b`` from the
*same* posteriors (relative differences: round-off, about 1e-15 expected, since the two
sum the same terms in different orders and numbaem's goes through FFTs), the measured
peak memory of each route, and the paper route's memory at the paper-v1 size
(computed, not run).
"""
import math

import numpy as np
from scipy import linalg

from numbaem.data.patches import PatchSource
from numbaem.em.estep import SufficientStats, e_step_chunk, projection_spectra, stream_stats
from numbaem.em.mstep import normal_equations, solve
from numbaem.em.run import stage_plan
from numbaem.model.basis import FBBasis
from numbaem.model.projection import projection_matrices
from numbaem.model.rotations import rotation_grid
from numbaem.runtime import fft
from numbaem.runtime.memory import default_budget, format_size

from . import paper, small
from ._common import PeakMemory, Phases, fmt_seconds as fs, time_call
from ._data import prepare
from ._userrun import start_theta

FULL = dict(K=300, patches=2000, reps=3, mstep_reps=7)
QUICK = dict(K=24, patches=100, reps=1, mstep_reps=2)
TINY = dict(L=5, lmax=2, K=6, micrograph_size=60)


def kept_shifts(L):
    """Indices ``0..2L-1`` without ``L`` (a shift with ``l1 = L`` or ``l2 = L`` leaves nothing)."""
    return np.array([i for i in range(2 * L) if i != L])


class PaperRoute:
    """The paper's per-shift M-step (see the module docstring).

    Parameters
    ----------
    A : ndarray, shape (K, L^2, M)
        The projection operators (numbaem's, so both routes see the same ``A_k``).
    L : int
    """

    def __init__(self, A, L):
        self.A = A
        self.K, _, self.M = A.shape
        self.L = L
        self.keep = kept_shifts(L)
        self.S = len(self.keep) ** 2
        self.Akl = None
        self.AtA = None

    def shifted_operators(self):
        """``A_kl = (C T_l Z) A_k``: (K, S, L^2, M), shifts in row-major order of ``(l1, l2)``.

        ``(C T_l Z u)[q] = u_padded[(q - l) mod 2L]`` for ``q`` in ``[0, L)^2`` (theory section 4).
        """
        L, M, K = self.L, self.M, self.K
        Z = np.zeros((K, 2 * L, 2 * L, M))
        Z[:, :L, :L] = self.A.reshape(K, L, L, M)
        out = np.empty((K, self.S, L * L, M))
        q = np.arange(L)
        s = 0
        for l1 in self.keep:
            Zr = Z[:, (q - l1) % (2 * L)]
            for l2 in self.keep:
                out[:, s] = Zr[:, :, (q - l2) % (2 * L)].reshape(K, L * L, M)
                s += 1
        return out

    def precompute(self, phases=None):
        """Form and store every ``A_kl`` and ``A_kl^T A_kl`` (eq. 29's matrices; once per stage)."""
        ph = phases or Phases()
        with ph("precompute_Akl"):
            self.Akl = self.shifted_operators()
        with ph("precompute_AtA"):
            self.AtA = np.matmul(self.Akl.transpose(0, 1, 3, 2), self.Akl)   # (K, S, M, M)
        return ph

    def posteriors(self, source, idx, spectra, upsilon, sigma2, n_chunk, timer=None):
        """The package's E-step over ``idx``, its posteriors stored at the kept shifts.

        Returns
        -------
        w : ndarray, shape (n, K, S)
        w_empty : ndarray, shape (n,)
        stats : SufficientStats
            What numbaem's M-step would get from the same E-step.
        """
        L, K, S = self.L, self.K, self.S
        n = len(idx)
        w = np.empty((n, K, S))
        w_empty = np.empty(n)
        stats = SufficientStats.zeros(K, L)
        buf = np.empty((n_chunk, L, L))
        flat = (self.keep[:, None] * (2 * L) + self.keep[None, :]).ravel()    # kept shifts, row-major (l1, l2)
        for i in range(0, n, n_chunk):
            sel = idx[i:i + n_chunk]
            y = source.get(sel, out=buf[:len(sel)])
            _, post, we = e_step_chunk(y, spectra, upsilon, sigma2, stats, n_chunk=n_chunk, keep_posteriors=True,
                                       timer=timer)
            np.take(post.reshape(len(sel), K, 4 * L * L), flat, axis=2, out=w[i:i + len(sel)])
            w_empty[i:i + len(sel)] = we
        return w, w_empty, stats

    def normal_equations(self, patches, w, phases=None):
        """``H`` (eq. 29) and ``b`` (eq. 30) from the stored posteriors ``w`` (n, K, S) and patches (n, L, L)."""
        if self.AtA is None:
            raise RuntimeError("call precompute() first")
        ph = phases or Phases()
        K, S, M, L = self.K, self.S, self.M, self.L
        n = len(patches)
        with ph("sum_patches_W"):
            Wkl = w.sum(axis=0)                                                   # (K, S)
        with ph("H_per_shift"):
            H = np.tensordot(Wkl, self.AtA, axes=([0, 1], [0, 1]))                # sum_kl W_kl A_kl^T A_kl
        with ph("sum_patches_y"):
            z = w.reshape(n, K * S).T @ patches.reshape(n, L * L)                 # sum_j w_jkl y_j
        with ph("b_per_shift"):
            b = self.Akl.reshape(K * S * L * L, M).T @ z.ravel()                  # sum_kl A_kl^T z_kl
        return H, b

    @staticmethod
    def solve(H, b, phases=None):
        ph = phases or Phases()
        with ph("solve"):
            theta = linalg.cho_solve(linalg.cho_factor(H, lower=False, check_finite=False), b, check_finite=False)
        return theta


def _best(runs):
    """Per phase, the least seconds over the repetitions (a list of :class:`Phases`)."""
    out = {}
    for r in runs:
        for k, v in r.seconds.items():
            out[k] = min(v, out.get(k, v))
    return out


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-300))


# ---------------------------------------------------------------------------- checks

def verify_tiny(cfg, sizes=TINY):
    """Both M-steps on the same posteriors, on a tiny simulated case: ``H``, ``b`` and the solution.

    The micrograph comes from ``simulate_micrographs`` (Method 2, SNR 2) in memory.
    """
    from numbaem.sim.molecule import synthetic_molecule
    from numbaem.sim.simulate import simulate_micrographs

    L, lmax, K = sizes["L"], sizes["lmax"], sizes["K"]
    sim = simulate_micrographs(synthetic_molecule(21, rng=cfg.seed), L, micrograph_size=sizes["micrograph_size"],
                               method=2, density=0.15, snr=2.0, lmax=lmax, rng=cfg.rng(7))
    source = PatchSource(sim.micrographs, L)
    idx = np.arange(source.n_patches)
    A = projection_matrices(FBBasis(L, lmax), rotation_grid(K))
    M = A.shape[2]
    theta = sim.truth_theta * (1 + 0.3 * cfg.rng(8).standard_normal(sim.truth_theta.shape))
    spectra = projection_spectra((A @ theta).reshape(K, L, L))
    pr = PaperRoute(A, L)
    pr.precompute()
    w, w_empty, stats = pr.posteriors(source, idx, spectra, 0.4, sim.sigma2, len(idx))
    H_b, b_b = pr.normal_equations(source.get(idx), w)
    H_n, b_n = normal_equations([(slice(None), A)], stats.W, stats.G, L, M)
    return dict(L=L, lmax=lmax, M=M, K=K, patches=len(idx), H_rel_diff=_rel(H_b, H_n), b_rel_diff=_rel(b_b, b_n),
                theta_rel_diff=_rel(pr.solve(H_b, b_b), solve(H_n, b_n).theta),
                posterior_normalisation_error=float(np.abs(w.sum(axis=(1, 2)) + w_empty - 1).max()))


# ---------------------------------------------------------------------------- suite

PAPER_MSTEP = ("sum_patches_W", "H_per_shift", "sum_patches_y", "b_per_shift", "solve")
PAPER_STAGE = ("precompute_Akl", "precompute_AtA")
DATA_SUM_STEPS = ("fft_forward", "accumulate")


def run(cfg):
    sz = QUICK if cfg.quick else FULL
    reps, mreps = sz["reps"], sz["mstep_reps"]
    spec = small.data_spec(cfg)
    ds = prepare(spec, cfg.data_dir or f"{cfg.out}/data", threads=cfg.threads, resimulate=cfg.resimulate)
    L, lmax, K = spec.L, (small.QUICK if cfg.quick else small.FULL)["lmax"], sz["K"]
    source = PatchSource.from_files([str(p) for p in ds.micrographs], L)
    n = min(source.n_patches, cfg.baseline_patches or sz["patches"])
    idx = np.sort(cfg.rng(11).choice(source.n_patches, size=n, replace=False))
    patches = source.get(idx)
    basis = FBBasis(L, lmax)
    rots = rotation_grid(K)
    M = basis.M
    theta = start_theta(ds, lmax)
    upsilon, sigma2 = 0.5, ds.sigma2
    budget = cfg.memory or default_budget()

    tiny = verify_tiny(cfg)

    # shared: the operators and the spectra
    build_A, A = time_call(lambda: projection_matrices(basis, rots), reps=reps)
    spec_t, spectra = time_call(lambda: projection_spectra((A @ theta).reshape(K, L, L)), reps=reps)
    plan = stage_plan(budget, basis, K, n)            # the chunk and M-step blocks em_iteration would use
    n_chunk, mblock = plan.n_chunk, plan.mstep_block_bytes

    # numbaem: E-step (stream_stats) and M-step; every phase the best of its repetitions
    fft.clear_cache()
    stats_n = stream_stats(source, idx[:n_chunk], spectra, upsilon, sigma2, n_chunk)     # warm plans
    normal_equations([(slice(None), A)], stats_n.W, stats_n.G, L, M, max_block_bytes=mblock)
    runs_n = []
    with PeakMemory() as pm_n:
        for _ in range(reps):
            ph = Phases()
            with ph("estep"):
                stats_n = stream_stats(source, idx, spectra, upsilon, sigma2, n_chunk)
            runs_n.append(ph)
        for _ in range(mreps):        # the M-step is cheap: more repetitions against the machine's noise
            ph = Phases()
            with ph("normal_equations"):
                H_n, b_n = normal_equations([(slice(None), A)], stats_n.W, stats_n.G, L, M, max_block_bytes=mblock)
            with ph("solve"):
                solve(H_n, b_n)
            runs_n.append(ph)
    numbaem_t = _best(runs_n)
    prof_n = Phases()
    stream_stats(source, idx, spectra, upsilon, sigma2, n_chunk, timer=prof_n)
    data_sums = sum(prof_n.seconds.get(k, 0.0) for k in DATA_SUM_STEPS)

    # the paper's route: precompute, E-step storing the posteriors, per-shift M-step
    fft.clear_cache()
    pr = PaperRoute(A, L)
    pr.posteriors(source, idx[:n_chunk], spectra, upsilon, sigma2, n_chunk)        # warm plans
    runs_p = []
    with PeakMemory() as pm_p:
        pre = pr.precompute()
        for _ in range(reps):
            ph, steps = Phases(), Phases()
            with ph("estep_storing_posteriors"):
                w, w_empty, stats_p = pr.posteriors(source, idx, spectra, upsilon, sigma2, n_chunk, timer=steps)
            ph.add("estep_numbaem_data_sums", sum(steps.seconds.get(k, 0.0) for k in DATA_SUM_STEPS))
            runs_p.append(ph)
        for _ in range(mreps):
            ph = Phases()
            H_p, b_p = pr.normal_equations(patches, w, phases=ph)
            pr.solve(H_p, b_p, phases=ph)
            runs_p.append(ph)
    paper_t = dict(_best(runs_p), **pre.seconds)
    H_same, b_same = normal_equations([(slice(None), A)], stats_p.W, stats_p.G, L, M, max_block_bytes=mblock)
    check = dict(H_rel_diff=_rel(H_p, H_same), b_rel_diff=_rel(b_p, b_same),
                 theta_rel_diff=_rel(pr.solve(H_p, b_p), solve(H_same, b_same).theta),
                 W_rel_diff=_rel(w.sum(axis=0), stats_p.W[:, pr.keep][:, :, pr.keep].reshape(K, -1)),
                 stats_vs_stream_stats_W=_rel(stats_p.W, stats_n.W), stats_vs_stream_stats_G=_rel(stats_p.G, stats_n.G),
                 patches=n)
    del w

    mstep_paper = sum(paper_t[k] for k in PAPER_MSTEP)
    mstep_numbaem = numbaem_t["normal_equations"] + numbaem_t["solve"]
    estep_paper = paper_t["estep_storing_posteriors"] - paper_t["estep_numbaem_data_sums"]
    iter_paper = spec_t["best"] + estep_paper + mstep_paper
    iter_numbaem = spec_t["best"] + numbaem_t["estep"] + mstep_numbaem
    stage_paper = build_A["best"] + paper_t["precompute_Akl"] + paper_t["precompute_AtA"]
    S = pr.S
    results = dict(
        ratio_mstep=mstep_paper / mstep_numbaem,
        ratio_mstep_with_data_sums=mstep_paper / (mstep_numbaem + data_sums),
        ratio_iteration=iter_paper / iter_numbaem,
        ratio_iteration_with_precompute=(iter_paper + stage_paper) / (iter_numbaem + build_A["best"]),
        paper=dict(mstep=mstep_paper, estep=estep_paper, iteration=iter_paper, precompute=stage_paper,
                   phases=paper_t, phases_all=[r.seconds for r in runs_p], peak_rss=pm_p.peak),
        numbaem=dict(mstep=mstep_numbaem, estep=numbaem_t["estep"], estep_data_sums=data_sums,
                     iteration=iter_numbaem, phases=numbaem_t, phases_all=[r.seconds for r in runs_n],
                     estep_profile=dict(prof_n.seconds), peak_rss=pm_n.peak),
        reps=reps, mstep_reps=mreps,
        shared=dict(build_A=build_A, projections_spectra=spec_t, chunk=n_chunk),
        check_same_posteriors=check, verify_tiny=tiny,
        storage=dict(posteriors_bytes=n * (K * S + 1) * 8, Akl_bytes=K * S * L * L * M * 8,
                     AtA_bytes=K * S * M * M * 8, numbaem_A_bytes=A.nbytes),
        paper_v1_size=paper_size_costs(),
    )
    notes = [
        "both routes: the same patches, start, operators A_k, spectra and the package's E-step (e_step_chunk), "
        "in the same chunks; they differ in the M-step (per-shift eqs. 28-30 vs numbaem.em.mstep.normal_equations) "
        "and in storing the posteriors",
        "ratio_mstep = paper M-step (sum_patches_W + H_per_shift + sum_patches_y + b_per_shift + solve) / numbaem "
        "(normal_equations + solve); ratio_mstep_with_data_sums counts numbaem's E-step data sums (fft_forward + "
        "accumulate) on numbaem's side, since they do the work of the paper's patch sums",
        "ratio_iteration: spectra + E-step + M-step per iteration; the paper's E-step is the package's with the "
        "posteriors stored, minus its fft_forward and accumulate (numbaem's data sums, which the paper does not "
        "need); the per-stage precompute (A_k, A_kl, A_kl^T A_kl) is in ratio_iteration_with_precompute",
        "the paper precomputes A_kl^T y_j for every patch; here the patch sum is taken first (one GEMM), which is "
        "cheaper: the paper route is if anything flattered",
        "check_same_posteriors: both M-steps on the posteriors of one E-step run (relative differences, round-off)",
        "every phase: the least seconds over its repetitions (phases_all has each; E-steps 'reps', M-steps "
        "'mstep_reps'), after a warm-up chunk",
    ]
    return dict(params=dict(L=L, lmax=lmax, M=M, K=K, patches=n, shifts=S, chunk=n_chunk, budget_bytes=budget,
                            sigma2=sigma2, upsilon=upsilon),
                data=ds.record(), results=results, peak_memory=max(pm_p.peak, pm_n.peak), notes=notes)


def paper_size_costs():
    """What the per-shift route needs at the paper-v1 size (computed from its sizes; nothing run).

    Bytes of float64 arrays: ``A_kl^T A_kl`` (eq. 29's matrices, ``K S M^2``), the
    shifted operators ``A_kl`` (``K S L^2 M``), the posteriors of one iteration's
    patches (``n (K S + 1)``), and the per-patch products ``A_kl^T y_j`` the paper
    precomputes for all ``Nd`` patches (``Nd K S M``); against numbaem's operator
    (``K L^2 M``) and the paper-v1 budget.
    """
    sz = paper.FULL
    spec = sz["data"]
    L, K, lmax = spec.L, sz["K"], sz["lmax"]
    M = FBBasis(L, lmax).M
    S = (2 * L - 1) ** 2
    Nd = spec.patches
    n = int(math.ceil(sz["frac"] * Nd))
    out = dict(L=L, lmax=lmax, M=M, K=K, shifts=S, patches_per_iteration=n, patches_total=Nd,
               AtA_bytes=K * S * M * M * 8, Akl_bytes=K * S * L * L * M * 8, posteriors_bytes=n * (K * S + 1) * 8,
               Aty_all_patches_bytes=Nd * K * S * M * 8, numbaem_operator_bytes=K * L * L * M * 8,
               budget_bytes=sz["budget"], precompute_flops=2 * K * S * L * L * M * M,
               H_flops_per_iteration=2 * K * S * M * M, numbaem_H_flops_per_iteration=2 * K * L * L * M * M)
    out["paper_route_bytes"] = out["AtA_bytes"] + out["Akl_bytes"] + out["posteriors_bytes"]
    out["paper_route_over_budget"] = out["paper_route_bytes"] / sz["budget"]
    return out


def plot(record, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r, p = record["results"], record["params"]
    fig = Figure(figsize=(12, 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.4, 1]))
    ph = r["paper"]["phases"]
    keys = [k for k in PAPER_STAGE + PAPER_MSTEP if k in ph]
    ax1.barh(keys[::-1], [ph[k] for k in keys[::-1]], color=["C3" if k in PAPER_STAGE else "C0" for k in keys[::-1]])
    for y, k in enumerate(keys[::-1]):
        ax1.text(ph[k], y, f" {ph[k]:.3g} s", va="center", fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds (red: once per stage)")
    ax1.set_title(f"paper's per-shift M-step: L={p['L']}, M={p['M']}, K={p['K']}, {p['patches']} patches", fontsize=9)
    labels = ["M-step", "M-step +\nnumbaem data sums", "iteration"]
    paper_v = [r["paper"]["mstep"], r["paper"]["mstep"], r["paper"]["iteration"]]
    numbaem_v = [r["numbaem"]["mstep"], r["numbaem"]["mstep"] + r["numbaem"]["estep_data_sums"],
                 r["numbaem"]["iteration"]]
    x = np.arange(3)
    ax2.bar(x - 0.2, paper_v, 0.4, label="paper route", color="C0")
    ax2.bar(x + 0.2, numbaem_v, 0.4, label="numbaem", color="C2")
    ax2.set_xticks(x, labels)
    ax2.set_yscale("log")
    ax2.set_ylabel("seconds")
    ax2.legend(fontsize=8)
    c = r["check_same_posteriors"]
    ax2.set_title(f"M-step ratio {r['ratio_mstep']:.1f}x ({r['ratio_mstep_with_data_sums']:.1f}x with the data sums), "
                  f"iteration {r['ratio_iteration']:.2f}x\nsame posteriors: H rel diff {c['H_rel_diff']:.1e}, "
                  f"b {c['b_rel_diff']:.1e}", fontsize=9)
    fig.savefig(path, dpi=110)


def summary(record):
    r = record["results"]
    c = r["check_same_posteriors"]
    return (f"M-step: paper route {r['paper']['mstep']:.3g} s vs numbaem {r['numbaem']['mstep']:.3g} s = "
            f"{r['ratio_mstep']:.1f}x ({r['ratio_mstep_with_data_sums']:.1f}x counting numbaem's data sums); "
            f"iteration {r['ratio_iteration']:.2f}x; same posteriors: H/b rel diff {c['H_rel_diff']:.1e}/"
            f"{c['b_rel_diff']:.1e}; at paper-v1 the route needs "
            f"{format_size(r['paper_v1_size']['paper_route_bytes'])}")


def table_row(record):
    """The README's row for this suite."""
    r, p = record["results"], record["params"]
    c, big = r["check_same_posteriors"], r["paper_v1_size"]
    nb = r["numbaem"]
    return (f"`baseline` (the paper's per-shift M-step, eqs. 28-30, against numbaem's, on the same E-step: "
            f"L = {p['L']}, M = {p['M']}, K = {p['K']}, {p['patches']:,} patches of the `small` data)",
            f"M-step {fs(r['paper']['mstep'])} s against numbaem's {fs(nb['mstep'])} s (paper / numbaem "
            f"{_x(r['ratio_mstep'])}); counting on numbaem's side the data sums its E-step makes in place of the "
            f"paper's patch sums ({fs(nb['estep_data_sums'])} s), {_x(r['ratio_mstep_with_data_sums'])}; whole "
            f"iteration {_x(r['ratio_iteration'])}; the paper's per-stage precompute {fs(r['paper']['precompute'])} s; "
            f"the same "
            f"H and b to {max(c['H_rel_diff'], c['b_rel_diff']):.0e}; at paper-v1 the route would hold "
            f"{big['paper_route_bytes'] / 1e9:.0f} GB (A_kl^T A_kl, A_kl, posteriors) against a "
            f"{format_size(big['budget_bytes'])} budget")


def _x(ratio):
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"
