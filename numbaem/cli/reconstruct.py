"""Reconstruct a volume directly from micrographs by approximate EM (theory sections 4-7).

The micrographs are cut into L x L patches; each EM iteration computes the posterior
over rotations and shifts of every patch (E-step) and solves for the Fourier-Bessel
coefficients and the empty-patch probability (M-step). Frequency marching grows lmax
stage by stage; the stochastic factor draws a fraction of the patches per iteration.

Schedule: "lmax=2,iters=5,frac=0.1,rotations=300;lmax=4,iters=5,frac=0.05,rotations=600"
(or a TOML file with [[stage]] tables with the same keys). Default: three stages up to
the highest lmax of L (about L-1), full batches: exhaustive on K = 100 and 300, then a
search from 60 degrees down to 7.5 (15 for L > 9) with local searches near concentrated
posteriors (numbaem.em.schedule.default_schedule).

Starts: a volume (--init INIT.mrc), an atomic model (--init MODEL.pdb|MODEL.cif, or a
shipped entry such as 1hvr: its density at the micrographs' pixel size, scaled to the
data), or ab initio (--init random, with --restarts N seeded starts, the posterior annealed
early on by --anneal, keeping the run with the highest log-likelihood).

Pick-then-EM: --particles coords.star runs the same EM on L x L boxes around the picks
(RELION coordinate STAR, as numbaem pick writes), shifts within --shift-window pixels.
--write-particles coords.star writes the particles the final E-step finds (posterior
probability of a particle >= --min-probability), with that probability and the most
likely rotation as extra columns.

Real micrographs (theory section 11): by default each micrograph has its mean and a
smooth background removed, is brought to a common noise scale, and is whitened by its
estimated noise spectrum (--noise coloured); --particle-diameter Fourier-crops to the
working pixel size diameter / L; --ctf MICROGRAPHS.star puts each micrograph's CTF
(CTFFIND's sign: raw micrographs, particles dark) into the model, by defocus groups.
Without a CTF the model expects particles bright (positive density): use
--invert-contrast for raw micrographs then. --no-preprocess --noise white runs on the
micrographs exactly as given.
"""
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..runtime.validate import check_L
from ..em.run import reconstruct
from ..em.schedule import load_schedule, parse_schedule, schedule_or_default
from ..runtime.errors import InterruptedRun, NumbaemError
from ..runtime.fourier import downsample
from ..data.io import atomic_write_text, read_volume, write_volume
from ..runtime.memory import default_budget, format_size, parse_size
from ..data.preprocess import micrograph_pixel_size, prepare_micrographs
from ..data.star import check_pixel_sizes, read_micrographs_star
from ..runtime.threads import use_threads
from ._common import (add_threads, check_outputs, emit_json, fraction, nonneg_float, nonneg_int, positive_float,
                      positive_int)

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("micrographs", nargs="+", metavar="MIC.mrc", help="micrograph MRC files (one pixel size)")
    p.add_argument("--patch-size", type=int, required=True, metavar="L", help="particle / patch side in pixels, odd")
    p.add_argument("-o", "--output", required=True, metavar="EST.mrc", help="estimated volume (side L)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", metavar="INIT.mrc|MODEL.cif|random",
                       help="initial volume of side L (e.g. a homolog or AlphaFold map), an atomic model (PDB / mmCIF "
                            "file, or a shipped entry: 1hvr, 4e43), or 'random' (ab initio)")
    start.add_argument("--resume", action="store_true",
                       help="continue from the last complete checkpoint in --checkpoint instead")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--noise-var", type=positive_float, metavar="S2",
                   help="noise variance sigma^2 of one pixel of the micrographs as given, in their units squared "
                        "(with --particle-diameter it is scaled by the crop, as white noise's is)")
    n.add_argument("--estimate-noise", action="store_true",
                   help="estimate sigma^2 by EM, starting from the low-signal patches of a seeded sample")
    p.add_argument("--schedule", default=None,
                   help="stages 'lmax=..,iters=..,frac=..,rotations=..;...' or a .toml file (default: see above)")
    p.add_argument("--downsample-init", action="store_true",
                   help="Fourier-downsample an initial volume that is larger than L to side L")
    p.add_argument("--restarts", type=positive_int, default=1, metavar="N",
                   help="with --init random: run from N seeded random starts and keep the run with the highest "
                        "log-likelihood (default 1)")
    p.add_argument("--anneal", default="auto", metavar="T0,N|none",
                   help="anneal the posterior over the first N iterations from temperature T0 down to 1 (the E-step "
                        f"sees T sigma^2); 'auto': {AUTO_ANNEAL[0]:g},{AUTO_ANNEAL[1]} for --init random, none otherwise. "
                        "An annealed start collapses to a small round blob and grows back slowly: give the last stage "
                        "many iterations (examples/ab_initio.py uses 24 at L=7)")
    p.add_argument("--particles", metavar="coords.star", default=None,
                   help="pick-then-EM: run on L x L boxes around these picks (RELION coordinate STAR) instead of the "
                        "micrographs' patch grid")
    p.add_argument("--shift-window", type=nonneg_int, default=None, metavar="W",
                   help="with --particles: shifts of the particle from its pick considered, |l| <= W pixels per axis "
                        "(default L // 4)")
    p.add_argument("--write-particles", metavar="coords.star", default=None,
                   help="write the particles found by the final E-step as RELION coordinate STAR")
    p.add_argument("--min-probability", type=fraction, default=0.5, metavar="P",
                   help="with --write-particles: least posterior probability that a patch holds a particle "
                        "(default 0.5)")
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
    x = p.add_argument_group("micrographs as they come (theory section 14)")
    x.add_argument("--orientation-prior", type=int, nargs="?", const=2, default=None, metavar="NSIDE",
                   help="estimate a prior over viewing directions on the 12 NSIDE^2 HEALPix cells of the sphere "
                        "(NSIDE a power of two, default 2: 48 cells), in-plane angles uniform; writes "
                        "OUTPUT_views.png and records the weights in the JSON summary")
    x.add_argument("--prior-floor", type=float, default=0.05, metavar="LAMBDA",
                   help="the orientation prior's floor: each update mixes in this fraction of the uniform "
                        "distribution, so no rotation falls below LAMBDA/K (default 0.05)")
    x.add_argument("--prior-grid-ratio", type=float, default=0.6, metavar="R",
                   help="update the orientation prior only on stages whose rotation grid's step is at most R times "
                        "the cells' size (coarser grids smear the views across cells; those stages hold the prior; "
                        "default 0.6: with NSIDE 2, rotations >= 2729 or a search's fine level of 15 degrees, any fine below 30)")
    x.add_argument("--junk-class", nargs="?", const="field", default=None, choices=("field", "image"),
                   metavar="MODEL",
                   help="add a junk class for contaminants, with its own prior probability; exhaustive stages "
                        "(rotations=K) only. MODEL 'field' (the default): a patch of junk is a stationary Gaussian "
                        "field with its own radial spectrum (writes OUTPUT_junk.png); 'image': an isotropic "
                        "low-resolution volume (lmax 0) at every shift (writes OUTPUT_junk.mrc)")
    d = p.add_argument_group("real micrographs (theory section 11)")
    d.add_argument("--pixel-size", type=positive_float, default=None, metavar="ANGSTROM",
                   help="pixel size of the micrographs as given (default: their MRC headers); an atomic-model start "
                        "needs one")
    d.add_argument("--particle-diameter", type=positive_float, default=None, metavar="ANGSTROM",
                   help="diameter of the box you would extract around a particle: the working pixel size becomes "
                        "DIAMETER / L and the micrographs are Fourier-cropped to it (default: no resampling)")
    d.add_argument("--invert-contrast", action="store_true",
                   help="multiply the micrographs by -1: for data whose particles are dark where the model expects "
                        "them bright (raw micrographs without --ctf), or the reverse")
    d.add_argument("--ctf", metavar="MICROGRAPHS.star",
                   help="RELION 3.1 micrographs STAR file (CTFFIND / RELION): put each micrograph's CTF in the model")
    d.add_argument("--defocus-tolerance", type=nonneg_float, default=None, metavar="ANGSTROM",
                   help="micrographs whose defocus differs by at most this share one CTF group (default: a phase "
                        "error of 0.1 rad at the working Nyquist frequency, 0.127 a^2 / lambda, so the CTFs of a "
                        "group differ by at most 0.1)")
    d.add_argument("--noise", choices=("coloured", "white"), default="coloured",
                   help="coloured: estimate each group's noise power spectrum and whiten by it (default); white: "
                        "assume white noise")
    d.add_argument("--noise-plot", metavar="PNG",
                   help="where to write the estimated noise spectra (default with --noise coloured: EST_noise.png)")
    d.add_argument("--background-degree", type=nonneg_int, default=2, metavar="D",
                   help="degree of the polynomial background removed from each micrograph (default 2; 1: a ramp)")
    d.add_argument("--no-preprocess", action="store_true",
                   help="do not remove the mean and background nor equalise the noise scale")
    d.add_argument("--work-dir", metavar="DIR",
                   help="where the prepared micrographs are written and kept (default: a temporary directory "
                        "beside the output, removed afterwards); workers of a Dask cluster must see it")


