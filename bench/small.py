"""Suite ``small``: one user's iteration at L = 7, lmax = 4, K = 300, 20,000 patches, and its phases.

The data: two 700 x 700 micrographs simulated by ``numbaem simulate`` (Method 2, SNR 1,
density 0.15, well-separated; a synthetic molecule of side 41), cached on disk
(:mod:`bench._data`). The figure: ``numbaem reconstruct`` on those files, started
from a homolog, one stage ``lmax=4, K=300, frac=1`` for three iterations, seconds
per iteration and peak memory from its log (:mod:`bench._userrun`).

Besides, on the first iteration's patches and start, each phase (theory section 10)
timed on its own after the warm-up:

- ``build_A``               ``projection_matrices`` for the K grid rotations (once per stage)
- ``projections_spectra``   ``A_k theta`` and ``projection_spectra`` (once per iteration)
- ``estep``                 ``stream_stats``: E-step and data sums over all patches, in chunks
- ``normal_equations``      ``H`` and ``b`` (``numbaem.em.mstep.normal_equations``)
- ``solve``                 Cholesky (``numbaem.em.mstep.solve``)
- ``iteration``             the CLI's iterations (``seconds`` of its log)

and the E-step split into its kernels with each one's distance from the machine's peak.
"""
from numbaem.em.mstep import normal_equations, solve
from numbaem.model.projection import projection_matrices
from numbaem.runtime.memory import default_budget, format_size

from ._common import PeakMemory, fmt_seconds as fs, time_call
from ._data import DataSpec
from ._userrun import RunSpec, measure, plot_user

FULL = dict(data=DataSpec("small", L=7, micrograph_size=700, count=2), lmax=4, K=300, frac=1.0, iterations=3,
            profile_patches=20_000, count_patches=2000, reps=(5, 2))
QUICK = dict(data=DataSpec("small", L=7, micrograph_size=140, count=1), lmax=4, K=24, frac=1.0, iterations=2,
             profile_patches=400, count_patches=100, reps=(2, 1))


def data_spec(cfg):
    """The ``small`` data (shared with the suites that time at this size: sweep, peak, baseline)."""
    return (QUICK if cfg.quick else FULL)["data"]


def run(cfg):
    sz = QUICK if cfg.quick else FULL
    reps_cheap, reps_heavy = sz["reps"]
    run_spec = RunSpec(lmax=sz["lmax"], K=sz["K"], frac=sz["frac"], iterations=cfg.iterations or sz["iterations"],
                       budget=cfg.memory or default_budget(), seed=cfg.seed)

    def phases_of(st, idx, spectra):
        ph = {}
        ph["build_A"], A = time_call(lambda: projection_matrices(st.basis, st.rots), reps=reps_cheap)
        del A
        ph["projections_spectra"], _ = time_call(st.spectra, reps=reps_cheap)
        with PeakMemory() as pm:
            ph["estep"], stats = st.estep(reps=reps_heavy)
        ph["normal_equations"], (H, b) = time_call(
            lambda: normal_equations(st.operator.blocks(), stats.W, stats.G, st.L, st.M,
                                     max_block_bytes=st.plan.mstep_block_bytes), reps=reps_cheap)
        ph["solve"], sol = time_call(lambda: solve(H, b), reps=reps_cheap)
        return dict(phases=ph, peak_rss_estep=pm.peak, tikhonov=sol.tikhonov,
                    estep_per_patch_us=ph["estep"]["best"] / st.n_selected * 1e6,
                    estep_per_pair_ns=ph["estep"]["best"] / (st.n_selected * st.K) * 1e9)

    m = measure(cfg, sz["data"], run_spec, sz["profile_patches"], sz["count_patches"], extra=phases_of)
    ex = m.pop("extra")
    phases = ex.pop("phases")
    phases["iteration"] = m["cli"]["seconds"]
    per_iter = ("projections_spectra", "estep", "normal_equations", "solve")
    results = dict(cli=m["cli"], phases=phases, sum_of_phases_best=sum(phases[k]["best"] for k in per_iter),
                   iteration_best=m["cli"]["seconds"]["best"], iteration_estep=m["cli"]["estep"]["best"],
                   iteration_mstep=m["cli"]["mstep"]["best"], estep=m["estep"], **ex)
    memory = dict(m["memory"], peak_rss_estep=results.pop("peak_rss_estep"), peak_rss_iteration=m["peak_memory"])
    return dict(params=m["params"], data=m["data"], results=results, memory=memory, peak_memory=m["peak_memory"],
                notes=["iteration, estep and mstep: numbaem reconstruct's own log (seconds per iteration), after a "
                       "warm-up run of the same command; 'best' is the minimum over the iterations",
                       "phases: each timed on its own on the first iteration's patches and start; estep = "
                       "numbaem.em.estep.stream_stats over all patches (E-step and the data sums W, G)",
                       "estep.kernels: each E-step step's share and its time over this machine's peak bound for "
                       "it (bench/_kernels.py); estep.blocks: the (patch, rotation) blocks whose exponentials are "
                       "computed",
                       "data: micrographs made by numbaem simulate (results.data.commands), reused from the cache "
                       "when results.data.reused"])


def plot(record, path):
    plot_user(record, path, "small")


def summary(record):
    r = record["results"]
    k = r["estep"]["kernels"]
    dom = ""
    if k.get("available"):
        name = max(k["steps"], key=lambda n: k["steps"][n]["seconds"])
        dom = f", dominant {name} ({100 * k['steps'][name]['share']:.0f}%)"
    return (f"iteration {r['iteration_best']:.3g} s (E-step {r['iteration_estep']:.3g} s{dom}; M-step "
            f"{r['iteration_mstep']:.3g} s) at SNR {record['data']['snr_requested']:g}, peak memory "
            f"{format_size(record['memory']['peak_rss'])} vs budget {format_size(record['memory']['budget_bytes'])}")


def table_row(record):
    """The README's row for this suite."""
    r, p, m, d = record["results"], record["params"], record["memory"], record["data"]
    return (f"`small` (L = {p['L']}, lmax = {p['lmax']}, M = {p['M']}, K = {p['K']}, {p['patches']:,} patches; "
            f"simulated at SNR {d['snr_requested']:g}, Method {d['method']})",
            f"{fs(r['iteration_best'])} s per iteration (E-step {fs(r['iteration_estep'])} s, M-step "
            f"{fs(r['iteration_mstep'])} s) of `numbaem reconstruct`, peak memory {format_size(m['peak_rss'])} "
            f"against the {format_size(m['budget_bytes'])} budget")
