"""The built-in main job: a synthetic molecule, micrographs simulated from it, EM from a homolog.

Makes a seeded synthetic molecule (the truth) and a perturbed homolog of it (the
initial guess, as a structure predictor would give), simulates noisy, well-separated
micrographs by Method 1 (the map is projected at its own size and the micrographs are
Fourier-cropped to the patch scale, as a microscope's would be, so the data are not made
by the operator that reconstructs them), reconstructs by approximate EM with frequency
marching, and prints the aligned relative error and FSC against the truth after every
stage, as it ends. Writes into the output directory: micrograph*.mrc, micrograph.json
(the simulation's truth: positions, rotations, noise), truth.mrc, init.mrc,
estimate.mrc, run.jsonl (one record per iteration), fsc.png (FSC curves of the start and
the estimate), convergence.png, slices.png (central slices of truth, start and estimate)
and micrograph.png (a crop of a micrograph with the particles outlined).
Takes about three minutes on two cores (--quick: under a minute).
"""
import json
import logging
import os
import sys
import time

import numpy as np

from ..analysis.compare import compare_to_truth
from ..data.io import atomic_write_text, write_volume
from ..data.patches import PatchSource
from ..em.run import reconstruct
from ..em.schedule import Stage
from ..model import hopf
from ..model.basis import FBBasis, expand, synthesize
from ..runtime.errors import NumbaemError
from ..runtime.fourier import downsample
from ..runtime.threads import use_threads
from ..sim.molecule import synthetic_molecule
from ..sim.simulate import simulate_micrographs, write_simulation
from ._common import add_threads, emit_json, nonneg_int, positive_float

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("-o", "--output", default="numbaem-demo", metavar="DIR",
                   help="output directory (default ./numbaem-demo; created)")
    p.add_argument("--snr", type=positive_float, default=0.2,
                   help="SNR of the micrographs at the volume's own pixel size (default 0.2; the Fourier crop "
                        "to the patch scale raises it by about (L0/L)^2)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the molecule, micrographs and EM (default 0)")
    p.add_argument("--quick", action="store_true", help="a smaller run (L=7) that finishes in under a minute")
    add_threads(p)
    p.add_argument("--force", action="store_true", help="reuse an existing output directory, overwriting its files")
    p.add_argument("--json", action="store_true", help="print a JSON summary on standard output")


def settings(quick):
    """Sizes of the demo (documented in the README)."""
    if quick:
        return dict(L0=21, L=7, N=420, count=1, density=0.12, homolog_strength=1.0,
                    schedule=[Stage(2, 3, 1.0, 100), Stage(4, 4, 1.0, fine=15.0, coarse=30.0, prune=1e-3)])
    # the last stage: a coarse-to-fine search from 30 to 15 degrees, local (20 degrees) once a patch's
    # posterior is concentrated (theory section 12)
    return dict(L0=41, L=11, N=880, count=2, density=0.12, homolog_strength=0.8,
                schedule=[Stage(3, 3, 1.0, 150), Stage(5, 3, 1.0, 400),
                          Stage(6, 3, 1.0, fine=15.0, coarse=30.0, prune=1e-3, local=20.0)])


def _grid(stage):
    """How a stage searches rotations, in words."""
    if stage.is_search:
        spec = stage.search_spec()
        return f"search {hopf.level_step(spec.coarse):g}-{hopf.level_step(spec.fine):g} degrees"
    return f"K {stage.rotations}"


