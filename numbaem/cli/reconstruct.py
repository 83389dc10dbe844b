"""Reconstruct a volume directly from micrographs by approximate EM (MODEL sections 4-7).

The micrographs are cut into L x L patches; each EM iteration computes the posterior
over rotations and shifts of every patch (E-step) and solves for the Fourier-Bessel
coefficients and the empty-patch probability (M-step). Frequency marching grows lmax
stage by stage; the stochastic factor draws a fraction of the patches per iteration.

Schedule: "lmax=2,iters=5,frac=0.1,rotations=300;lmax=4,iters=5,frac=0.05,rotations=600"
(or a TOML file with [[stage]] tables with the same keys). Default: three stages up to
the highest lmax of L (about L-1) with K = 100, 300, 1000 and full batches.
"""
import json
import logging
import os
import sys
import time

import numpy as np

from ..model.basis import FBBasis, synthesize
from ..runtime.validate import check_L
from ..em.run import load_schedule, parse_schedule, reconstruct
from ..runtime.errors import InterruptedRun, NumbaemError
from ..runtime.fourier import downsample
from ..data.io import atomic_write_text, read_volume, write_volume
from ..runtime.memory import default_budget, format_size, parse_size
from ..data.patches import PatchSource
from ..runtime.threads import use_threads
from ._common import (add_threads, check_outputs, emit_json, fraction, nonneg_float, nonneg_int, positive_float,
                      positive_int)

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("micrographs", nargs="+", metavar="MIC.mrc", help="micrograph MRC files (one pixel size)")
    p.add_argument("--patch-size", type=int, required=True, metavar="L", help="particle / patch side in pixels, odd")
    p.add_argument("-o", "--output", required=True, metavar="EST.mrc", help="estimated volume (side L)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", metavar="INIT.mrc|random",
                       help="initial volume of side L (e.g. a homolog or AlphaFold map), or 'random'")
    start.add_argument("--resume", action="store_true",
                       help="continue from the last complete checkpoint in --checkpoint instead")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--noise-var", type=positive_float, metavar="S2",
                   help="noise variance sigma^2 of one pixel of the micrographs as given (the working, "
                        "patch pixel size), in the micrographs' units squared")
    n.add_argument("--estimate-noise", action="store_true",
                   help="estimate sigma^2 by EM, starting from the low-signal patches of a seeded sample")
    p.add_argument("--schedule", default=None,
                   help="stages 'lmax=..,iters=..,frac=..,rotations=..;...' or a .toml file (default: see above)")
    p.add_argument("--downsample-init", action="store_true",
                   help="Fourier-downsample an initial volume that is larger than L to side L")
    p.add_argument("--upsilon0", type=fraction, default=0.5, help="initial probability of an empty patch (default 0.5)")
    p.add_argument("--tikhonov", type=nonneg_float, default=0.0, metavar="LAMBDA",
                   help="Tikhonov term lambda added to H (default 0; raised automatically if H is singular)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the minibatch draws, the start-value samples and a random start (default 0)")
    add_threads(p)
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory budget of the process, e.g. 4GiB (default: a quarter of the RAM; 256 MiB of it are "
                        "set aside for the interpreter); the patches stream through the E-step in chunks sized "
                        "from it")
    p.add_argument("--truth", metavar="TRUTH.mrc", help="true volume (side L) to report the FSC resolution per iteration")
    p.add_argument("--log", metavar="run.jsonl", help="JSON-lines log, one record per iteration")
    p.add_argument("--checkpoint", metavar="DIR", help="write a checkpoint after every iteration into DIR")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="run the E-step on a local Dask cluster of N worker processes")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="run the E-step on a running Dask cluster")
    p.add_argument("--plot", metavar="PNG", help="write a convergence plot (log-likelihood, FSC) as PNG")
    p.add_argument("--json", action="store_true", help="print a final JSON summary on standard output")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def _schedule(text):
    if text is None:
        return None
    if text.endswith(".toml") or os.path.isfile(text):
        return load_schedule(text)
    return parse_schedule(text)


def _load_init(path, L, downsample_init):
    vol, _ = read_volume(path)
    if vol.shape[0] != L:
        if not downsample_init:
            raise NumbaemError(f"the initial volume {path} is {vol.shape[0]}^3 but --patch-size is {L}; "
                               f"add --downsample-init to Fourier-downsample it to {L}^3")
        if vol.shape[0] < L:
            raise NumbaemError(f"the initial volume {path} ({vol.shape[0]}^3) is smaller than the patch size {L}; "
                               "give a volume of side L or larger")
        vol = downsample(vol, L)
    return vol


