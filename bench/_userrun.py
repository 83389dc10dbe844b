"""One ``numbaem reconstruct`` run as a user runs it, and what the bench measures around it.

:func:`measure` is the body of the suites that report a user's figure (``small``,
``paper-v1``):

1. the data (:func:`bench._data.prepare`: ``numbaem simulate``, cached);
2. a warm-up run of ``numbaem reconstruct`` on the same files (one iteration on a few
   dozen patches and at most 16 rotations: numba's kernels compiled or loaded from
   its cache, so the timed run measures the iteration, not the compiler);
3. the timed run of ``numbaem reconstruct`` (in this process, through
   :func:`numbaem.cli.main.main`): one stage ``lmax, K, frac`` for ``iterations``
   iterations, ``--memory`` the budget, ``--log`` a JSON-lines file from which the
   seconds per iteration (E-step, M-step) and the peak resident memory are read;
4. the resident pages of the memory-mapped micrographs after one minibatch has been
   read (``/proc/self/smaps``): they are page cache that the kernel counts in the
   resident size, so the peak is also given without them;
5. the E-step taken apart on the first iteration's own minibatch, from the run's own
   start (the homolog expanded at ``lmax``; the first ``profile_patches`` patches):
   each step's share (:mod:`bench._profile`, the library's ``timer`` hook), the
   fraction of (patch, rotation) blocks whose exponentials are computed
   (:func:`bench._kernels.block_counts`), and each step's distance from this
   machine's peak (:func:`bench._kernels.kernel_report`).
"""
import dataclasses
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from numbaem.data.io import read_volume
from numbaem.data.patches import PatchSource
from numbaem.em.run import initial_theta
from numbaem.runtime.fourier import downsample
from numbaem.runtime.memory import current_rss

