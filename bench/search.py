"""Benchmarks of the rotation search (issue 11): accuracy against time, the search's own figures, the kernels.

Standalone (it needs nothing of the rest of ``bench/``)::

    python -m bench.search offgrid  [--quick] [--out DIR] [--threads T] [--iters N]
    python -m bench.search kernels  [--quick] ...
    python -m bench.search paper    [--quick] [--data-dir DIR] ...
    python -m bench.search default  [--quick] [--data-dir DIR] ...
    python -m bench.search decisions [--quick] ...

Each experiment writes ``search-<experiment>-<UTC time>.json`` and ``.png`` into ``--out``
(default ``bench/results``) and records the machine, the load average before and after
each timed run, and the versions. ``paper`` and ``default`` run ``numbaem reconstruct``
twice per schedule: a warm-up on 0.2% of the patches with one iteration per stage (numba's
kernels compiled, as on a user's second run), then the timed run; ``--variants`` picks
their built-in runs by name.

``offgrid``
    The off-grid floor (theory section 9): L = 7, lmax = 4, a random Fourier-Bessel volume
    whose coefficients fall like ``exp(-0.3 l)`` (as ``tests/test_em.py``'s recovery
    test), four 280 x 280 micrographs with 160 well-separated projections each at
    Haar-random rotations (Method 2), SNR 100, from the truth plus 25% random error (the
    floor is where the EM settles; a start this close reaches it in a few iterations).
    The same data and start run through several schedules -- exhaustive searches at
    several K and coarse-to-fine / local searches -- and each iteration's aligned relative
    error, seconds (E-step, M-step) and search figures (pairs per level, fraction of
    pairs reaching the fine level, mass pruned, seconds per pass) are recorded; the exhaustive
    K = 1000 and the search (60 -> 3.75 degrees, local 20, margin 1, prune 0.01) also with the posterior
    annealed from T = 30 over the search's iterations (theory section 12.12). The PNG:
    error per iteration, and final error against seconds per iteration (the
    accuracy-versus-time curve).
``kernels``
    The direct route's kernels at L = 7 and 11 (float32, float64) against the FFT
    route in the same process (CPU seconds of one thread, best of interleaved
    repetitions), with each kernel's share and its rate against this machine's own
    peaks measured here: an in-cache float32 multiply-add loop, the exp loop alone, and
    a memory copy.
``paper``
    paper-v1: ``numbaem simulate`` at SNR 1 (Method 2, density 0.15, four 5995 x 5995
    micrographs at L = 11 from a synthetic molecule of side 41; cached in ``--data-dir``)
    run through ``numbaem reconstruct`` (a homolog start, ``lmax=10, frac=0.05``: 59,405
    patches per iteration, ``--memory 4GiB``) with the exhaustive K = 560 on the FFT route
    (today's code path), on the direct route, and the schedules given; seconds per
    iteration and aligned relative error after each iteration from its log. With ``--seeds
    0,1,2`` every variant runs at each minibatch seed and the JSON's ``paired`` holds, per
    variant and iteration, the mean error and the mean difference to the first variant on
    the same seeds with its standard error.
``decisions``
    The search's refinement decisions at SNR 100 (theory section 12.10): the 400 patches of
    the off-grid data holding most signal, one E-step and M-step from the true
    coefficients, exhaustive on Hopf level 2 against searches 60 -> 15 degrees (prune 0 and
    no cap; nearly none; the defaults): the relative difference of ``H`` and ``b`` and the
    M-step's error against the truth.
``default``
    The README's default schedule: four 700 x 700 micrographs at L = 7 (``numbaem
    simulate``, SNR 5, density 0.12, Method 2, a synthetic molecule of side 21) through
    ``numbaem reconstruct`` with the earlier default schedule (K = 100, 300, 1000:
    ``old-default``, what :func:`numbaem.em.schedule.default_schedule` gives with
    ``search=False``) and today's (``new-default``: a search in the last stage); total
    seconds and the final aligned relative error and FSC.
"""
import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

OLD_DEFAULT = "lmax=2,iters=4,rotations=100;lmax=3,iters=4,rotations=300;lmax=5,iters=6,rotations=1000"


# --------------------------------------------------------------------------- records

def machine():
    info = dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count())
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba
    info["numba"] = numba.__version__
    info["numpy"] = np.__version__
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    except OSError:
        pass
    return info