#: ``--anneal auto`` for random starts: (start temperature, iterations).
AUTO_ANNEAL = (5.0, 8)


def _anneal(text, init):
    text = str(text).strip().lower()
    if text == "none":
        return None
    if text == "auto":
        return AUTO_ANNEAL if init == "random" else None
    try:
        t0, n = text.split(",")
        return float(t0), int(n)
    except ValueError:
        raise NumbaemError(f"--anneal {text!r} is not 'T0,N', 'auto' or 'none'; write e.g. --anneal 10,8") from None


def load_init(init, L, downsample_init, source=None, pixel_size=None):
    """The start as a volume of side L: an MRC map, or an atomic model's density at the micrographs' pixel size."""
    from ..sim.atomic import is_model_file, model_density, read_model

    if is_model_file(init):
        structure = read_model(init)
        px = pixel_size or getattr(source, "pixel_size", None)
        if px is None:
            raise NumbaemError(f"the micrographs carry no pixel size, which an atomic-model start ({init}) needs; "
                               "pass --pixel-size A")
        return model_density(structure, L, px)
    return _load_init(init, L, downsample_init)


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
    schedule = schedule_or_default(_schedule(args.schedule), L, bool(args.particles), args.junk_class)
    budget = parse_size(args.memory) if args.memory else default_budget()
    if args.resume and not args.checkpoint:
        raise NumbaemError("--resume needs --checkpoint DIR, the directory of the run to continue")
    noise_plot = args.noise_plot
    if noise_plot is None and args.noise == "coloured":
        noise_plot = str(Path(args.output).with_suffix("")) + "_noise.png"
    outputs = [args.output] + [x for x in (args.log, args.plot, args.write_particles, noise_plot) if x]
    if args.orientation_prior is not None:
        from ..model.viewprior import check_floor, check_grid_ratio, check_nside
        check_nside(args.orientation_prior)
        check_floor(args.prior_floor)
        check_grid_ratio(args.prior_grid_ratio)
        outputs.append(_sibling(args.output, "_views.png"))
    if args.junk_class:
        if any(st.is_search for st in schedule):
            raise NumbaemError("--junk-class runs with exhaustive stages only; pass a --schedule whose stages all "
                               "have rotations=K, e.g. 'lmax=2,iters=5,frac=1,rotations=600;lmax=4,iters=5,frac=1,"
                               "rotations=600'")
        outputs.append(_sibling(args.output, "_junk.mrc" if args.junk_class == "image" else "_junk.png"))
    if not args.resume:
        check_outputs(outputs, args.force)
    if args.restarts > 1 and (args.init != "random" or args.checkpoint):
        raise NumbaemError("--restarts needs --init random and no --checkpoint (each restart is a whole run)")
    if args.particles and args.write_particles:
        raise NumbaemError("--write-particles needs the micrographs' patch grid; leave out --particles")
    if args.particles and (args.workers or args.scheduler):
        raise NumbaemError("--particles runs in process: leave out --workers / --scheduler")
    if args.shift_window is not None and not args.particles:
        raise NumbaemError("--shift-window belongs to --particles (boxes around picks)")
    star = _read_star(args)
    truth = None
    if args.truth:
        truth, _ = read_volume(args.truth)
        if truth.shape[0] != L:
            raise NumbaemError(f"the truth volume {args.truth} is {truth.shape[0]}^3; give it at side L={L}")
    particles = _read_particles(args) if args.particles else None
    sigma2 = args.noise_var
    if sigma2 is None and not args.estimate_noise:
        raise NumbaemError("the noise variance is unknown: pass --noise-var S2 or --estimate-noise")
    work_dir, own_work_dir = _work_dir(args)
    try:
        prepared = prepare_micrographs(
            args.micrographs, L, work_dir, pixel_size=star.pixel_size if star else args.pixel_size,
            particle_diameter=args.particle_diameter, invert_contrast=args.invert_contrast,
            ctf=star.params if star else None, defocus_tolerance=args.defocus_tolerance, noise=args.noise,
            background=not args.no_preprocess, background_degree=args.background_degree)
        _run(args, L, schedule, budget, prepared, star, truth, particles, sigma2, noise_plot, t_start)
    finally:
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