from ._common import CpuShare
from ._data import command_line, prepare, run_cli
from ._iteration import IterationSetup
from ._kernels import block_counts, kernel_peaks, kernel_report
from ._profile import profile_estep


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The one-stage ``numbaem reconstruct`` run that is timed.

    Attributes
    ----------
    lmax, K : int
    frac : float
        Stochastic factor (``ceil(frac Nd)`` patches per iteration).
    iterations : int
    budget : int
        ``--memory`` in bytes.
    seed : int
        ``--seed`` (the minibatch draws).
    upsilon0 : float
    truth : bool
        Pass ``--truth`` (the log then carries the aligned error per iteration; its
        cost is outside the iteration's seconds).
    reconstruct_args : tuple of str
        Further options (``--ctf FILE.star`` and the like, for later suites).
    """

    lmax: int
    K: int
    frac: float
    iterations: int
    budget: int
    seed: int = 0
    upsilon0: float = 0.5
    truth: bool = True
    reconstruct_args: tuple = ()

    @property
    def schedule(self):
        return f"lmax={self.lmax},iters={self.iterations},frac={self.frac!r},rotations={self.K}"


def timing(values):
    """A timing object ``{best, median, all, reps}`` of a list of seconds."""
    values = [float(v) for v in values]
    return dict(best=min(values), median=statistics.median(values), all=values, reps=len(values))


def reconstruct_argv(ds, run, threads, output, log):
    argv = ["reconstruct", *ds.micrographs, "--patch-size", ds.spec.L, "-o", output, "--init", ds.init,
            "--downsample-init", "--noise-var", repr(ds.sigma2), "--schedule", run.schedule, "--memory", run.budget,
            "--seed", run.seed, "--upsilon0", repr(run.upsilon0), "--log", log, "--force", "-q"]
    if threads:
        argv += ["--threads", threads]
    if run.truth:
        argv += ["--truth", ds.truth]
    return [str(a) for a in argv] + [str(a) for a in run.reconstruct_args]


def run_reconstruct(ds, run, threads, workdir):
    """``numbaem reconstruct`` in this process; its log records, wall time and the command line."""
    workdir = Path(workdir)
    log = workdir / "run.jsonl"
    argv = reconstruct_argv(ds, run, threads, workdir / "estimate.mrc", log)
    gc.collect()
    rss0 = current_rss()
    t0 = time.perf_counter()
    with CpuShare() as share:
        run_cli(argv)
    wall = time.perf_counter() - t0
    records = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    log.unlink()
    return dict(command=command_line(argv), wall_seconds=wall, rss_before=rss0, records=records,
                cpu_share=share.result)


def mapped_resident(paths):
    """Resident bytes of this process's mappings of the files ``paths`` (``/proc/self/smaps``)."""
    want = {os.path.realpath(p) for p in paths}
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                parts = line.split()
                if not parts:
                    continue
                if not parts[0].endswith(":"):          # a mapping's header line
                    inside = len(parts) >= 6 and os.path.realpath(" ".join(parts[5:])) in want
                elif inside and parts[0] == "Rss:":
                    total += int(parts[1]) * 1024
    except OSError:
        return None
    return total


def _minibatch_resident(ds, frac, seed):
    """Read the first iteration's minibatch from freshly mapped files; resident bytes of the maps."""
    source = PatchSource.from_files([str(p) for p in ds.micrographs], ds.spec.L)
    idx = source.sample(frac, np.random.default_rng(seed))
    buf = np.empty((4096, source.L, source.L))
    for i in range(0, len(idx), 4096):
        sel = idx[i:i + 4096]
        source.get(sel, out=buf[:len(sel)])
    out = mapped_resident(ds.micrographs)
    del source
    gc.collect()
    return out


def start_theta(ds, lmax):
    """The start ``numbaem reconstruct --init INIT --downsample-init`` computes (a volume: no rng)."""
    vol, _ = read_volume(ds.init)
    if vol.shape[0] != ds.spec.L:
        vol = downsample(vol, ds.spec.L)
    return initial_theta(vol, ds.spec.L, lmax)


def measure(cfg, data_spec, run, profile_patches, count_patches, extra=None):
    """Steps 1-5 of the module doc; returns the suite's ``params``, ``data``, ``cli``, ``memory`` and ``estep``.

    ``profile_patches`` and ``count_patches`` patches are drawn (seeded) from the first
    iteration's minibatch for the E-step profile and the block counts. ``extra(st, idx,
    spectra)``, when given, runs with the :class:`bench._iteration.IterationSetup` of
    the first iteration (its minibatch ``idx`` and spectra) and its result is returned
    under ``extra``.
    """
    data_dir = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.out) / "data"
    t0 = time.perf_counter()
    ds = prepare(data_spec, data_dir, threads=cfg.threads, resimulate=cfg.resimulate)
    t_data = time.perf_counter() - t0
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg.out, prefix=".bench-run-") as work:
        warm_n = 64
        warm = dataclasses.replace(run, K=min(run.K, 16), frac=min(1.0, warm_n / data_spec.patches), iterations=1,
                                   truth=False)
        w = run_reconstruct(ds, warm, cfg.threads, work)
        cli = run_reconstruct(ds, run, cfg.threads, work)
    recs = cli["records"]
    budget = run.budget
    peak = max(r["peak_memory"] for r in recs)
    mapped = _minibatch_resident(ds, run.frac, run.seed)
    cli_rec = dict(command=cli["command"], schedule=run.schedule, iterations=len(recs),
                   seconds=timing([r["seconds"] for r in recs]), estep=timing([r["seconds_estep"] for r in recs]),
                   mstep=timing([r["seconds_mstep"] for r in recs]), patches=recs[0]["patches"],
                   chunk=recs[0]["chunk"], wall_seconds=cli["wall_seconds"], cpu_share=cli["cpu_share"],
                   warmup_wall_seconds=w["wall_seconds"],
                   warmup_command=w["command"], records=recs)
    memory = dict(budget_bytes=budget, peak_rss=peak, peak_over_budget=peak / budget, rss_before_cli=cli["rss_before"],
                  mapped_micrographs_resident=mapped,
                  peak_rss_without_mapped_micrographs=None if mapped is None else peak - mapped,
                  within_budget=bool(peak <= budget),
                  within_budget_without_mapped_micrographs=None if mapped is None else bool(peak - mapped <= budget))

    # the E-step of the first iteration, taken apart
    source = PatchSource.from_files([str(p) for p in ds.micrographs], data_spec.L)
    st = IterationSetup(source, run.lmax, run.K, start_theta(ds, run.lmax), budget, frac=run.frac, seed=run.seed,
                        sigma2=ds.sigma2, upsilon=run.upsilon0)
    idx = st.indices()                       # the minibatch of the run's first iteration
    spectra = st.spectra()
    # the FFT route's steps are the ones taken apart against this machine's peaks (FFT, exp, bandwidth);
    # at L <= 13 the run itself takes the direct route, whose kernels bench/search.py measures
    spectra_fft = st.spectra("fft")
    rng = cfg.rng(17)
    sub = np.sort(rng.choice(idx, size=min(len(idx), max(profile_patches, st.n_chunk)), replace=False))
    few = np.sort(rng.choice(idx, size=min(len(idx), count_patches), replace=False))
    st.warm_up()
    prof = profile_estep(source, sub, spectra_fft, st.upsilon, st.sigma2, st.n_chunk)
    counts = block_counts(source, few, spectra_fft, st.upsilon, st.sigma2, st.n_chunk)
    peaks = kernel_peaks(st.L, st.K, st.n_chunk, cfg.threads, quick=cfg.quick)
    report = kernel_report(prof, peaks, len(sub), st.K, st.L, counts["evaluated_fraction"])
    estep = dict(route_taken_apart="fft", route_of_the_run=spectra.route, profile=prof, profile_patches=int(len(sub)), blocks=counts, peaks=peaks, kernels=report,
                 chunk=st.n_chunk, operator_kept=st.operator.A is not None, operator_bytes=st.operator.nbytes)
    params = dict(L=st.L, lmax=run.lmax, M=st.M, K=run.K, frac=run.frac, patches=recs[0]["patches"],
                  patches_in_source=source.n_patches, chunk=recs[0]["chunk"], budget_bytes=budget,
                  iterations=len(recs), sigma2=ds.sigma2, upsilon0=run.upsilon0, seed=run.seed)
    out = dict(params=params, data=dict(ds.record(), prepare_seconds=t_data), cli=cli_rec, memory=memory,
               estep=estep, peak_memory=peak)
    if extra is not None:
        out["extra"] = extra(st, idx, spectra)
    del source, st
    gc.collect()
    return out