def _say(text):
    """The demo's report on standard output, as it happens (the library only logs)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(args):
    t0 = time.perf_counter()
    cfg = settings(args.quick)
    out = args.output
    if os.path.exists(out) and not os.path.isdir(out):
        raise NumbaemError(f"output {out} exists and is not a directory; choose another -o")
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise NumbaemError(f"output directory {out} is not empty; pass --force to overwrite its files or choose another -o")
    os.makedirs(out, exist_ok=True)
    L, L0 = cfg["L"], cfg["L0"]
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 1]))   # the EM's; the simulation's is args.seed
    truth_full = synthetic_molecule(L0, rng=args.seed)
    homolog_full = synthetic_molecule(L0, rng=args.seed + 1, homolog_of=args.seed,
                                      homolog_strength=cfg["homolog_strength"])
    progress = not args.quiet and sys.stderr.isatty()
    with use_threads(args.threads):
        sim = simulate_micrographs(truth_full, L, micrograph_size=cfg["N"], method=1, density=cfg["density"],
                                   snr=args.snr, spacing="separated", count=cfg["count"], rng=args.seed)
        paths = write_simulation(sim, os.path.join(out, "micrograph.mrc"), force=True,
                                 command="numbaem demo")[:-2]          # the micrographs (the JSON is the truth)
        truth = sim.truth_volume
        basis = FBBasis(L, max(st.lmax for st in cfg["schedule"]))
        init = synthesize(expand(downsample(homolog_full, L), basis), basis)
        write_volume(os.path.join(out, "truth.mrc"), truth, force=True)
        write_volume(os.path.join(out, "init.mrc"), init, force=True)
        start, start_pair = compare_to_truth(expand(init, basis), basis, truth, return_alignment=True)
        _say(f"truth: synthetic molecule {L0}^3 -> L={L}; {sum(len(p) for p in sim.positions)} projections in "
             f"{cfg['count']} micrograph(s) of {cfg['N']}x{cfg['N']} (Method 1), SNR {args.snr:g} at side {L0} "
             f"({sim.snr_downsampled:.3g} at side {L}), sigma^2 {sim.sigma2:.4g}")
        _say(f"initial guess (homolog):     aligned relative error {start['relative_error']:.3f}, "
             f"FSC 0.5 at {start['fsc_resolution']:.4f} 1/pixel")
        source = PatchSource.from_files([str(p) for p in paths], L)
        lines = []
        schedule = cfg["schedule"]

        def on_iter(state, rec):
            lines.append(json.dumps(rec))
            if rec["stage_iteration"] == schedule[rec["stage"] - 1].iters:
                _say(f"after stage {rec['stage']} (lmax {rec['lmax']}, {_grid(schedule[rec['stage'] - 1])}, {rec['stage_iteration']} "
                     f"iterations): aligned relative error {rec['relative_error']:.3f}, FSC 0.5 at "
                     f"{rec['fsc_resolution']:.4f} 1/pixel, upsilon {rec['upsilon']:.3f}, "
                     f"{rec['seconds']:.1f} s/iteration")

        result = reconstruct(source, init, sigma2=sim.sigma2, schedule=schedule, rng=rng, truth=truth,
                             callback=on_iter, progress=progress)
    final, final_pair = compare_to_truth(result.theta, result.basis, truth, return_alignment=True)
    write_volume(os.path.join(out, "estimate.mrc"), result.volume, force=True)
    atomic_write_text(os.path.join(out, "run.jsonl"), "\n".join(lines) + "\n", force=True)
    _plots(out, sim, start_pair, final_pair, start, result.history, L)
    elapsed = time.perf_counter() - t0
    _say(f"final estimate:              aligned relative error {final['relative_error']:.3f}, FSC 0.5 at "
         f"{final['fsc_resolution']:.4f} 1/pixel (the last shell, {(L // 2) / L:.4f}, is the band limit)")
    _say(f"wrote {out}/: estimate.mrc, truth.mrc, init.mrc, micrograph*.mrc, micrograph.json, run.jsonl, "
         f"fsc.png, convergence.png, slices.png, micrograph.png ({elapsed:.0f} s)")
    if args.json:
        emit_json(dict(initial=start, final=final, seconds=elapsed, history=result.history))


def _plots(out, sim, start_pair, final_pair, start, history, L):
    """The demo's pictures. Each FSC is of an aligned pair compared like with like (both
    band-limited to the ball in the largest basis of side L; theory section 8)."""
    from ..analysis import plots

    plots.plot_fsc({"initial guess (homolog, aligned)": start_pair.fsc(), "EM estimate (aligned)": final_pair.fsc()},
                   os.path.join(out, "fsc.png"), force=True, title="numbaem demo: FSC against the truth")
    plots.plot_convergence(history, os.path.join(out, "convergence.png"), force=True, start=start, L=L)
    plots.plot_slices({"truth": final_pair.reference, "start (homolog, aligned)": start_pair.estimate,
                       "estimate (aligned)": final_pair.estimate}, os.path.join(out, "slices.png"), force=True)
    plots.plot_micrograph_crop(sim.micrographs[0], os.path.join(out, "micrograph.png"), L=L,
                               positions=sim.positions[0], force=True)
