"""Suite ``sweep``: how the iteration time scales (theory section 10).

- patches: 2,500 / 5,000 / 10,000 at L = 7, lmax = 4, K = 300: time per iteration should
  be linear in the patch count (fitted slope, intercept, R^2, and the spread of the time
  per patch);
- rotations: K = 100 / 200 / 400 at 5,000 patches: linear in K;
- threads: 1 against all threads (``numbaem.runtime.threads.use_threads``) at 5,000 patches and
  K = 300, for the whole iteration and for each E-step kernel (speed-up and parallel
  efficiency);
- chunk size: the E-step at 5,000 patches with chunks of 64, 256, 1,024 patches and the
  size ``plan_chunk`` picks from the budget (a cache effect would show here).

Every point draws its patches (a seeded minibatch) from the ``small`` suite's
micrographs, simulated by ``numbaem simulate`` at SNR 1 (:mod:`bench._data`), and
starts from the same homolog.
"""
import numba
import numpy as np

from numbaem.data.patches import PatchSource
from numbaem.runtime.memory import default_budget
from numbaem.runtime.threads import use_threads

from . import small
from ._common import PeakMemory, linear_fit
from ._data import prepare
from ._iteration import IterationSetup
from ._profile import profile_estep
from ._userrun import start_theta

FULL = dict(L=7, lmax=4, K=300, patches=[2500, 5000, 10000], K_list=[100, 200, 400], K_patches=5000,
            thread_patches=5000, chunks=[64, 256, 1024, None], reps=2)
QUICK = dict(L=7, lmax=4, K=24, patches=[100, 200, 400], K_list=[8, 16, 32], K_patches=200,
             thread_patches=200, chunks=[16, 64, None], reps=1)


def _data(cfg):
    """The ``small`` suite's simulated micrographs (cached) and its start at ``lmax``."""
    ds = prepare(small.data_spec(cfg), cfg.data_dir or f"{cfg.out}/data", threads=cfg.threads,
                 resimulate=cfg.resimulate)
    return ds, PatchSource.from_files([str(p) for p in ds.micrographs], ds.spec.L)


def _setup(cfg, sz, data, n, K, salt, n_chunk=None):
    """An iteration on ``n`` of the data's patches (a seeded minibatch, ``frac = n / Nd``)."""
    ds, source = data
    if n > source.n_patches:
        raise ValueError(f"{n} patches asked of data holding {source.n_patches}")
    return IterationSetup(source, sz["lmax"], K, start_theta(ds, sz["lmax"]), cfg.memory or default_budget(),
                          frac=n / source.n_patches, n_chunk=n_chunk, seed=cfg.seed + salt, sigma2=ds.sigma2)


def _point(st, reps):
    st.warm_up()
    it = st.iteration(reps=reps)
    return dict(patches=st.n_selected, K=st.K, chunk=st.n_chunk, iteration=it["seconds"]["best"],
                iteration_median=it["seconds"]["median"], estep=it["seconds_estep"], mstep=it["seconds_mstep"],
                peak_memory=it["peak_memory"])


def run(cfg):
    sz = QUICK if cfg.quick else FULL
    reps = sz["reps"]
    res = {}
    data = _data(cfg)

    pts = [_point(_setup(cfg, sz, data, n, sz["K"], 10 + i), reps) for i, n in enumerate(sz["patches"])]
    res["patches"] = dict(points=pts, fit_iteration=linear_fit([p["patches"] for p in pts], [p["iteration"] for p in pts]),
                          fit_estep=linear_fit([p["patches"] for p in pts], [p["estep"] for p in pts]))

    pts = [_point(_setup(cfg, sz, data, sz["K_patches"], K, 20 + i), reps) for i, K in enumerate(sz["K_list"])]
    res["rotations"] = dict(points=pts, fit_iteration=linear_fit([p["K"] for p in pts], [p["iteration"] for p in pts]),
                            fit_estep=linear_fit([p["K"] for p in pts], [p["estep"] for p in pts]))

    n_all = numba.config.NUMBA_NUM_THREADS
    st = _setup(cfg, sz, data, sz["thread_patches"], sz["K"], 30)
    thr = {}
    for T in sorted({1, n_all}):
        with use_threads(T):
            p = _point(st, reps)
            p["estep_profile"] = profile_estep(st.source, st.indices(), st.spectra(), st.upsilon, st.sigma2,
                                               st.n_chunk)
        thr[str(T)] = p
    one, full = thr["1"], thr[str(n_all)]
    speedup = dict(iteration=one["iteration"] / full["iteration"], estep=one["estep"] / full["estep"],
                   mstep=one["mstep"] / full["mstep"])
    if one["estep_profile"].get("available") and full["estep_profile"].get("available"):
        s1, sN = one["estep_profile"]["seconds"], full["estep_profile"]["seconds"]
        speedup["kernels"] = {k: s1[k] / sN[k] for k in s1 if k in sN and sN[k] > 0}
    res["threads"] = dict(points=thr, all_threads=n_all, speedup=speedup,
                          efficiency=speedup["iteration"] / n_all)

    chunk_pts = []
    for c in sz["chunks"]:
        stc = _setup(cfg, sz, data, sz["thread_patches"], sz["K"], 30, n_chunk=c)
        stc.warm_up()
        with PeakMemory() as pm:
            t, _ = stc.estep(reps=reps)
        chunk_pts.append(dict(chunk=stc.n_chunk, planned=c is None, estep=t["best"], peak_memory=pm.peak))
    res["chunks"] = dict(points=chunk_pts, patches=sz["thread_patches"], K=sz["K"])
    return dict(params=dict(L=sz["L"], lmax=sz["lmax"], K=sz["K"], patches=sz["patches"], K_list=sz["K_list"],
                            K_patches=sz["K_patches"], thread_patches=sz["thread_patches"], chunks=sz["chunks"],
                            reps=reps),
                data=data[0].record(), results=res, peak_memory=max(p["peak_memory"] for p in res["patches"]["points"]),
                notes=["each point: a seeded minibatch of the small suite's simulated micrographs (frac = patches / Nd), "
                       "warm-up, best of 'reps' whole em_iteration calls",
                       "fit: least-squares line; per_unit = time / size (constant for cost proportional to size)",
                       "speed-up = time with 1 thread / time with all threads (numba and FFTW together)"])


