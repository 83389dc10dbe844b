"""Suite ``paper-v1``: one iteration at the size of the paper's first volume stage.

The paper (section 4) runs L = 11 patches, K = 560 rotations at ``lmax = 10``
(M = 219 coefficients here) with a stochastic factor of 0.05 over four 6,000 x 6,000
micrographs, about 60,000 patches per iteration, and reports 6 to 12 hours per
iteration across its stages on 96 cores. Here: four in-memory float32 micrographs of 1,650 x 2,200 pixels (30,000 patches
each) and a stochastic factor of 0.5, so exactly 60,000 patches are drawn per iteration
through the same sampling path; memory budget 4 GiB unless ``--memory`` says otherwise.
Recorded: the iteration time (E-step and M-step), each phase, the E-step kernels on a
few chunks, and the peak resident memory against the budget.
"""
import numpy as np

from numbaem.em.run import stream_stats
from numbaem.em.estep import chunk_bytes
from numbaem.runtime.memory import format_size
from numbaem.em.mstep import normal_equations, solve
from numbaem.model.projection import projection_matrices

from ._common import synthetic_source, time_call
from ._iteration import IterationSetup
from ._profile import profile_estep

FULL = dict(L=11, lmax=10, K=560, micrographs=4, patches_per_micrograph=30_000, frac=0.5, budget=4 << 30,
            profile_chunks=3)
QUICK = dict(L=11, lmax=10, K=20, micrographs=4, patches_per_micrograph=200, frac=0.5, budget=4 << 30,
             profile_chunks=1)


def run(cfg):
    sz = QUICK if cfg.quick else FULL
    rng = cfg.rng(3)
    source, theta_true = synthetic_source(sz["L"], sz["lmax"], sz["micrographs"] * sz["patches_per_micrograph"],
                                          rng, n_micrographs=sz["micrographs"], dtype=np.float32)
    theta = theta_true * (1.0 + 0.3 * rng.standard_normal(theta_true.shape))
    budget = cfg.memory or sz["budget"]
    st = IterationSetup(source, sz["lmax"], sz["K"], theta, budget, frac=sz["frac"], seed=cfg.seed)
    warm = st.warm_up()
    L, M, K = st.L, st.M, st.K
    phases = {}
    phases["build_A"], _ = time_call(lambda: projection_matrices(st.basis, st.rots), reps=2)
    phases["projections_spectra"], spectra = time_call(st.spectra, reps=3)
    it = st.iteration(reps=1)
    phases["iteration"] = it["seconds"]
    idx = st.indices()
    sub = idx[:sz["profile_chunks"] * st.n_chunk]
    profile = profile_estep(st.source, sub, spectra, st.upsilon, st.sigma2, st.n_chunk)
    stats = stream_stats(st.source, sub[:st.n_chunk], spectra, st.upsilon, st.sigma2, st.n_chunk)
    phases["normal_equations"], (H, b) = time_call(
        lambda: normal_equations(st.operator.blocks(), stats.W, stats.G, L, M), reps=2)
    phases["solve"], _ = time_call(lambda: solve(H + 1e-9 * np.trace(H) / M * np.eye(M), b), reps=3)
    data_bytes = sum(img.nbytes for img in source.images)
    peak = it["peak_memory"]
    pairs = st.n_selected * K
    results = dict(
        iteration_seconds=it["seconds"]["best"], estep_seconds=it["seconds_estep"], mstep_seconds=it["seconds_mstep"],
        phases=phases, estep_profile=profile, estep_profile_patches=len(sub),
        estep_per_pair_ns=it["seconds_estep"] / pairs * 1e9, warmup_seconds=warm,
        paper_reported="roughly 6 to 12 hours per iteration across its three stages on 96 cores of a Xeon Gold "
                       "6252 (paper, section 4; which stage took which was lost from the text copy)",
    )
    memory = dict(budget_bytes=budget, peak_rss=peak, peak_over_budget=peak / budget,
                  rss_before_iteration=it["rss_start"], micrograph_bytes_in_memory=data_bytes,
                  peak_rss_without_micrographs=peak - data_bytes, peak_without_micrographs_over_budget=(peak - data_bytes) / budget,
                  planned_chunk_bytes=chunk_bytes(st.n_chunk, K, L), operator_bytes=st.operator.nbytes,
                  within_budget=bool(peak - data_bytes <= budget))
    return dict(params=dict(st.params, micrographs=sz["micrographs"],
                            micrograph_shape=list(source.images[0].shape)),
                results=results, memory=memory, peak_memory=peak,
                notes=["the micrographs live in memory here (float32); numbaem reads real ones memory-mapped, so "
                       "peak_rss_without_micrographs is the figure to hold against the budget",
                       "normal_equations/solve timed again on one chunk's statistics (their cost does not depend "
                       "on the patch count); estep_profile covers the first profile_patches of the minibatch"])


def plot(record, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r, m, p = record["results"], record["memory"], record["params"]
    fig = Figure(figsize=(11, 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.6, 1]))
    names = ["build_A", "projections_spectra", "normal_equations", "solve"]
    vals = [r["phases"][n]["best"] for n in names]
    names += ["E-step (in iteration)", "iteration"]
    vals += [r["estep_seconds"], r["iteration_seconds"]]
    ax1.barh(names[::-1], vals[::-1], color="C0")
    for y, v in enumerate(vals[::-1]):
        ax1.text(v, y, f" {v:.3g} s", va="center", fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds")
    ax1.set_title(f"paper-v1: L={p['L']}, lmax={p['lmax']} (M={p['M']}), K={p['K']}, {p['patches']} patches, "
                  f"chunk {p['chunk']}, {record['threads']['numba']} threads", fontsize=9)
    gb = 1024 ** 3
    bars = [m["budget_bytes"] / gb, m["peak_rss"] / gb, m["peak_rss_without_micrographs"] / gb]
    ax2.bar(["budget", "peak RSS", "peak RSS\n- micrographs"], bars, color=["C7", "C3", "C1"])
    for x, v in enumerate(bars):
        ax2.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    ax2.set_ylabel("GiB")
    ax2.set_title(f"memory: peak {format_size(m['peak_rss'])} vs budget {format_size(m['budget_bytes'])}", fontsize=9)
    fig.savefig(path, dpi=110)


def summary(record):
    r, m = record["results"], record["memory"]
    return (f"iteration {r['iteration_seconds']:.3g} s (E-step {r['estep_seconds']:.3g} s, M-step "
            f"{r['mstep_seconds']:.3g} s), peak memory {format_size(m['peak_rss'])} "
            f"({format_size(m['peak_rss_without_micrographs'])} without the micrographs) vs budget "
            f"{format_size(m['budget_bytes'])}")
