"""Suite ``peak``: the machine's own peak for the dominant kernel, and how close the E-step gets.

- Batched small real FFTs of the E-step shape (``2L x 2L``, backward c2r and forward r2c)
  through pyFFTW with all threads, in transforms per second, for several batch sizes
  (including the E-step's own chunk workspace) and planner efforts (``FFTW_ESTIMATE``,
  the library default, and ``FFTW_MEASURE``), with 1 and with all threads. The peak is
  the best rate seen in any of them (``*_all_threads``: the best with all threads; on a
  shared machine one thread can beat two).
- The E-step of the ``small`` size, timed in the same run: it needs ``2 n K`` transforms
  (one c2r and one r2c per patch and rotation). ``fraction_of_fft_peak`` is the time
  those transforms take at the peak rates over the E-step's time; ``fft_efficiency``
  the same over the time the E-step spends in its FFT calls.
- float64 GEMM GFLOP/s with numpy (square, and the two shapes a GEMM route for the
  correlations would use), and whether that route would beat the FFTs: correlating one
  (patch, rotation) pair over all ``(2L-1)^2`` shifts as a GEMM costs
  ``2 (2L-1)^2 L^2`` flops, and the data sums another GEMM of the same size.
"""
import math

import numpy as np

from numbaem.data.patches import PatchSource
from numbaem.runtime import fft
from numbaem.runtime.memory import default_budget

from . import small
from ._common import time_call
from ._data import prepare
from ._iteration import IterationSetup
from ._kernels import _best_rate, fft_rates
from ._profile import profile_estep
from ._userrun import start_theta

FULL = dict(L=7, lmax=4, K=300, fft_L=(7, 11), batches=(1024, 16384, 131072),
            measure_max_batch=131072, gemm_n=2048, gemm_rows={7: 256, 11: 64}, K_of={7: 300, 11: 560})
QUICK = dict(L=7, lmax=4, K=24, fft_L=(7,), batches=(256, 2048), measure_max_batch=2048,
             gemm_n=384, gemm_rows={7: 32, 11: 16}, K_of={7: 24, 11: 24})


def _rate(fn, batch, min_time=0.3, max_reps=200):
    """Transforms per second of ``fn`` (one batched execute), best of repetitions lasting ~``min_time``."""
    return _best_rate(fn, batch, min_time, max_reps)


def gemm_rate(m, k, n, rng, reps=3):
    """GFLOP/s of a float64 ``(m x k) @ (k x n)`` product (best of ``reps``)."""
    a = rng.standard_normal((m, k))
    b = rng.standard_normal((k, n))
    a @ b
    t, _ = time_call(lambda: a @ b, reps=reps)
    return dict(m=m, k=k, n=n, seconds=t["best"], gflops=2.0 * m * k * n / t["best"] / 1e9)