def main(args):
    t_start = time.perf_counter()
    L = check_L(args.patch_size, "--patch-size")
    schedule = _schedule(args.schedule)
    budget = parse_size(args.memory) if args.memory else default_budget()
    if args.resume and not args.checkpoint:
        raise NumbaemError("--resume needs --checkpoint DIR, the directory of the run to continue")
    outputs = [args.output] + [x for x in (args.log, args.plot) if x]
    if not args.resume:
        check_outputs(outputs, args.force)
    source = PatchSource.from_files(args.micrographs, L)
    truth = None
    if args.truth:
        truth, _ = read_volume(args.truth)
        if truth.shape[0] != L:
            raise NumbaemError(f"the truth volume {args.truth} is {truth.shape[0]}^3; give it at side L={L}")
    init = args.init or "random"
    if init != "random":
        init = _load_init(init, L, args.downsample_init)
    sigma2 = args.noise_var
    if sigma2 is None and not args.estimate_noise:
        raise NumbaemError("the noise variance is unknown: pass --noise-var S2 or --estimate-noise")
    logger.info("%d micrograph(s), %d patches of %dx%d, budget %s", len(args.micrographs), source.n_patches,
                L, L, format_size(budget))

    ckpt = None
    state = None
    rng = np.random.default_rng(args.seed)
    if args.checkpoint:
        from ..em.checkpoint import Checkpointer, run_inputs
        inputs = run_inputs(args.micrographs, L=L, sigma2=sigma2, estimate_noise=bool(args.estimate_noise),
                            schedule=schedule, seed=args.seed, tikhonov=args.tikhonov, upsilon0=args.upsilon0,
                            init=init if args.init else None, memory=budget)
        # the split of an iteration into Dask tasks depends on the cluster: part of the inputs
        inputs["distributed"] = dict(workers=args.workers, scheduler=args.scheduler)
        ckpt = Checkpointer(args.checkpoint, inputs, force=args.force and not args.resume)
        state = ckpt.begin(resume=args.resume)
        if args.resume and state is None:
            raise NumbaemError(f"no checkpoint found in {args.checkpoint}; start the run with --init instead of --resume")
        if state is not None:
            logger.info("resuming after iteration %d", state.total_iterations)

    log_lines = []
    if args.resume and args.log and os.path.exists(args.log):
        with open(args.log) as fh:
            log_lines = [ln for ln in fh.read().splitlines() if ln.strip()]

    def on_iteration(st, rec):
        log_lines.append(json.dumps(rec))
        if args.log:
            atomic_write_text(args.log, "\n".join(log_lines) + "\n", force=True)
        if ckpt is not None:
            ckpt.save(st, rec)

    from .signals import GracefulStop
    executor, close = _executor(args)
    try:
        with use_threads(args.threads), GracefulStop() as stop:
            result = reconstruct(source, init, sigma2=sigma2, estimate_noise=args.estimate_noise, schedule=schedule,
                                 upsilon0=args.upsilon0, rng=rng, memory=budget, tikhonov=args.tikhonov, truth=truth,
                                 callback=on_iteration, progress=not args.quiet and sys.stderr.isatty(),
                                 state=state, should_stop=stop.should_stop, executor=executor)
            interrupted = stop.should_stop()
    finally:
        close()
    state, basis = result.state, result.basis
    write_volume(args.output, result.volume, voxel_size=result.pixel_size, force=True if args.resume else args.force)
    if args.plot and state.history:
        _plot(state.history, args.plot, force=True if args.resume else args.force)
    if interrupted:
        raise InterruptedRun(f"stopped by {stop.signal_name or 'a signal'} after iteration {state.total_iterations}; the estimate so far is "
                             f"in {args.output}" + (f" and the checkpoint in {args.checkpoint}: rerun with --resume "
                                                    "to continue" if args.checkpoint else ""))
    summary = dict(output=args.output, L=L, lmax=state.lmax, M=basis.M, iterations=state.total_iterations,
                   upsilon=state.upsilon, sigma2=state.sigma2, patches=source.n_patches,
                   seconds=time.perf_counter() - t_start, history=state.history)
    if truth is not None:
        from ..analysis.compare import compare_to_truth
        summary.update(compare_to_truth(state.theta, basis, truth))
    logger.info("wrote %s after %d iterations", args.output, state.total_iterations)
    if args.json:
        emit_json(summary)


def _executor(args):
    if args.workers is None and args.scheduler is None:
        return None, lambda: None
    try:
        from ..em.distributed import executor_from_options
    except ImportError:
        raise NumbaemError("--workers and --scheduler need Dask: pip install 'numbaem[distributed]'") from None
    return executor_from_options(workers=args.workers, scheduler=args.scheduler, threads=args.threads)


def _plot(history, path, force):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.io import atomic_path

    it = [r["iteration"] for r in history]
    has_fsc = any("fsc_resolution" in r for r in history)
    has_err = any("relative_error" in r for r in history)
    n = 1 + has_fsc + has_err
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(it, [r["loglik_per_patch"] for r in history], "o-")
    ax.set_xlabel("iteration")
    ax.set_ylabel("log-likelihood per patch")
    ax.set_title("convergence")
    for r0, r1 in zip(history, history[1:]):
        if r1["stage"] != r0["stage"]:
            ax.axvline(r1["iteration"] - 0.5, color="grey", lw=0.5)
    if has_fsc:
        ax = axes[0, 1]
        ax.plot(it, [r.get("fsc_resolution", np.nan) for r in history], "o-")
        ax.set_xlabel("iteration")
        ax.set_ylabel("FSC 0.5 after alignment (1/pixel)")
        ax.set_title("resolution against the truth")
    if has_err:
        ax = axes[0, n - 1]
        ax.plot(it, [r.get("relative_error", np.nan) for r in history], "o-")
        ax.set_xlabel("iteration")
        ax.set_ylabel("relative error after alignment")
        ax.set_title("error against the truth")
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