def load():
    return list(os.getloadavg())


def write(out, name, record, fig=None):
    os.makedirs(out, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out, f"search-{name}-{stamp}")
    if fig is not None:
        fig.savefig(base + ".png", dpi=110)
        record["plot"] = os.path.basename(base + ".png")
    with open(base + ".json", "w") as fh:
        json.dump(record, fh, indent=1, default=_json)
    print(f"wrote {base}.json" + (" and .png" if fig is not None else ""))
    return base


def _json(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _figure(ncols, width=11, height=4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


# --------------------------------------------------------------------------- offgrid

def offgrid_data(quick, seed=0):
    """The micrographs, truth, start and noise variance of the off-grid experiment (module doc)."""
    from numbaem.analysis.fsc import fsc, resolution
    from numbaem.data.patches import PatchSource
    from numbaem.model.basis import FBBasis, synthesize
    from numbaem.model.projection import project
    from numbaem.model.rotations import random_rotations
    rng = np.random.default_rng(seed)
    L, lmax = 7, 4
    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M) * np.repeat(np.exp(-0.3 * np.arange(lmax + 1)),
                                                     [(2 * l + 1) * s for l, s in enumerate(basis.S)])
    N, per, count = (140, 40, 1) if quick else (280, 160, 4)
    mics, energies = [], []
    for _ in range(count):
        pos = []
        while len(pos) < per:
            s = rng.integers(0, N - L + 1, 2)
            if all(max(abs(s[0] - p[0]), abs(s[1] - p[1])) >= 2 * L - 1 for p in pos):
                pos.append(s)
        P = project(theta, basis, random_rotations(per, rng))
        mic = np.zeros((N, N))
        for s, p in zip(pos, P):
            mic[s[0]:s[0] + L, s[1]:s[1] + L] += p
        mics.append(mic)
        energies.append(np.sum(P ** 2, axis=(1, 2)))
    sigma2 = float(np.mean(np.concatenate(energies)) / (L * L * 100.0))
    mics = [m + rng.standard_normal(m.shape) * math.sqrt(sigma2) for m in mics]
    th0 = theta + 0.25 * np.linalg.norm(theta) / math.sqrt(basis.M) * rng.standard_normal(basis.M)
    truth = synthesize(theta, basis)
    f, c = fsc(synthesize(th0, basis), truth)
    return dict(source=PatchSource(mics, L), truth=truth, theta=theta, start=th0, sigma2=sigma2, basis=basis,
                start_resolution=resolution(f, c), micrographs=count, size=N, projections=count * per)


def run_schedule(data, schedule, seed=1, precision="auto", anneal=None):
    """One EM run of ``schedule`` on ``data`` (``anneal``: ``(T0, n)`` or None): per-iteration
    records (seconds, error, search figures)."""
    from numbaem.em import run as em
    from numbaem.model.basis import synthesize
    sched = em.parse_schedule(schedule)
    l0 = load()
    t0 = time.perf_counter()
    res = em.reconstruct(data["source"], synthesize(data["start"], data["basis"]), sigma2=data["sigma2"],
                         schedule=sched, rng=np.random.default_rng(seed), progress=False, truth=data["truth"],
                         precision=precision, anneal=anneal)
    wall = time.perf_counter() - t0
    keep = ("iteration", "stage", "lmax", "K", "patches", "seconds", "seconds_estep", "seconds_mstep", "loglik",
            "relative_error", "fsc_resolution", "precision", "peak_memory")
    its = []
    for r in res.history:
        d = {k: r[k] for k in keep if k in r}
        d.update({k: v for k, v in r.items() if k.startswith("search_")})
        its.append(d)
    last = [r for r in its if r["stage"] == its[-1]["stage"]]
    return dict(schedule=schedule, anneal=list(anneal) if anneal else None, iterations=its, wall_seconds=wall,
                load_before=l0, load_after=load(),
                final_error=its[-1]["relative_error"],
                seconds_per_iteration_last_stage=float(np.mean([r["seconds"] for r in last])),
                seconds_per_iteration=float(np.mean([r["seconds"] for r in its])))


def offgrid(args):
    iters = args.iters or (3 if args.quick else 10)
    data = offgrid_data(args.quick)
    pre = 2 if args.quick else 3
    fine = "7.5" if args.quick else "3.75"
    anneal = (30.0, iters - pre)
    search = (f"lmax=4,iters={pre},rotations=300;lmax=4,iters={iters - pre},fine={fine},coarse=60,local=20,margin=1,"
              "prune=0.01")
    schedules = [(f"lmax=4,iters={iters},rotations={K}", None) for K in ((100, 300) if args.quick else (300, 1000, 3000))]
    schedules += [(f"lmax=4,iters={iters},rotations={100 if args.quick else 1000}", anneal), (search, None),
                  (search, anneal)]
    if args.schedule:
        schedules = [(s, args.anneal) for s in args.schedule]
    runs = []
    for s, ann in schedules:
        print(f"offgrid: {s}" + (f", annealed {ann}" if ann else ""), flush=True)
        r = run_schedule(data, s, anneal=ann)
        print(f"  final error {r['final_error']:.4f}, {r['seconds_per_iteration_last_stage']:.2f} s per iteration "
              f"(last stage), load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}", flush=True)
        runs.append(r)
    rec = dict(experiment="offgrid", quick=args.quick, machine=machine(), threads=args.threads,
               params=dict(L=7, lmax=4, M=int(data["basis"].M), snr=100, micrographs=data["micrographs"],
                           micrograph_size=data["size"], projections=data["projections"],
                           patches=int(data["source"].n_patches), start_fsc_resolution=data["start_resolution"],
                           rotations="Haar-random (off every grid)", method=2),
               runs=runs,
               notes=["relative_error is after alignment (numbaem.analysis.compare.compare_to_truth), per iteration",
                      "seconds are numbaem's own per-iteration record (E-step and M-step), not the alignment",
                      "the load average (1, 5, 15 min) is recorded before and after each run: the machine is shared"])
    fig, (a1, a2) = _figure(2)
    for r in runs:
        its = r["iterations"]
        name = _short(r["schedule"]) + (", annealed" if r.get("anneal") else "")
        a1.semilogy([x["iteration"] for x in its], [x["relative_error"] for x in its], "o-", ms=3, label=name)
        a2.loglog(r["seconds_per_iteration_last_stage"], r["final_error"], "o", ms=7)
        a2.annotate(name, (r["seconds_per_iteration_last_stage"], r["final_error"]), fontsize=7)
    a1.axhline(0.02, color="k", lw=0.6, ls=":")
    a1.set_xlabel("EM iteration")
    a1.set_ylabel("aligned relative error")
    a1.legend(fontsize=7)
    a1.set_title("off-grid floor: L=7, lmax=4, SNR 100, Haar rotations", fontsize=9)
    a2.axhline(0.02, color="k", lw=0.6, ls=":")
    a2.set_xlabel("seconds per iteration (last stage)")
    a2.set_ylabel("final aligned relative error")
    a2.set_title("accuracy against time", fontsize=9)
    write(args.out, "offgrid", rec, fig)


def _short(schedule):
    parts = schedule.split(";")
    last = parts[-1]
    kv = dict(x.split("=") for x in last.split(","))
    if "fine" in kv:
        s = f"search {kv.get('coarse', '30')}->{kv['fine']} deg"
        if float(kv.get("local", 0)):
            s += f", local {kv['local']}"
        return s + (f" (after K={dict(x.split('=') for x in parts[0].split(','))['rotations']})" if len(parts) > 1 else "")
    return f"exhaustive K={kv.get('rotations', 300)}"


# --------------------------------------------------------------------------- decisions

DECISION_SPECS = (("prune 0, no cap, margin 1", dict(prune=0.0, cap=0, margin=1.0)),
                  ("prune 1e-8, cap 1000, margin 2", dict(prune=1e-8, cap=1000, margin=2.0)),
                  ("prune 1e-3, cap 32, margin 1 (defaults)", dict(prune=1e-3, cap=32, margin=1.0)),
                  ("prune 1e-3, cap 32, margin 1, bound", dict(prune=1e-3, cap=32, margin=1.0, bound=True)))


def decisions(args):
    """The search's refinement decisions against the exhaustive E-step on the same level
    (theory section 12.10): the off-grid data's patches of most signal, one E-step and
    M-step from the true coefficients, float64."""
    from numbaem.em.estep import SufficientStats, e_step_chunk, projection_spectra
    from numbaem.em.mstep import normal_equations
    from numbaem.em.search import SearchAccumulator, SearchModel, SearchSpec, search_chunk, search_normal_equations
    from numbaem.model import hopf
    from numbaem.model.projection import project_hopf, projection_matrices
    data = offgrid_data(args.quick)
    src, basis, theta, sigma2 = data["source"], data["basis"], data["theta"], data["sigma2"]
    Y = src.get(np.arange(src.n_patches))
    n = 100 if args.quick else 400
    Y = Y[np.argsort(-(Y ** 2).sum(axis=(1, 2)), kind="stable")[:n]]
    upsilon, level = 0.6, 2
    norm = float(np.linalg.norm(theta))
    t0 = time.perf_counter()
    st = SufficientStats.zeros(hopf.size(level), basis.L)
    e_step_chunk(Y, projection_spectra(project_hopf(theta, basis, level), route="direct", precision="float64"),
                 upsilon, sigma2, st)
    A = projection_matrices(basis, hopf.rotations(level))
    H0, b0 = normal_equations([(slice(0, len(A)), A)], st.W, st.G, basis.L, basis.M)
    rows = [dict(e_step=f"exhaustive, Hopf level {level} ({hopf.size(level)} rotations)", pairs=n * hopf.size(level),
                 error=float(np.linalg.norm(np.linalg.solve(H0, b0) - theta) / norm),
                 seconds=time.perf_counter() - t0)]
    for name, kw in DECISION_SPECS:
        t0 = time.perf_counter()
        spec = SearchSpec(0, level, **kw)
        model = SearchModel(theta, basis, spec, sigma2=sigma2, precision="float64")
        acc = SearchAccumulator(model)
        search_chunk(Y, model, upsilon, sigma2, acc)
        H, b = search_normal_equations(acc.to_stats(), spec, basis)
        rows.append(dict(e_step=f"search 60 -> {hopf.level_step(level):g}, {name}",
                         pairs=int(sum(v for k, v in acc.report.items() if k.startswith("pairs_level_"))),
                         H_relative_difference=float(np.abs(H - H0).max() / np.abs(H0).max()),
                         b_relative_difference=float(np.abs(b - b0).max() / np.abs(b0).max()),
                         error=float(np.linalg.norm(np.linalg.solve(H, b) - theta) / norm),
                         seconds=time.perf_counter() - t0))
        print(f"  {rows[-1]['e_step']}: H differs by {rows[-1]['H_relative_difference']:.2g}, "
              f"error {rows[-1]['error']:.4f}", flush=True)
    rec = dict(experiment="decisions", quick=args.quick, machine=machine(),
               params=dict(L=7, lmax=4, snr=100, patches=n, upsilon=upsilon, start="the true coefficients",
                           selection="the patches of largest energy (most signal) of the off-grid data"),
               rows=rows, notes=["error: the M-step's solution against the true coefficients, relative (no "
                                 "alignment: same frame)", "H_relative_difference: max |H - H_exhaustive| / "
                                 "max |H_exhaustive|"])
    write(args.out, "decisions", rec)


# --------------------------------------------------------------------------- kernels

def kernels(args):
    from numba import njit, prange  # noqa: F401
    from numbaem.em import kernels as kr
    from numbaem.em.estep import SufficientStats, e_step_chunk, projection_spectra, DirectAccumulator, _direct_chunk
    from numbaem.model.basis import FBBasis
    from numbaem.model.projection import project
    from numbaem.model.rotations import rotation_grid
    from numbaem.runtime.threads import use_threads
    out = dict(experiment="kernels", machine=machine(), sizes={})
    with use_threads(1):
        peaks = _peaks()
        out["peaks_one_thread"] = peaks
        for L, lmax, K, n in ((7, 4, 300, 64 if args.quick else 256), (11, 10, 560, 16 if args.quick else 64)):
            rng = np.random.default_rng(0)
            basis = FBBasis(L, lmax)
            proj = project(rng.standard_normal(basis.M), basis, rotation_grid(K))
            proj *= math.sqrt(L * L / np.mean(np.sum(proj ** 2, axis=(1, 2))))      # SNR 1 against sigma2 = 1
            patches = rng.standard_normal((n, L, L))
            patches[::4] += proj[rng.integers(0, K, len(patches[::4]))]
            row = {}
            variants = [("fft", "float64"), ("direct", "float64"), ("direct", "float32")]
            best = {v: dict(total=1e9) for v in variants}
            l0 = load()
            for rep in range(3 if args.quick else 6):
                for route, prec in variants:
                    spectra = projection_spectra(proj, route=route, precision=prec)
                    steps = {}

                    def timer(name, steps=steps):
                        return _Clock(steps, name)
                    st = SufficientStats.zeros(K, L)
                    t0 = time.process_time()
                    e_step_chunk(patches, spectra, 0.5, 1.0, st, timer=timer)
                    tot = time.process_time() - t0
                    if tot < best[(route, prec)]["total"]:
                        best[(route, prec)] = dict(total=tot, steps=dict(steps))
            pairs = n * K
            for (route, prec), b in best.items():
                row[f"{route}-{prec}"] = dict(ns_per_pair=b["total"] / pairs * 1e9,
                                              share={k: v / b["total"] for k, v in b["steps"].items()},
                                              ns_per_pair_by_step={k: v / pairs * 1e9 for k, v in b["steps"].items()})
            # the kernels' rates against the peaks
            for prec in ("float32", "float64"):
                b = best[("direct", prec)]["steps"]
                macs = L ** 4 * pairs
                row[f"direct-{prec}"]["correlation_macs_per_ns"] = macs / (b.get("scores", 1e-9) * 1e9)
                row[f"direct-{prec}"]["back_correlation_macs_per_ns"] = macs / (b.get("accumulate", 1e-9) * 1e9)
                row[f"direct-{prec}"]["fma_peak_macs_per_ns"] = peaks[f"fma_{prec}_macs_per_ns"]
                row[f"direct-{prec}"]["fraction_of_fma_peak"] = 2 * macs / ((b.get("scores", 0) + b.get("accumulate", 0))
                                                                            * 1e9) / peaks[f"fma_{prec}_macs_per_ns"]
            row["speedup_over_fft"] = {k: row["fft-float64"]["ns_per_pair"] / row[k]["ns_per_pair"]
                                       for k in row if k.startswith("direct")}
            row["load_before"], row["load_after"] = l0, load()
            row["params"] = dict(L=L, lmax=lmax, K=K, patches=n)
            out["sizes"][str(L)] = row
            print(f"L={L}: " + ", ".join(f"{k} {v['ns_per_pair']:.0f} ns/pair" for k, v in row.items()
                                         if isinstance(v, dict) and "ns_per_pair" in v)
                  + f"; speed-up {row['speedup_over_fft']}", flush=True)
    out["notes"] = ["CPU seconds of one thread (time.process_time), best of interleaved repetitions: the machine "
                    "is shared, so variants are compared in one run",
                    "steps: the library's own timer names (e_step_chunk(timer=...))",
                    "fraction_of_fma_peak: the two L^4 multiply-add sums of the direct route against an in-cache "
                    "multiply-add loop of the same width measured here"]
    fig, axes = _figure(2)
    for ax, (L, row) in zip(axes, out["sizes"].items()):
        names = [k for k in row if isinstance(row[k], dict) and "ns_per_pair_by_step" in row[k]]
        bottom = np.zeros(len(names))
        steps = sorted({s for k in names for s in row[k]["ns_per_pair_by_step"]})
        for s in steps:
            v = np.array([row[k]["ns_per_pair_by_step"].get(s, 0.0) for k in names])
            ax.bar(names, v, bottom=bottom, label=s)
            bottom += v
        ax.set_ylabel("ns per (patch, rotation) pair, one thread")
        ax.set_title(f"E-step at L={L}: " + ", ".join(f"{k[7:]} x{v:.1f}" for k, v in row["speedup_over_fft"].items()),
                     fontsize=9)
        ax.legend(fontsize=7)
    write(args.out, "kernels", out, fig)


class _Clock:
    def __init__(self, steps, name):
        self.steps, self.name = steps, name

    def __enter__(self):
        self.t = time.process_time()

    def __exit__(self, *exc):
        self.steps[self.name] = self.steps.get(self.name, 0.0) + time.process_time() - self.t


def _peaks():
    """This machine's one-thread rates: in-cache multiply-adds (both widths), exp, memory copy."""
    from numba import njit
    from numbaem.em.kernels import exp_shifted

    @njit(fastmath={"contract", "arcp", "nsz"})
    def fma(c, p, reps):
        n = p.shape[0]
        for r in range(reps):
            y = p[r % n]
            for t in range(n):
                c[t] += y * p[t]
    out = {}
    for prec, dt in (("float32", np.float32), ("float64", np.float64)):
        c = np.zeros(256, dt)
        p = np.ones(256, dt) * dt(1e-3)
        fma(c, p, 10)
        best = 1e9
        for _ in range(5):
            t0 = time.process_time()
            fma(c, p, 200000)
            best = min(best, time.process_time() - t0)
        out[f"fma_{prec}_macs_per_ns"] = 256 * 200000 / (best * 1e9)
        v = -np.random.default_rng(0).random(4096).astype(dt) * 40
        bits = np.empty(4096, np.int32 if dt == np.float32 else np.int64)
        exp_shifted(v.copy(), dt(0), bits)
        best = 1e9
        for _ in range(5):
            w = v.copy()
            t0 = time.process_time()
            for _ in range(200):
                exp_shifted(w, dt(0), bits)
            best = min(best, time.process_time() - t0)
        out[f"exp_{prec}_per_ns"] = 4096 * 200 / (best * 1e9)
    a = np.ones(1 << 24)
    b = np.empty_like(a)
    best = 1e9
    for _ in range(5):
        t0 = time.process_time()
        np.copyto(b, a)
        best = min(best, time.process_time() - t0)
    out["copy_gb_per_s"] = 2 * a.nbytes / best / 1e9
    return out


# --------------------------------------------------------------------------- user runs (paper, default)

def _cli(*argv, env=None, log=None):
    cmd = [sys.executable, "-m", "numbaem.cli.main", *map(str, argv)]
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("PYTHONPATH", os.getcwd())
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=e, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def _simulate(data_dir, tag, L, N, count, snr, density, L0, seed=0):
    """``numbaem molecule`` + ``numbaem simulate`` (cached): the micrograph paths, sigma^2, truth and homolog."""
    d = os.path.join(data_dir, tag)
    meta = os.path.join(d, "mic.json")
    if not os.path.exists(meta):
        os.makedirs(d, exist_ok=True)
        _cli("molecule", "-o", os.path.join(d, "truth_full.mrc"), "--size", L0, "--seed", seed, "--force")
        _cli("molecule", "-o", os.path.join(d, "homolog_full.mrc"), "--size", L0, "--seed", seed + 1,
             "--homolog-of", seed, "--force")
        _cli("simulate", os.path.join(d, "truth_full.mrc"), "-o", os.path.join(d, "mic.mrc"), "--patch-size", L,
             "--micrograph-size", N, "--method", 2, "--density", density, "--snr", snr, "--count", count,
             "--seed", seed, "--force")
    with open(meta) as fh:
        info = json.load(fh)
    mics = sorted(os.path.join(d, f) for f in os.listdir(d) if f.startswith("mic") and f.endswith(".mrc")
                  and "truth" not in f)
    return dict(dir=d, micrographs=mics, sigma2=float(info["sigma2"]), truth=os.path.join(d, "mic.truth.mrc"),
                init=os.path.join(d, "homolog_full.mrc"), info={k: info[k] for k in info if k in
                                                                  ("snr", "snr_downsampled", "sigma2", "method")})


def reconstruct_run(data, L, schedule, out_dir, name, memory="4GiB", threads=None, env=None, seed=None):
    """``numbaem reconstruct`` on ``data`` with ``schedule`` (after a warm-up on 0.2% of the
    patches, one iteration per stage: numba's kernels compiled); its log's records."""
    log = os.path.join(out_dir, f"{name}.jsonl")
    argv = ["reconstruct", *data["micrographs"], "--patch-size", L, "-o", os.path.join(out_dir, f"{name}.mrc"),
            "--init", data["init"], "--downsample-init", "--noise-var", data["sigma2"], "--schedule", schedule,
            "--truth", data["truth"], "--log", log, "--memory", memory, "--force", "-q"]
    if threads:
        argv += ["--threads", threads]
    if seed is not None:
        argv += ["--seed", seed]
    # warm-up: the same command on a sliver of the patches, one iteration per stage, so the
    # timed run finds every kernel it uses compiled in numba's cache (as a user's second run)
    warm = ";".join(",".join("iters=1" if kv.startswith("iters=") else kv for kv in st.split(",")
                             if not kv.startswith("frac=")) + ",frac=0.002" for st in schedule.split(";"))
    wargv = list(argv)
    wargv[wargv.index("--schedule") + 1] = warm
    wargv[wargv.index("--log") + 1] = log + ".warmup"
    _cli(*wargv, env=env)
    l0 = load()
    wall = _cli(*argv, env=env)
    with open(log) as fh:
        recs = [json.loads(x) for x in fh if x.strip()]
    return dict(name=name, schedule=schedule, env=env or {}, seed=seed, wall_seconds=wall, load_before=l0, load_after=load(),
                iterations=[{k: v for k, v in r.items() if not isinstance(v, (list, dict)) or k.startswith("search")}
                            for r in recs])


def _paired(runs):
    """Per variant and iteration: the error's mean over the minibatch seeds, and its mean
    difference to the first variant's on the same seed with the standard error of that mean
    (the seeds draw the same minibatches for every variant, so the pairs share their noise)."""
    by = {}
    for r in runs:
        by.setdefault(r["variant"], {})[r["seed"]] = [x.get("relative_error", np.nan) for x in r["iterations"]]
    names = list(by)
    ref = by[names[0]]
    out = {}
    for n in names:
        seeds = [s for s in by[n] if s in ref]
        e = np.array([by[n][s] for s in seeds])
        d = e - np.array([ref[s] for s in seeds])
        out[n] = dict(seeds=seeds, mean_error=e.mean(0).tolist(), reference=names[0], mean_difference=d.mean(0).tolist(),
                      sem_difference=(d.std(0, ddof=1) / np.sqrt(len(seeds))).tolist() if len(seeds) > 1 else None)
    return out


def paper(args):
    q = args.quick
    data = _simulate(args.data_dir, "paper-v1-quick" if q else "paper-v1", 11, 220 if q else 5995, 4, 1.0, 0.15, 41)
    frac = 0.5 if q else 0.05
    iters = args.iters or 2
    runs_dir = os.path.join(args.out, "paper-runs")
    os.makedirs(runs_dir, exist_ok=True)
    variants = [("exhaustive-560-fft", f"lmax=10,iters={iters},frac={frac},rotations=560", {"NUMBAEM_ROUTE": "fft"}),
                ("exhaustive-560", f"lmax=10,iters={iters},frac={frac},rotations=560", {}),
                ("search-60-30", f"lmax=10,iters={iters},frac={frac},fine=30,coarse=60", {})]
    for s in args.schedule or []:
        variants.append((s, s, {}))
    if args.variants:
        variants = [v for v in variants if v[0] in args.variants.split(",") or v[0] in (args.schedule or [])]
    runs = []
    for seed in args.seeds or [None]:
        for name, sched, env in variants:
            print(f"paper: {name}: {sched} {env} seed {seed}", flush=True)
            tag = name.replace("/", "_") + ("" if seed is None else f"-seed{seed}")
            r = reconstruct_run(data, 11, sched, runs_dir, tag, threads=args.threads, env=env, seed=seed)
            r["variant"] = name
            its = r["iterations"]
            print("  " + "; ".join(f"it {x['iteration']}: {x['seconds']:.1f} s (E {x['seconds_estep']:.1f}), "
                                   f"error {x.get('relative_error', float('nan')):.5f}" for x in its)
                  + f"; load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}", flush=True)
            runs.append(r)
    rec = dict(experiment="paper", quick=q, machine=machine(), data=data["info"], patches_per_iteration=
               runs[0]["iterations"][0]["patches"], runs=runs, paired=_paired(runs) if args.seeds else None,
               notes=["seconds: numbaem reconstruct's own per-iteration log (E-step and M-step); the first "
                      "iteration includes no compilation (numba caches) but the FFTW plans and first touches",
                      "exhaustive-560-fft: today's E-step (NUMBAEM_ROUTE=fft), the baseline of issue 11"])
    fig, (a1, a2) = _figure(2)
    for r in runs:
        its = r["iterations"]
        lab = r["name"]
        a1.plot([x["iteration"] for x in its], [x["seconds"] for x in its], "o-", label=lab)
        a2.plot([x["iteration"] for x in its], [x.get("relative_error", np.nan) for x in its], "o-", label=lab)
    a1.axhline(60, color="k", ls=":", lw=0.6)
    a1.set_ylabel("seconds per iteration")
    a2.set_ylabel("aligned relative error")
    for a in (a1, a2):
        a.set_xlabel("iteration")
        a.legend(fontsize=7)
    a1.set_title("paper-v1 at SNR 1 through numbaem reconstruct", fontsize=9)
    write(args.out, "paper", rec, fig)


def default(args):
    from numbaem.em.schedule import default_schedule
    q = args.quick
    data = _simulate(args.data_dir, "default-quick" if q else "default-700", 7, 140 if q else 700, 4, 5.0, 0.12, 21)
    runs_dir = os.path.join(args.out, "default-runs")
    os.makedirs(runs_dir, exist_ok=True)
    new = ";".join(",".join(f"{k}={v}" for k, v in st.to_dict().items()) for st in default_schedule(7))
    variants = [("old-default", OLD_DEFAULT if not q else OLD_DEFAULT.replace("iters=6", "iters=2")),
                ("new-default", new)]
    for s in args.schedule or []:
        variants.append((s, s))
    if args.variants:
        variants = [v for v in variants if v[0] in args.variants.split(",") or v[0] in (args.schedule or [])]
    runs = []
    for name, sched in variants:
        print(f"default: {name}: {sched}", flush=True)
        r = reconstruct_run(data, 7, sched, runs_dir, name.replace("/", "_"), threads=args.threads)
        its = r["iterations"]
        r["total_seconds"] = r["wall_seconds"]
        r["final_error"] = its[-1].get("relative_error")
        r["final_fsc_resolution"] = its[-1].get("fsc_resolution")
        print(f"  {r['wall_seconds']:.0f} s in all, final error {r['final_error']:.4f}; load "
              f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}", flush=True)
        runs.append(r)
    rec = dict(experiment="default", quick=q, machine=machine(), data=data["info"], runs=runs,
               notes=["total_seconds: the wall time of the whole numbaem reconstruct command (start-up included)"])
    fig, (a1, a2) = _figure(2)
    for r in runs:
        its = r["iterations"]
        a1.plot(np.cumsum([x["seconds"] for x in its]), [x.get("relative_error", np.nan) for x in its], "o-",
                label=f"{r['name']} ({r['wall_seconds']:.0f} s)")
        a2.plot([x["iteration"] for x in its], [x["seconds"] for x in its], "o-", label=r["name"])
    a1.set_xlabel("seconds (cumulative)")
    a1.set_ylabel("aligned relative error")
    a2.set_xlabel("iteration")
    a2.set_ylabel("seconds")
    a1.legend(fontsize=7)
    a1.set_title("default schedule: four 700x700 micrographs, L=7", fontsize=9)
    write(args.out, "default", rec, fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("offgrid", "kernels", "paper", "default", "decisions"))
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--out", default=os.path.join("bench", "results"))
    p.add_argument("--data-dir", default=None, help="cache of simulated micrographs (default OUT/data)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="iterations per run")
    p.add_argument("--schedule", action="append", help="a schedule to run besides the built-in ones (repeatable)")
    p.add_argument("--anneal", default=None, type=lambda v: (float(v.split(",")[0]), int(v.split(",")[1])),
                   metavar="T0,N", help="offgrid: anneal the --schedule runs (T0 down to 1 over N iterations)")
    p.add_argument("--seeds", default=None, type=lambda v: [int(x) for x in v.split(",")],
                   help="paper: run every variant at each of these minibatch seeds (reconstruct --seed) and "
                        "report the errors' paired differences to the first variant")
    p.add_argument("--variants", default=None,
                   help="paper, default: run only these built-in variants (comma-separated names) and --schedule's")
    args = p.parse_args(argv)
    args.data_dir = args.data_dir or os.path.join(args.out, "data")
    from numbaem.runtime.threads import use_threads
    if args.experiment in ("offgrid", "kernels", "decisions"):
        with use_threads(args.threads):
            return globals()[args.experiment](args)
    return globals()[args.experiment](args)


if __name__ == "__main__":
    sys.exit(main())