def plot(record, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = record["results"]
    fig = Figure(figsize=(14, 4), constrained_layout=True)
    FigureCanvasAgg(fig)
    axs = fig.subplots(1, 4)
    for ax, key, xl in ((axs[0], "patches", "patches"), (axs[1], "rotations", "K (rotations)")):
        pts = r[key]["points"]
        xk = "patches" if key == "patches" else "K"
        x = np.array([p[xk] for p in pts], float)
        for yk, c in (("iteration", "C0"), ("estep", "C1")):
            y = np.array([p[yk] for p in pts])
            f = r[key]["fit_" + yk]
            ax.plot(x, y, "o", color=c, label=f"{yk}: R^2 {f['r2']:.4f}")
            xx = np.linspace(0, x.max() * 1.05, 20)
            ax.plot(xx, f["slope"] * xx + f["intercept"], "-", color=c, lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel("seconds")
        ax.legend(fontsize=8)
        ax.set_title(f"time vs {xl}", fontsize=9)
    th = r["threads"]
    sp = th["speedup"]
    names = ["iteration", "estep", "mstep"] + sorted(sp.get("kernels", {}))
    vals = [sp[n] for n in names[:3]] + [sp["kernels"][n] for n in names[3:]]
    axs[2].barh(names[::-1], vals[::-1], color="C2")
    axs[2].axvline(th["all_threads"], color="k", lw=0.8, ls="--")
    axs[2].set_xlabel(f"speed-up, 1 -> {th['all_threads']} threads")
    axs[2].set_title("thread scaling", fontsize=9)
    ch = r["chunks"]["points"]
    axs[3].plot([p["chunk"] for p in ch], [p["estep"] for p in ch], "o-")
    axs[3].set_xscale("log")
    axs[3].minorticks_off()
    axs[3].set_xticks([p["chunk"] for p in ch], [str(p["chunk"]) for p in ch])
    axs[3].set_xlabel("patches per chunk")
    axs[3].set_ylabel("E-step seconds")
    axs[3].set_title(f"chunk size ({r['chunks']['patches']} patches, K={r['chunks']['K']})", fontsize=9)
    fig.savefig(path, dpi=110)


def summary(record):
    r = record["results"]
    fp, fk = r["patches"]["fit_iteration"], r["rotations"]["fit_iteration"]
    return (f"{1e6 * fp['slope']:.0f} us/patch (R^2 {fp['r2']:.4f}), {1e3 * fk['slope']:.1f} ms/rotation "
            f"(R^2 {fk['r2']:.4f}); 1 -> {r['threads']['all_threads']} threads: "
            f"{r['threads']['speedup']['iteration']:.2f}x")


def table_row(record):
    """The README's row for this suite."""
    r, p = record["results"], record["params"]
    fp, fk = r["patches"]["fit_iteration"], r["rotations"]["fit_iteration"]
    th = r["threads"]
    return (f"`sweep` (L = {p['L']}, lmax = {p['lmax']}, patches of the `small` data)",
            f"time linear in patches ({1e6 * fp['slope']:.0f} us per patch, R^2 {fp['r2']:.3f}) and in K "
            f"({1e3 * fk['slope']:.2g} ms per rotation, R^2 {fk['r2']:.4f}); 1 -> {th['all_threads']} threads "
            f"{th['speedup']['iteration']:.2f}x")