def _read_star(args):
    """The STAR file's CTFs, checked against the micrographs' pixel size (nothing is written yet)."""
    if not args.ctf:
        return None
    star = read_micrographs_star(args.ctf, args.micrographs)
    header = args.pixel_size or micrograph_pixel_size(args.micrographs)
    check_pixel_sizes(star.pixel_size, header, args.ctf)
    if header is not None:
        star.pixel_size = header
    return star


def _work_dir(args):
    """``(directory, created_here)``: --work-dir (made if missing), else a temporary one beside the output."""
    if args.work_dir:
        created = not os.path.isdir(args.work_dir)
        os.makedirs(args.work_dir, exist_ok=True)
        return args.work_dir, created
    parent = Path(args.output).resolve().parent
    if not parent.is_dir():
        raise NumbaemError(f"the output's directory {parent} does not exist; create it first")
    return tempfile.mkdtemp(prefix=".numbaem-work-", dir=parent), True


def _run(args, L, schedule, budget, prepared, star, truth, particles, sigma2, noise_plot, t_start):
    raw_shapes = _input_shapes(prepared)
    if particles is None:
        source = prepared.source()
    else:
        window = L // 4 if args.shift_window is None else args.shift_window
        source = prepared.boxes(particles, window, raw_shapes)
        logger.info("pick-then-EM: %d boxes around the picks of %s, shifts within %d pixel(s)", source.n_patches,
                    args.particles, window)
    init = args.init or "random"
    model_start = False
    if init != "random":
        from ..sim.atomic import is_model_file
        model_start = is_model_file(init)
        # an atomic model's density is computed at the working pixel size
        init = load_init(init, L, args.downsample_init, source, prepared.pixel_size or args.pixel_size)
    anneal = _anneal(args.anneal, "random" if isinstance(init, str) else None)
    if sigma2 is not None and [tuple(s) for s in prepared.shapes] != raw_shapes:
        # a Fourier crop from N to M pixels per axis keeps white noise white with variance x M/N per axis,
        # and the crop's values are multiplied by a_raw / a_work (numbaem.data.preprocess)
        factor = float(np.mean([np.prod(w) / np.prod(r) for w, r in zip(prepared.shapes, raw_shapes)]))
        factor *= prepared.crop_gain ** 2
        sigma2 = sigma2 * factor
        logger.info("--noise-var scaled by the Fourier crop (x%.4g) to %.4g per working pixel", factor, sigma2)
    if args.no_preprocess:
        from ..data.preprocess import check_offset
        check_offset(source.images, L, sigma2)
    logger.info("%d micrograph(s), %d patches of %dx%d at %s, %s, budget %s", len(args.micrographs),
                source.n_patches, L, L, f"{prepared.pixel_size:.4g} A/pixel" if prepared.pixel_size else
                "an unknown pixel size", f"{len(prepared.filters)} filter group(s)" if prepared.filters else
                "no CTF or noise filter", format_size(budget))
    if noise_plot and prepared.group_spectra is not None and not args.resume:
        from ..analysis.plots import plot_noise_spectra
        plot_noise_spectra(prepared.group_spectra, noise_plot, micrographs=prepared.spectra, scale=prepared.scale,
                           pixel_size=prepared.pixel_size, force=args.force)

    ckpt = None
    state = None
    rng = np.random.default_rng(args.seed)
    if args.checkpoint:
        from ..em.checkpoint import Checkpointer, file_fingerprint, run_inputs
        inputs = run_inputs(args.micrographs, L=L, sigma2=sigma2, estimate_noise=bool(args.estimate_noise),
                            schedule=schedule, seed=args.seed, tikhonov=args.tikhonov, upsilon0=args.upsilon0,
                            init=init if args.init else None, memory=budget)
        # the split of an iteration into Dask tasks depends on the cluster: part of the inputs
        inputs["distributed"] = dict(workers=args.workers, scheduler=args.scheduler)
        # boxes around picks and annealing change the run too
        inputs["particles"] = dict(file=os.path.abspath(args.particles), shift_window=source.shift_window) \
            if args.particles else None
        inputs["anneal"] = list(anneal) if anneal else None
        if args.orientation_prior is not None or args.junk_class:    # absent when off: older checkpoints resume
            inputs["extensions"] = dict(orientation_prior=args.orientation_prior, prior_floor=args.prior_floor,
                                        # True: the image model, as checkpoints made before the field wrote it
                                        junk_class=True if args.junk_class == "image" else args.junk_class or False)
            if args.orientation_prior is not None:   # the grid rule changes what a run with the prior computes
                inputs["extensions"]["prior_grid_ratio"] = _finite_or_none(args.prior_grid_ratio)
        # what the micrographs were made into is part of what the run computes on
        inputs["preprocess"] = dict(
            pixel_size=args.pixel_size, particle_diameter=args.particle_diameter, invert=bool(args.invert_contrast),
            ctf=file_fingerprint(args.ctf) if args.ctf else None, defocus_tolerance=args.defocus_tolerance,
            noise=args.noise, background=not args.no_preprocess, background_degree=args.background_degree)
        ckpt = Checkpointer(args.checkpoint, inputs, force=args.force and not args.resume)
        try:
            state = ckpt.begin(resume=args.resume)
            if args.resume and state is None:
                raise NumbaemError(f"no checkpoint found in {args.checkpoint}; start the run with --init instead of "
                                   "--resume")
        except BaseException:
            ckpt.close()          # the directory's lock: a caller running main() again in-process finds it free
            raise
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
                                 state=state, should_stop=stop.should_stop, executor=executor, anneal=anneal,
                                 restarts=args.restarts, scale_init=model_start,
                                 orientation_prior=args.orientation_prior, prior_floor=args.prior_floor,
                                 prior_grid_ratio=args.prior_grid_ratio, junk_class=args.junk_class)
            interrupted = stop.should_stop()
            if args.write_particles and not interrupted:
                picks = _write_particles(args, source, result, schedule, budget)
    finally:
        close()
        if ckpt is not None:
            ckpt.close()
    state, basis = result.state, result.basis
    write_volume(args.output, result.volume, voxel_size=result.pixel_size, force=True if args.resume else args.force)
    if args.plot and state.history:
        from ..analysis.plots import plot_convergence
        plot_convergence(state.history, args.plot, force=True if args.resume else args.force, L=L)
    if interrupted:
        raise InterruptedRun(f"stopped by {stop.signal_name or 'a signal'} after iteration {state.total_iterations}; the estimate so far is "
                             f"in {args.output}" + (f" and the checkpoint in {args.checkpoint}: rerun with --resume "
                                                    "to continue" if args.checkpoint else ""))
    density = float(np.sum(result.volume))
    if density < 0:
        logger.warning("the estimate's total density is negative (%.3g): its contrast is inverted relative to the "
                       "model; rerun %s --invert-contrast", density, "without" if args.invert_contrast else "with")
    summary = dict(output=args.output, L=L, lmax=state.lmax, M=basis.M, iterations=state.total_iterations,
                   upsilon=state.upsilon, sigma2=state.sigma2, patches=source.n_patches,
                   pixel_size=result.pixel_size, total_density=density, preprocess=prepared.summary(),
                   seconds=time.perf_counter() - t_start, history=state.history)
    if result.restarts is not None:
        summary["restarts"] = result.restarts
    force = True if args.resume else args.force
    if state.view_weights is not None:
        from ..analysis.plots import plot_view_distribution
        from ..model.viewprior import distribution
        views_png = _sibling(args.output, "_views.png")
        plot_view_distribution(state.view_weights, views_png, force=force)
        summary["orientation_prior"] = dict(nside=args.orientation_prior, floor=state.view_floor,
                                            grid_ratio=_finite_or_none(state.view_grid_ratio),
                                            weights=state.view_weights.tolist(),
                                            distribution=distribution(state.view_weights).tolist(), plot=views_png)
    if state.junk_theta is not None:
        from ..model.basis import FBBasis, synthesize
        junk_mrc = _sibling(args.output, "_junk.mrc")
        write_volume(junk_mrc, synthesize(state.junk_theta, FBBasis(L, 0)), voxel_size=result.pixel_size,
                     force=force)
        summary["junk_class"] = dict(model="image", varsigma=state.varsigma, theta=state.junk_theta.tolist(),
                                     volume=junk_mrc)
    if state.junk_lam is not None:
        from ..analysis.plots import plot_junk_spectrum
        junk_png = _sibling(args.output, "_junk.png")
        plot_junk_spectrum(state.junk_lam, state.sigma2, junk_png, varsigma=state.varsigma, force=force)
        summary["junk_class"] = dict(model="field", varsigma=state.varsigma, spectrum=state.junk_lam.tolist(),
                                     noise_var=state.sigma2, plot=junk_png)
    if args.write_particles:
        summary["particles_written"] = len(picks)
    if truth is not None:
        from ..analysis.compare import compare_to_truth
        summary.update(compare_to_truth(state.theta, basis, truth))
    logger.info("wrote %s after %d iterations (pixel size %s)", args.output, state.total_iterations,
                f"{result.pixel_size:.4g} A" if result.pixel_size else "unknown")
    if args.json:
        emit_json(summary)


