"""Suite ``small``: every phase of one iteration at L = 7, lmax = 4, K = 300, 20,000 patches.

Phases (MODEL section 10), each timed on its own after the warm-up:

- ``build_A``               ``projection_matrices`` for the K grid rotations (once per stage)
- ``projections_spectra``   ``A_k theta`` and ``projection_spectra`` (once per iteration)
- ``estep``                 ``stream_stats``: E-step and data sums over all patches, in chunks
- ``normal_equations``      ``H`` and ``b`` (``numbaem.em.mstep.normal_equations``)
- ``solve``                 Cholesky (``numbaem.em.mstep.solve``)
- ``iteration``             one whole ``em_iteration`` (the sum of the above but ``build_A``)

and the E-step split into its kernels (:mod:`bench._profile`).
"""
from numbaem.runtime.memory import default_budget
from numbaem.em.mstep import normal_equations, solve
from numbaem.model.projection import projection_matrices

from ._common import PeakMemory, synthetic_source, time_call
from ._iteration import IterationSetup
from ._profile import ordered_steps, profile_estep

FULL = dict(L=7, lmax=4, K=300, patches=20_000)
QUICK = dict(L=7, lmax=4, K=24, patches=400)


def setup(cfg, sizes, salt=1):
    rng = cfg.rng(salt)
    source, theta_true = synthetic_source(sizes["L"], sizes["lmax"], sizes["patches"], rng)
    theta = theta_true * (1.0 + 0.3 * rng.standard_normal(theta_true.shape))  # an estimate near the truth
    budget = cfg.memory or default_budget()
    return IterationSetup(source, sizes["lmax"], sizes["K"], theta, budget, seed=cfg.seed)


def run(cfg):
    sizes = QUICK if cfg.quick else FULL
    reps_cheap, reps_heavy = (2, 1) if cfg.quick else (5, 2)
    st = setup(cfg, sizes)
    warm = st.warm_up()
    L, M = st.L, st.M
    phases = {}

    phases["build_A"], A = time_call(lambda: projection_matrices(st.basis, st.rots), reps=reps_cheap)
    del A
    phases["projections_spectra"], spectra = time_call(st.spectra, reps=reps_cheap)
    idx = st.indices()
    with PeakMemory() as pm_e:
        phases["estep"], stats = st.estep(reps=reps_heavy)
    phases["normal_equations"], (H, b) = time_call(
        lambda: normal_equations(st.operator.blocks(), stats.W, stats.G, L, M), reps=reps_cheap)
    phases["solve"], sol = time_call(lambda: solve(H, b), reps=reps_cheap)
    it = st.iteration(reps=reps_heavy)
    phases["iteration"] = it["seconds"]

    profile = profile_estep(st.source, idx, spectra, st.upsilon, st.sigma2, st.n_chunk, reference=stats)
    pairs = st.n_selected * st.K
    per_iter = ("projections_spectra", "estep", "normal_equations", "solve")
    sum_phases = sum(phases[k]["best"] for k in per_iter)
    results = dict(
        phases=phases,
        sum_of_phases_best=sum_phases,
        iteration_best=it["seconds"]["best"],
        iteration_estep=it["seconds_estep"],
        iteration_mstep=it["seconds_mstep"],
        estep_per_patch_us=phases["estep"]["best"] / st.n_selected * 1e6,
        estep_per_pair_ns=phases["estep"]["best"] / pairs * 1e9,
        estep_profile=profile,
        tikhonov=sol.tikhonov,
        warmup_seconds=warm,
    )
    memory = dict(peak_rss_estep=pm_e.peak, peak_rss_iteration=it["peak_memory"], rss_before_iteration=it["rss_start"],
                  budget_bytes=st.budget)
    return dict(params=st.params, results=results, memory=memory, peak_memory=it["peak_memory"],
                notes=["times in seconds; 'best' is the minimum over 'reps' runs after the warm-up",
                       "estep = numbaem.em.run.stream_stats over all patches (E-step and the data sums W, G)",
                       "estep_profile splits the same work into its kernels (bench/_profile.py); "
                       "its 'check' compares its statistics with stream_stats'",
                       "data: Gaussian noise (sigma2 = 1) plus projections of a random volume at SNR 1; "
                       "the posterior kernel skips exponentials 50 below the best state, so its time "
                       "depends on the data's score spread"])


def plot(record, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = record["results"]
    fig = Figure(figsize=(11, 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    names = ["build_A", "projections_spectra", "estep", "normal_equations", "solve", "iteration"]
    vals = [res["phases"][n]["best"] for n in names]
    ax1.barh(names[::-1], vals[::-1], color=["C3"] + ["C0"] * 5)
    for y, v in enumerate(vals[::-1]):
        ax1.text(v, y, f" {v:.3g} s", va="center", fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds (best of reps)")
    p = record["params"]
    ax1.set_title(f"small: L={p['L']}, lmax={p['lmax']} (M={p['M']}), K={p['K']}, {p['patches']} patches, "
                  f"{record['threads']['numba']} threads", fontsize=9)
    prof = res["estep_profile"]
    if prof.get("available"):
        keys = ordered_steps(prof["seconds"])
        v = [prof["seconds"][k] for k in keys]
        ax2.barh(keys[::-1], v[::-1], color="C1")
        for y, (k, s) in enumerate(zip(keys[::-1], v[::-1])):
            ax2.text(s, y, f" {s:.2f} s ({100 * prof['fraction'][k]:.0f}%)", va="center", fontsize=8)
        ax2.set_xlabel("seconds in the E-step")
        ax2.set_title(f"E-step kernels (total {prof['total']:.2f} s, chunk {p['chunk']})", fontsize=9)
        ax2.set_xlim(0, max(v) * 1.45)
    else:
        ax2.text(0.5, 0.5, "E-step profile unavailable:\n" + prof.get("reason", ""), ha="center", va="center")
        ax2.set_axis_off()
    fig.savefig(path, dpi=110)


def summary(record):
    r = record["results"]
    prof = r["estep_profile"]
    dom = f", dominant kernel {prof['dominant']} ({100 * prof['fraction'][prof['dominant']]:.0f}%)" \
        if prof.get("available") else ""
    return (f"iteration {r['iteration_best']:.3g} s (E-step {r['phases']['estep']['best']:.3g} s{dom}; "
            f"build A {r['phases']['build_A']['best']:.3g} s), peak memory {record['peak_memory'] / 2**30:.2f} GiB")