def plot_user(record, path, title):
    """Three panels: seconds per iteration of the CLI run (E-step, M-step); the E-step's steps with
    their share and distance from the peak; memory against the budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r, m, p = record["results"], record["memory"], record["params"]
    cli = r["cli"]
    fig = Figure(figsize=(15, 4.4), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=[1, 1.5, 0.8]))
    e, mm = cli["estep"]["all"], cli["mstep"]["all"]
    x = np.arange(1, len(e) + 1)
    ax1.bar(x, e, color="C0", label="E-step")
    ax1.bar(x, mm, bottom=e, color="C1", label="M-step")
    for xi, a, b in zip(x, e, mm):
        ax1.text(xi, a + b, f"{a + b:.3g} s", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x)
    ax1.set_xlabel("iteration of numbaem reconstruct")
    ax1.set_ylabel("seconds")
    ax1.legend(fontsize=8)
    d = record["data"]
    ax1.set_title(f"{title}: L={p['L']}, lmax={p['lmax']} (M={p['M']}), K={p['K']}, {p['patches']} patches\n"
                  f"SNR {d['snr_requested']:g} (method {d['method']}), {record['threads']['numba']} threads, "
                  f"load {record['machine']['load_average'][0]:.2f}", fontsize=9)
    k = r["estep"]["kernels"]
    if k.get("available"):
        names = [n for n in k["steps"]]
        secs = [k["steps"][n]["seconds"] for n in names]
        ax2.barh(names[::-1], secs[::-1], color="C0")
        for y, n in enumerate(names[::-1]):
            s = k["steps"][n]
            lab = f" {100 * s['share']:.0f}%"
            if s.get("distance"):
                lab += f", {s['distance']:.1f}x its bound ({s['bound_by']})"
            ax2.text(s["seconds"], y, lab, va="center", fontsize=8)
        ax2.set_xlim(0, max(secs) * 1.9)
        ax2.set_xlabel(f"seconds on {k['patches']} patches (E-step {k['total']:.3g} s; "
                       f"{100 * k['fraction_of_peak']:.0f}% of peak overall)")
        ax2.set_title("E-step steps: share, and time over the machine's peak bound", fontsize=9)
    gb = 1024 ** 3
    labels, vals = ["budget", "peak RSS"], [m["budget_bytes"] / gb, m["peak_rss"] / gb]
    if m.get("peak_rss_without_mapped_micrographs") is not None:
        labels.append("peak RSS -\nmapped micrographs")
        vals.append(m["peak_rss_without_mapped_micrographs"] / gb)
    ax3.bar(labels, vals, color=["C7", "C3", "C1"][:len(vals)])
    for xi, v in enumerate(vals):
        ax3.text(xi, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    ax3.set_ylabel("GiB")
    ax3.set_title("memory of the iteration", fontsize=9)
    fig.savefig(path, dpi=110)