def _sibling(output, suffix):
    """``EST.mrc`` -> ``EST<suffix>`` (the run's other outputs beside the estimate)."""
    return str(Path(output).with_suffix("")) + suffix


def _read_particles(args):
    """The picks of --particles, one array of centres (x, y) per micrograph, in its own pixels."""
    from ..data.coordinates import coordinates_by_micrograph, read_coordinates

    df = read_coordinates(args.particles)
    return coordinates_by_micrograph(df, args.micrographs, where=f"--particles {args.particles}")


def _write_particles(args, source, result, schedule, budget):
    from ..data.coordinates import relion_angles, write_coordinates
    from ..em.particles import posterior_particles

    last = schedule[-1]
    K = 1000 if last.is_search else last.rotations     # the picks' most likely rotation, on a 20-degree grid
    picks = posterior_particles(source, result.theta, result.basis, K, result.state.background(), result.sigma2,
                                min_probability=args.min_probability, memory=budget)
    ang = relion_angles(picks.rotation)
    write_coordinates(args.write_particles, [args.micrographs[m] for m in picks.micrograph], picks.centre,
                      extra={"rlnAutopickFigureOfMerit": picks.score, "rlnAngleRot": ang[:, 0],
                             "rlnAngleTilt": ang[:, 1], "rlnAnglePsi": ang[:, 2]}, force=args.force)
    return picks


def _executor(args):
    if args.workers is None and args.scheduler is None:
        return None, lambda: None
    try:
        from ..em.distributed import executor_from_options
    except ImportError:
        raise NumbaemError("--workers and --scheduler need Dask: pip install 'numbaem[distributed]'") from None
    return executor_from_options(workers=args.workers, scheduler=args.scheduler, threads=args.threads)
def _input_shapes(prepared):
    from ..data.io import read_image
    return [tuple(read_image(p, mmap=True)[0].shape) for p in prepared.inputs]


def _finite_or_none(x):
    """``x``, or None for an infinite grid ratio (every grid; JSON has no infinity)."""
    return float(x) if math.isfinite(x) else None