def run(cfg):
    sz = QUICK if cfg.quick else FULL
    T = cfg.threads
    rng = cfg.rng(5)

    # the E-step at the small size, on the small suite's simulated data and start (also gives the
    # E-step's own FFT workspace)
    ds = prepare(small.data_spec(cfg), cfg.data_dir or f"{cfg.out}/data", threads=cfg.threads,
                 resimulate=cfg.resimulate)
    src = PatchSource.from_files([str(p) for p in ds.micrographs], ds.spec.L)
    st = IterationSetup(src, sz["lmax"], sz["K"], start_theta(ds, sz["lmax"]), cfg.memory or default_budget(),
                        seed=cfg.seed, sigma2=ds.sigma2)
    st.warm_up()
    # the FFT route: this suite sets the E-step against FFTW's peak (the direct route, which L <= 13
    # takes, is set against the FMA peak by python -m bench.search kernels)
    t_e, stats = st.estep(reps=1 if cfg.quick else 2, route="fft")
    prof = profile_estep(st.source, st.indices(), st.spectra("fft"), st.upsilon, st.sigma2, st.n_chunk,
                         reference=stats)
    ws = fft.workspace((st.n_chunk, st.K, 2 * st.L, 2 * st.L))
    L0 = st.L
    estep_ws = dict(n=2 * L0, batch=st.n_chunk * st.K, threads=ws.threads, effort=fft.planner_effort(),
                    r2c_per_s=_rate(ws.forward, st.n_chunk * st.K, max_reps=5),
                    c2r_per_s=_rate(getattr(ws, "_bwd", None).execute if hasattr(ws, "_bwd") else ws.backward,
                                    st.n_chunk * st.K, max_reps=5),
                    bytes=ws.nbytes, note="the E-step's own cached workspace and plans (chunk x K transforms)")

    # FFT rates by size, batch, effort and threads
    rows = []
    for L in sz["fft_L"]:
        for batch in sz["batches"]:
            for effort in ("FFTW_ESTIMATE", "FFTW_MEASURE"):
                if effort == "FFTW_MEASURE" and batch > sz["measure_max_batch"]:
                    continue
                for threads in sorted({1, T}):
                    rows.append(fft_rates(2 * L, batch, threads, effort))
    rows.append(estep_ws)
    peaks = {}
    for L in sz["fft_L"]:
        entry = {}
        for tag, cand in (("", [r for r in rows if r["n"] == 2 * L]),
                          ("_all_threads", [r for r in rows if r["n"] == 2 * L and r["threads"] == T])):
            for kind in ("r2c", "c2r"):
                best = max(cand, key=lambda r: r[kind + "_per_s"])
                entry[f"{kind}_per_s{tag}"] = best[kind + "_per_s"]
                entry[f"{kind}_at{tag}"] = dict(batch=best["batch"], effort=best["effort"], threads=best["threads"])
        peaks[str(L)] = entry

    pk = peaks[str(L0)]
    pairs = st.n_selected * st.K
    t_fft_at_peak = pairs / pk["c2r_per_s"] + pairs / pk["r2c_per_s"]
    estep = dict(seconds=t_e["best"], patches=st.n_selected, K=st.K, chunk=st.n_chunk, transforms=2 * pairs,
                 transforms_per_s=2 * pairs / t_e["best"], fft_seconds_at_peak=t_fft_at_peak,
                 fraction_of_fft_peak=t_fft_at_peak / t_e["best"],
                 fraction_of_fft_peak_all_threads=(pairs / pk["c2r_per_s_all_threads"]
                                                   + pairs / pk["r2c_per_s_all_threads"]) / t_e["best"],
                 profile=prof)
    if prof.get("available") and prof["fft_seconds"] > 0:
        estep["fft_seconds_in_estep"] = prof["fft_seconds"]
        estep["fft_efficiency"] = t_fft_at_peak / prof["fft_seconds"]
        estep["fft_share_of_estep"] = prof["fft_seconds"] / prof["total"]

    # GEMM: square, and the GEMM route for the correlations and the data sums
    sq = gemm_rate(sz["gemm_n"], sz["gemm_n"], sz["gemm_n"], rng)
    route = {}
    for L in sz["fft_L"]:
        K, S, P = sz["K_of"][L], (2 * L - 1) ** 2, L * L
        c = sz["gemm_rows"][L]
        corr = gemm_rate(c, P, K * S, rng)          # scores: patches x (rotation, shift)
        sums = gemm_rate(K * S, c, P, rng)          # data sums: (rotation, shift) x pixels
        flops_pair = 2 * S * P
        gemm_pair_s = flops_pair / (corr["gflops"] * 1e9) + flops_pair / (sums["gflops"] * 1e9)
        pkL = peaks[str(L)]
        fft_pair_peak_s = 1.0 / pkL["c2r_per_s"] + 1.0 / pkL["r2c_per_s"]
        entry = dict(K=K, shifts=S, flops_per_pair_per_gemm=flops_pair, gemm_correlation=corr, gemm_data_sums=sums,
                     gemm_route_seconds_per_pair=gemm_pair_s, fft_route_seconds_per_pair_at_peak=fft_pair_peak_s,
                     fft_flops_per_transform_approx=2.5 * (2 * L) ** 2 * math.log2((2 * L) ** 2),
                     gemm_over_fft_at_peak=gemm_pair_s / fft_pair_peak_s)
        if L == L0 and prof.get("available"):
            fft_pair_estep = prof["fft_seconds"] / pairs
            entry["fft_route_seconds_per_pair_in_estep"] = fft_pair_estep
            entry["gemm_over_fft_in_estep"] = gemm_pair_s / fft_pair_estep
            entry["gemm_route_estep_fft_part_seconds"] = gemm_pair_s * pairs
        entry["gemm_faster"] = bool(gemm_pair_s < entry.get("fft_route_seconds_per_pair_in_estep", fft_pair_peak_s))
        route[str(L)] = entry

    return dict(params=dict(st.params, fft_sizes=[2 * L for L in sz["fft_L"]], batches=list(sz["batches"])),
                data=ds.record(),
                results=dict(fft=rows, fft_peak=peaks, estep=estep, gemm_square=sq, gemm_route=route),
                peak_memory=None,
                notes=["rates in transforms per second, best of repeated executes after planning and one warm execute",
                       "fraction_of_fft_peak = (n K / c2r_peak + n K / r2c_peak) / E-step seconds",
                       "fft_efficiency = the same peak time / the seconds the E-step spends in its two FFT calls",
                       "gemm_route: time per (patch, rotation) pair if the correlations and the data sums were "
                       "two GEMMs at the measured GFLOP/s of those shapes, against the FFT route"])


