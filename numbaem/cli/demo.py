"""The built-in main job: synthetic molecule -> micrographs -> EM from a homolog -> FSC per stage.

Makes a seeded synthetic molecule (the truth) and a perturbed homolog of it (the
initial guess, as an AlphaFold prediction would be), simulates noisy well-separated
micrographs by Method 2, reconstructs by approximate EM with frequency marching, and
prints the FSC resolution against the truth after every stage. Writes everything into
the output directory: micrographs, truth.json, truth.mrc, init.mrc, estimate.mrc,
run.jsonl, fsc.png (initial vs final FSC curves) and convergence.png.
Takes about two to four minutes on two cores (--quick: well under a minute).
"""
import json
import logging
import os
import time

import numpy as np

from ..model.basis import FBBasis, expand, synthesize
from ..em.run import Stage, reconstruct
from ..runtime.errors import NumbaemError
from ..runtime.fourier import downsample
from ..data.io import atomic_write_text, write_volume
from ..sim.molecule import synthetic_molecule
from ..data.patches import PatchSource
from ..runtime.threads import use_threads
from ._common import add_threads, emit_json, positive_float

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("-o", "--output", default="numbaem-demo", metavar="DIR",
                   help="output directory (default ./numbaem-demo; created)")
    p.add_argument("--snr", type=positive_float, default=5.0, help="SNR of the micrographs (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the molecule, micrographs and EM (default 0)")
    p.add_argument("--quick", action="store_true", help="a smaller run (L=7) that finishes in well under a minute")
    add_threads(p)
    p.add_argument("--force", action="store_true", help="reuse an existing output directory, overwriting its files")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def settings(quick):
    """Sizes of the demo (documented in the README)."""
    if quick:
        return dict(L0=21, L=7, N=420, count=1, density=0.12, homolog_strength=1.0,
                    schedule=[Stage(2, 3, 1.0, 100), Stage(4, 4, 1.0, 300)])
    return dict(L0=41, L=11, N=880, count=2, density=0.12, homolog_strength=0.8,
                schedule=[Stage(3, 3, 1.0, 150), Stage(5, 3, 1.0, 400), Stage(6, 3, 1.0, 600)])


def main(args):
    from ..analysis.fsc import fsc, plot_fsc
    from ..sim.simulate import simulate_micrographs, write_simulation

    t0 = time.perf_counter()
    cfg = settings(args.quick)
    out = args.output
    if os.path.exists(out) and not os.path.isdir(out):
        raise NumbaemError(f"output {out} exists and is not a directory; choose another -o")
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise NumbaemError(f"output directory {out} is not empty; pass --force to overwrite its files or choose another -o")
    os.makedirs(out, exist_ok=True)
    L, L0 = cfg["L"], cfg["L0"]
    rng = np.random.default_rng(args.seed)
    truth_full = synthetic_molecule(L0, seed=args.seed)
    homolog_full = synthetic_molecule(L0, seed=args.seed + 1, homolog_of=args.seed,
                                      homolog_strength=cfg["homolog_strength"])
    with use_threads(args.threads):
        sim = simulate_micrographs(truth_full, L, micrograph_size=cfg["N"], method=2, density=cfg["density"],
                                   snr=args.snr, spacing="separated", count=cfg["count"], rng=rng)
        mic_base = os.path.join(out, "micrograph.mrc")
        paths = write_simulation(sim, mic_base, force=True, command="numbaem demo")[:-2]  # micrographs only
        truth = sim.truth_volume
        top = max(st.lmax for st in cfg["schedule"])
        basis = FBBasis(L, top)
        init = synthesize(expand(downsample(homolog_full, L), basis), basis)
        write_volume(os.path.join(out, "truth.mrc"), truth, force=True)
        write_volume(os.path.join(out, "init.mrc"), init, force=True)
        from ..analysis.compare import compare_to_truth
        start, init_aligned = compare_to_truth(expand(init, basis), basis, truth, return_aligned=True)
        res0 = start["fsc_resolution_unaligned"]
        f0, c0 = fsc(init_aligned, truth)
        print(f"truth: synthetic molecule {L0}^3 -> L={L}; {sum(len(p) for p in sim.positions)} projections in "
              f"{cfg['count']} micrograph(s) of {cfg['N']}x{cfg['N']}, SNR {args.snr:g}, sigma^2 {sim.sigma2:.4g}")
        print(f"initial guess (homolog):      aligned FSC 0.5 at {start['fsc_resolution']:.4f} 1/pixel "
              f"(unaligned {res0:.4f}), relative error {start['relative_error']:.3f}")
        source = PatchSource.from_files([str(p) for p in paths], L)
        lines = []
        per_stage = {}

        def on_iter(state, rec):
            lines.append(json.dumps(rec))
            per_stage[rec["stage"]] = rec

        state = reconstruct(source, init, sigma2=sim.sigma2, schedule=cfg["schedule"], rng=rng, truth=truth,
                            callback=on_iter, progress=not args.quiet)
    for s, rec in sorted(per_stage.items()):
        print(f"after stage {s} (lmax {rec['lmax']}, K {rec['K']}, {rec['stage_iteration']} iterations): "
              f"aligned FSC 0.5 at {rec['fsc_resolution']:.4f} 1/pixel, upsilon {rec['upsilon']:.3f}, "
              f"{rec['seconds']:.1f} s/iteration")
    est = synthesize(state.theta, FBBasis(L, state.lmax))
    final, aligned = compare_to_truth(state.theta, FBBasis(L, state.lmax), truth, return_aligned=True)
    f1, c1 = fsc(aligned, truth)
    res1, err = final["fsc_resolution"], final["relative_error"]
    write_volume(os.path.join(out, "estimate.mrc"), est, force=True)
    atomic_write_text(os.path.join(out, "run.jsonl"), "\n".join(lines) + "\n", force=True)
    plot_fsc({"initial guess (homolog, aligned)": (f0, c0), "EM estimate (aligned)": (f1, c1)}, os.path.join(out, "fsc.png"), force=True,
             title="numbaem demo: FSC against the truth")
    from .reconstruct import _plot
    _plot(state.history, os.path.join(out, "convergence.png"), force=True)
    elapsed = time.perf_counter() - t0
    print(f"final estimate (aligned):     FSC 0.5 at {res1:.4f} 1/pixel (last shell {(L // 2) / L:.4f}), "
          f"relative error {err:.3f}")
    print(f"wrote {out}/: estimate.mrc, truth.mrc, init.mrc, micrograph*.mrc, fsc.png, convergence.png, run.jsonl "
          f"({elapsed:.0f} s)")
    if args.json:
        emit_json(dict(initial_resolution=start["fsc_resolution"], initial_resolution_unaligned=res0,
                       final_resolution=res1, relative_error=err, seconds=elapsed,
                       history=state.history))
