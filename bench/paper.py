"""Suite ``paper-v1``: a user's iteration at the size of the paper's first volume stage, at SNR 1.

The paper (section 4) runs L = 11 patches, K = 560 rotations at ``lmax = 10``
(M = 219 coefficients here), a stochastic factor of 0.05 over four 6,000 x 6,000
micrographs (about 60,000 patches per iteration), and reports 6 to 12 hours per
iteration across its stages on 96 cores.

Here the data are what a user would make: ``numbaem simulate`` at SNR 1, Method 2,
density 0.15, well-separated, four 5995 x 5995 micrographs at L = 11 (5995 = 545 x 11:
1,188,100 patches; 575 MB of float32 MRC files, cached under ``--data-dir`` or
``--out``, see :mod:`bench._data`), from a synthetic molecule of side 41. The figure
is ``numbaem reconstruct`` on those files (start: a homolog of the molecule; one stage
``lmax=10, K=560, frac=0.05``, so ``ceil(0.05 x 1,188,100) = 59,405`` patches per
iteration; ``--memory 4GiB``), run in this process after a warm-up run, its seconds
per iteration (E-step, M-step) and peak resident memory read from its log
(:mod:`bench._userrun`). The E-step of the first iteration is then taken apart on
``profile_patches`` of its own patches: each step's share and its distance from this
machine's peak (FFT, exponentials, memory bandwidth; :mod:`bench._kernels`), and the
fraction of (patch, rotation) blocks whose exponentials are computed.
"""
from numbaem.runtime.memory import format_size

from ._common import fmt_seconds as fs
from ._data import DataSpec
from ._userrun import RunSpec, measure, plot_user

FULL = dict(data=DataSpec("paper-v1", L=11, micrograph_size=5995, count=4), lmax=10, K=560, frac=0.05, iterations=1,
            budget=4 << 30, profile_patches=2000, count_patches=300)
QUICK = dict(data=DataSpec("paper-v1", L=11, micrograph_size=220, count=4), lmax=10, K=20, frac=0.5, iterations=1,
             budget=4 << 30, profile_patches=200, count_patches=50)

PAPER_REPORTED = ("roughly 6 to 12 hours per iteration across its three stages on 96 cores of a Xeon Gold 6252 "
                  "(paper, section 4; which stage took which was lost from the text copy)")


def run(cfg):
    sz = QUICK if cfg.quick else FULL
    run_spec = RunSpec(lmax=sz["lmax"], K=sz["K"], frac=sz["frac"], iterations=cfg.iterations or sz["iterations"],
                       budget=cfg.memory or sz["budget"], seed=cfg.seed)
    m = measure(cfg, sz["data"], run_spec, sz["profile_patches"], sz["count_patches"])
    cli = m["cli"]
    pairs = cli["patches"] * run_spec.K
    results = dict(cli=cli, iteration_seconds=cli["seconds"]["best"], estep_seconds=cli["estep"]["best"],
                   mstep_seconds=cli["mstep"]["best"], estep_per_pair_ns=cli["estep"]["best"] / pairs * 1e9,
                   estep=m["estep"], paper_reported=PAPER_REPORTED)
    rel = [r.get("relative_error") for r in cli["records"]]
    if rel and rel[-1] is not None:
        results["relative_error_after"] = rel
    return dict(params=m["params"], data=m["data"], results=results, memory=m["memory"], peak_memory=m["peak_memory"],
                notes=["iteration_seconds, estep_seconds, mstep_seconds: numbaem reconstruct's own log, after a warm-up "
                       "run of the same command on the same files ('best' over the timed iterations)",
                       "memory.peak_rss: the process's peak resident size during the iteration (the log's "
                       "peak_memory); the memory-mapped micrographs' resident pages are page cache counted in it, "
                       "so peak_rss_without_mapped_micrographs is given too",
                       "estep: the first iteration's E-step taken apart on profile_patches of its own patches, from "
                       "the run's own start (bench/_kernels.py)"])


def plot(record, path):
    plot_user(record, path, "paper-v1")


def summary(record):
    r, m, d = record["results"], record["memory"], record["data"]
    return (f"iteration {fs(r['iteration_seconds'])} s (E-step {fs(r['estep_seconds'])} s, M-step "
            f"{fs(r['mstep_seconds'])} s) at SNR {d['snr_requested']:g} (after downsampling "
            f"{d['snr_after_downsampling']:.3g}), peak memory {format_size(m['peak_rss'])} vs budget "
            f"{format_size(m['budget_bytes'])}")


def table_row(record):
    """The README's row for this suite."""
    r, p, m, d = record["results"], record["params"], record["memory"], record["data"]
    k = r["estep"]["kernels"]
    fft = sum(k["steps"][s]["seconds"] for s in ("fft_backward", "fft_forward") if s in k["steps"]) / k["total"] \
        if k.get("available") else None
    text = (f"**{fs(r['iteration_seconds'])} s per EM iteration** of `numbaem reconstruct` (E-step "
            f"{fs(r['estep_seconds'])} s, M-step {fs(r['mstep_seconds'])} s), peak memory {format_size(m['peak_rss'])} against the "
            f"{format_size(m['budget_bytes'])} budget")
    if fft is not None:
        text += (f"; the two FFTs take {100 * fft:.0f}% of the E-step, which runs at {100 * k['fraction_of_peak']:.0f}% "
                 f"of this machine's peak for its kernels")
    text += "; the paper reports about 6 hours per iteration on 96 cores"
    return (f"`paper-v1` (L = {p['L']}, lmax = {p['lmax']}, M = {p['M']}, K = {p['K']}, {p['patches']:,} patches "
            f"per iteration of {d['count']} simulated {d['shape'][0]} x {d['shape'][1]} micrographs at SNR "
            f"{d['snr_requested']:g}, Method {d['method']})", text)