def plot(record, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = record["results"]
    T = record["threads"]["numba"]
    fig = Figure(figsize=(12, 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for n in sorted({row["n"] for row in r["fft"]}):
        for effort, ls in (("FFTW_ESTIMATE", "-"), ("FFTW_MEASURE", "--")):
            for kind, mk in (("c2r", "o"), ("r2c", "s")):
                pts = sorted((row["batch"], row[kind + "_per_s"]) for row in r["fft"]
                             if row["n"] == n and row["effort"] == effort and row["threads"] == T)
                if pts:
                    ax1.plot(*zip(*pts), ls=ls, marker=mk, label=f"{n}x{n} {kind} {effort[5:].lower()}")
    e = r["estep"]
    pk = r["fft_peak"][str(record["params"]["L"])]
    ax1.axhline(pk["c2r_per_s"], color="C0", lw=0.8, ls=":",
                label=f"peak c2r ({pk['c2r_at']['threads']} thr, batch {pk['c2r_at']['batch']})")
    ax1.axhline(pk["r2c_per_s"], color="C1", lw=0.8, ls=":",
                label=f"peak r2c ({pk['r2c_at']['threads']} thr, batch {pk['r2c_at']['batch']})")
    ax1.axhline(e["transforms_per_s"], color="k", lw=1, label=f"E-step achieved ({100 * e['fraction_of_fft_peak']:.0f}% of peak)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("transforms per batch")
    ax1.set_ylabel(f"transforms / s ({T} threads)")
    ax1.legend(fontsize=6.5)
    ax1.set_title("batched real FFTs (pyFFTW)", fontsize=9)
    labels, gemm, fft_peak, fft_in = [], [], [], []
    for L, g in r["gemm_route"].items():
        labels.append(f"L={L}")
        gemm.append(g["gemm_route_seconds_per_pair"] * 1e9)
        fft_peak.append(g["fft_route_seconds_per_pair_at_peak"] * 1e9)
        fft_in.append(g.get("fft_route_seconds_per_pair_in_estep", np.nan) * 1e9)
    x = np.arange(len(labels))
    ax2.bar(x - 0.27, fft_peak, 0.27, label="FFT route at the FFT peak")
    ax2.bar(x, fft_in, 0.27, label="FFT route inside the E-step")
    ax2.bar(x + 0.27, gemm, 0.27, label="GEMM route (2 GEMMs, measured shapes)")
    ax2.set_xticks(x, labels)
    ax2.set_ylabel("ns per (patch, rotation) pair")
    ax2.set_title(f"correlations + data sums; square GEMM {r['gemm_square']['gflops']:.1f} GFLOP/s", fontsize=9)
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def summary(record):
    r = record["results"]
    e = r["estep"]
    pk = r["fft_peak"][str(record["params"]["L"])]
    g = r["gemm_route"][str(record["params"]["L"])]
    return (f"FFT peak c2r {pk['c2r_per_s'] / 1e6:.2f}M/s, r2c {pk['r2c_per_s'] / 1e6:.2f}M/s; E-step "
            f"{e['transforms_per_s'] / 1e6:.2f}M transforms/s = {100 * e['fraction_of_fft_peak']:.0f}% of peak; "
            f"GEMM {r['gemm_square']['gflops']:.1f} GFLOP/s, GEMM route {g['gemm_over_fft_at_peak']:.2f}x the FFT "
            f"route's time at peak")


def table_row(record):
    """The README's row for this suite."""
    r, p = record["results"], record["params"]
    e = r["estep"]
    pk = r["fft_peak"][str(p["L"])]
    g = r["gemm_route"][str(p["L"])]
    n2 = 2 * p["L"]
    return (f"`peak` (batched {n2} x {n2} real FFTs, GEMM; E-step of the `small` size)",
            f"FFTW peak for {n2} x {n2} real transforms {pk['c2r_per_s'] / 1e6:.2g} M/s (c2r), "
            f"{pk['r2c_per_s'] / 1e6:.2g} M/s (r2c); the E-step runs {e['transforms_per_s'] / 1e6:.2g} M/s, "
            f"{100 * e['fraction_of_fft_peak']:.0f}% of it; a GEMM route for the correlations would take "
            f"{g['gemm_over_fft_at_peak']:.1f}x the FFT route's time at peak")
