"""Below the picking limit: direct EM against pick-then-EM, from the same start, over an SNR sweep.

Usage (from the repository root; the defaults are the committed run, about 15 minutes on
2 busy cores):

    python examples/picking_limit.py --out examples/results
    python examples/picking_limit.py --L 11 --micrograph-size 440 --count 4 --out big   # larger

For each molecule (a seeded synthetic molecule, and HIV-1 protease from the shipped PDB
entry 1HVR) it simulates micrographs once by Method 1 (full size L0 = 3 L, then Fourier-
cropped to the working size L) with a fixed set of particles, then for each SNR of the
sweep (1, 1/2, ..., 1/32, at the working pixel size: mean ||projection||^2 / (L^2 sigma^2)
over the particles) adds fresh white noise of that variance to the same clean micrographs
and runs, from the same start (a homolog: the synthetic molecule's seeded homolog, and the
mutant HIV-1 protease of PDB entry 4E43 for 1HVR, both in the data's units) and with the
same schedule:

- direct EM on every patch of the micrographs (numbaem reconstruct), then its posterior
  picks (reconstruct --write-particles);
- pick-then-EM: template matching with the start's projections (numbaem pick, default
  threshold: about one false pick per micrograph on noise), then the same EM on L x L boxes
  around the picks with shifts within L // 4 pixels (reconstruct --particles).

It records the aligned relative error and the aligned FSC 0.5 resolution of both
estimates against the band-limited truth, and the precision and recall of both kinds of
picks (a pick is right within Chebyshev distance L // 4 of a particle's centre, the EM's
shift window), and finds the SNR below which direct EM's error stays below pick-then-EM's
(the curves' crossing, interpolated in log2 SNR). Writes picking_limit.json,
picking_limit_error.png (error and resolution against SNR) and picking_limit_picks.png
(precision and recall against SNR) into --out.

Bad input ends in one sentence and exit status 2: a sweep whose micrographs and EM would
not fit --memory, an SNR that is not positive, an unknown molecule.
"""
import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np

import numbaem
from numbaem.analysis.compare import compare_to_truth
from numbaem.analysis.picking import match_picks, pick_particles
from numbaem.data.boxes import BoxSource
from numbaem.em.particles import posterior_particles
from numbaem.em.plan import plan_iteration
from numbaem.runtime.errors import NumbaemError
from numbaem.runtime.fourier import downsample
from numbaem.runtime.memory import default_budget, format_size, parse_size
from numbaem.runtime.validate import check_L
from numbaem.sim.atomic import model_density
from numbaem.sim.simulate import simulate_micrographs

logger = logging.getLogger("picking_limit")

MOLECULES = ("synthetic", "1hvr")
SNRS = (1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32)


def schedule_for(L):
    """The schedule every run uses: low lmax and a coarse grid first (theory section 7)."""
    top = numbaem.FBBasis.max_lmax(L)
    return numbaem.parse_schedule(f"lmax=2,iters=4,rotations=60;lmax={min(4, top)},iters=4,rotations=150;"
                                  f"lmax={top},iters=4,rotations=150")


def molecule(name, L, L0):
    """(truth map of side L0, start map of side L, pixel size of the working grid in A or None)."""
    if name == "synthetic":
        truth = numbaem.synthetic_molecule(L0, rng=0)
        start = downsample(numbaem.synthetic_molecule(L0, rng=1, homolog_of=0), L)
        return truth, start, None
    if name == "1hvr":
        # HIV-1 protease reaches 32 A from its centre: a box of about 74 A holds it.
        px0 = 73.5 / L0
        truth = model_density("1hvr", L0, px0)
        start = model_density("4e43", L, px0 * L0 / L)
        return truth, start, px0 * L0 / L
    raise NumbaemError(f"molecule {name!r} is not one of {', '.join(MOLECULES)}")


def dataset(name, L, N, count, density, seed):
    """Clean micrographs (Method 1), the truth, the start and the true particle centres."""
    truth_map, start, px = molecule(name, L, 3 * L)
    sim = simulate_micrographs(truth_map, L, micrograph_size=N, method=1, density=density, snr=1.0, count=count,
                               rng=seed)
    # the particles' own mean energy at the working pixel size (projections do not overlap)
    energy = sum(float(np.sum(c ** 2)) for c in sim.clean_micrographs) / sum(len(p) for p in sim.positions)
    return dict(sim=sim, start=start, pixel_size=px, energy=energy,
                centres=[p + L // 2 for p in sim.positions], truth=sim.truth_volume)


def noisy(data, snr, seed):
    """The same clean micrographs with white noise at ``snr`` (working pixel size); (images, sigma2)."""
    L = data["sim"].L
    sigma2 = data["energy"] / (L * L * snr)
    rng = np.random.default_rng(seed)
    return [c + rng.normal(0.0, math.sqrt(sigma2), c.shape) for c in data["sim"].clean_micrographs], sigma2


def memory_needed(L, N, count, K_max):
    """Bytes the sweep holds at once: the micrographs (clean, noisy), Method 1's full-size image,
    the template scores of one micrograph, and the largest EM iteration's plan."""
    n_patches = count * (N // L) ** 2
    em = plan_iteration(1 << 62, K_max, L, numbaem.FBBasis(L, numbaem.FBBasis.max_lmax(L)).M, n_patches).peak
    return 3 * count * N * N * 8 + 2 * (3 * N) ** 2 * 8 + 4 * N * N * 8 + (64 << 20) + em


def crossover(snrs, err_direct, err_pick):
    """The SNR below which direct EM's error stays below pick-then-EM's (None if it never does,
    the highest SNR if it always does), interpolated linearly in log2 SNR between sweep points.
    A NaN pick-then-EM error (no reconstruction: fewer than three picks) counts as a win of
    direct EM; where it meets a finite difference the crossing is put at the finite point."""
    s = np.asarray(snrs, float)
    pick = np.asarray(err_pick, float)
    d = np.asarray(err_direct, float) - pick     # < 0: direct EM wins
    d[np.isnan(pick)] = -np.inf
    order = np.argsort(-s)
    s, d = s[order], d[order]
    if not d[-1] < 0:
        return None
    i = len(d) - 1
    while i > 0 and d[i - 1] < 0:
        i -= 1
    if i == 0:
        return float(s[0])
    x0, x1 = math.log2(s[i - 1]), math.log2(s[i])
    if not np.isfinite(d[i]):
        return float(s[i])
    t = d[i - 1] / (d[i - 1] - d[i])
    return float(2 ** (x0 + t * (x1 - x0)))


def run_molecule(name, args, out):
    L = args.L
    sched = schedule_for(L)
    K = sched[-1].rotations
    window = L // 4
    data = dataset(name, L, args.micrograph_size, args.count, args.density, args.seed)
    n_particles = sum(len(c) for c in data["centres"])
    logger.info("%s: %d particles in %d micrograph(s) of %d^2, L=%d", name, n_particles, args.count,
                args.micrograph_size, L)
    basis = numbaem.FBBasis(L, numbaem.FBBasis.max_lmax(L))
    templates = numbaem.project(numbaem.expand(data["start"], basis), basis, numbaem.rotation_grid(K))
    start_cmp = compare_to_truth(numbaem.expand(data["start"], basis), basis, data["truth"])
    rows = []
    for snr in args.snr:
        t0 = time.perf_counter()
        images, sigma2 = noisy(data, snr, args.seed + 1)
        grid = numbaem.PatchSource(images, L, pixel_size=data["pixel_size"])
        direct = numbaem.reconstruct(grid, data["start"], sigma2=sigma2, schedule=sched, rng=args.seed,
                                     progress=False)
        d_cmp = compare_to_truth(direct.theta, direct.basis, data["truth"])
        post = posterior_particles(grid, direct.theta, direct.basis, K, direct.upsilon, direct.sigma2)
        post_m = match_picks(post.per_micrograph(args.count), data["centres"], window)
        picks, _, thr = pick_particles(images, templates, sigma2, false_picks=args.false_picks, rng=args.seed)
        pick_m = match_picks(picks.per_micrograph(args.count), data["centres"], window)
        row = dict(snr=snr, sigma2=sigma2, direct=d_cmp, direct_upsilon=direct.upsilon, posterior_picks=post_m,
                   template_picks=pick_m, threshold=thr)
        try:
            boxes = BoxSource(images, L, picks.per_micrograph(args.count), window, pixel_size=data["pixel_size"])
        except NumbaemError:
            boxes = None
        if boxes is not None and boxes.n_patches >= 3:
            pe = numbaem.reconstruct(boxes, data["start"], sigma2=sigma2, schedule=sched, rng=args.seed,
                                     progress=False)
            row["pick_then_em"] = compare_to_truth(pe.theta, pe.basis, data["truth"])
            row["pick_then_em_boxes"] = boxes.n_patches
        else:
            # fewer than three boxes: no reconstruction (scored as a loss of pick-then-EM)
            row["pick_then_em"] = dict(relative_error=math.nan, fsc_resolution=math.nan, no_reconstruction=True)
            row["pick_then_em_boxes"] = 0 if boxes is None else boxes.n_patches
        row["seconds"] = time.perf_counter() - t0
        logger.info("%s SNR %-7g direct EM: error %.3f, FSC %.3f | picks P %.2f R %.2f (%d) -> pick-then-EM: "
                    "error %.3f, FSC %.3f | posterior picks P %.2f R %.2f | %.0f s", name, snr,
                    d_cmp["relative_error"], d_cmp["fsc_resolution"], pick_m["precision"], pick_m["recall"],
                    pick_m["picks"], row["pick_then_em"]["relative_error"], row["pick_then_em"]["fsc_resolution"],
                    post_m["precision"], post_m["recall"], row["seconds"])
        rows.append(row)
    snrs = [r["snr"] for r in rows]
    cross = crossover(snrs, [r["direct"]["relative_error"] for r in rows],
                      [r["pick_then_em"]["relative_error"] for r in rows])
    return dict(molecule=name, L=L, L0=3 * L, pixel_size=data["pixel_size"], particles=n_particles,
                micrographs=args.count, micrograph_size=args.micrograph_size, density=args.density,
                start=start_cmp, schedule=[s.to_dict() for s in sched], shift_window=window,
                crossover_snr=cross, sweep=rows)


def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for res, colour in zip(results, ("C0", "C1")):
        s = [r["snr"] for r in res["sweep"]]
        for key, style, label in (("direct", "-o", "direct EM"), ("pick_then_em", "--s", "pick-then-EM")):
            axes[0].plot(s, [r[key]["relative_error"] for r in res["sweep"]], style, color=colour,
                         label=f"{res['molecule']}: {label}")
            axes[1].plot(s, [r[key]["fsc_resolution"] for r in res["sweep"]], style, color=colour,
                         label=f"{res['molecule']}: {label}")
        axes[0].axhline(res["start"]["relative_error"], color=colour, lw=0.8, ls="-.",
                        label=f"{res['molecule']}: the start")
        if res["crossover_snr"]:
            axes[0].axvline(res["crossover_snr"], color=colour, lw=0.8, ls=":")
    axes[0].set_ylabel("aligned relative error")
    axes[1].set_ylabel("aligned FSC 0.5 (1/pixel)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("SNR per particle (working pixel size)")
        ax.invert_xaxis()
    axes[0].legend(fontsize=7)
    axes[0].set_title("against the truth (dotted: crossover; gap: no picks)")
    L = results[0]["L"]
    axes[1].set_ylim(0, 0.52)
    axes[1].axhline((L // 2) / L, color="grey", lw=0.6)
    axes[1].set_title(f"L = {L}: the last shell is {L // 2}/{L} = {(L // 2) / L:.3f} 1/pixel (grey)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "picking_limit_error.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for res, colour in zip(results, ("C0", "C1")):
        s = [r["snr"] for r in res["sweep"]]
        for key, style, label in (("template_picks", "--s", "template picks"),
                                  ("posterior_picks", "-o", "direct EM's posterior picks")):
            axes[0].plot(s, [r[key]["precision"] for r in res["sweep"]], style, color=colour,
                         label=f"{res['molecule']}: {label}")
            axes[1].plot(s, [r[key]["recall"] for r in res["sweep"]], style, color=colour,
                         label=f"{res['molecule']}: {label}")
    axes[0].set_ylabel("precision")
    axes[1].set_ylabel("recall")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("SNR per particle (working pixel size)")
        ax.set_ylim(-0.02, 1.02)
        ax.invert_xaxis()
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "picking_limit_picks.png"), dpi=110)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="picking_limit.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="picking-limit", help="output folder (default picking-limit)")
    p.add_argument("--molecules", nargs="+", default=list(MOLECULES), help="synthetic and/or 1hvr")
    p.add_argument("--snr", nargs="+", type=float, default=list(SNRS), help="the sweep (default 1 .. 1/32)")
    p.add_argument("--L", type=int, default=7, help="working particle size (default 7)")
    p.add_argument("--micrograph-size", type=int, default=196, help="micrograph side at size L (default 196)")
    p.add_argument("--count", type=int, default=2, help="micrographs (default 2)")
    p.add_argument("--density", type=float, default=0.1, help="particle density (default 0.1)")
    p.add_argument("--false-picks", type=float, default=1.0, help="the picker's false picks per micrograph (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", default=None, help="memory budget, e.g. 4GiB (default a quarter of the RAM)")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="recompute the crossovers and redraw the plots of a picking_limit.json (no runs)")
    return p.parse_args(argv)


def replot(path, out):
    """Crossovers and plots again from a finished run's JSON (same numbers, current rules)."""
    with open(path) as fh:
        summary = json.load(fh)
    for res in summary["results"]:
        for row in res["sweep"]:
            if row.get("pick_then_em_boxes", 1) < 3:      # runs written before the no-reconstruction rule
                row["pick_then_em"] = dict(relative_error=math.nan, fsc_resolution=math.nan, no_reconstruction=True)
        res["crossover_snr"] = crossover([r["snr"] for r in res["sweep"]],
                                         [r["direct"]["relative_error"] for r in res["sweep"]],
                                         [r["pick_then_em"]["relative_error"] for r in res["sweep"]])
    summary["replotted"] = ("crossovers and plots recomputed by --replot from the stored numbers (fewer than three "
                            "picks: no reconstruction)")
    with open(os.path.join(out, "picking_limit.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    plot(summary["results"], out)
    return summary


def check(args):
    check_L(args.L, "--L")
    for s in args.snr:
        if not (s > 0 and math.isfinite(s)):
            raise NumbaemError(f"SNR {s} is not a positive number; give SNRs such as 1 0.5 0.25")
    for m in args.molecules:
        if m not in MOLECULES:
            raise NumbaemError(f"molecule {m!r} is not one of {', '.join(MOLECULES)}")
    budget = parse_size(args.memory) if args.memory else default_budget()
    need = memory_needed(args.L, args.micrograph_size, args.count, 150)
    if need > budget:
        raise NumbaemError(f"the sweep needs about {format_size(need)} at once ({args.count} micrograph(s) of "
                           f"{args.micrograph_size}^2 at L={args.L}) but the budget is {format_size(budget)}; "
                           "use fewer or smaller micrographs, or a larger --memory")


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        os.makedirs(args.out, exist_ok=True)
        for res in replot(args.replot, args.out)["results"]:
            logger.info("%s: direct EM wins below SNR %s", res["molecule"], res["crossover_snr"])
        return 0
    try:
        check(args)
        os.makedirs(args.out, exist_ok=True)
        t0 = time.perf_counter()
        results = [run_molecule(m, args, args.out) for m in args.molecules]
    except NumbaemError as exc:
        sys.stderr.write(f"picking_limit.py: error: {exc}\n")
        return 2
    summary = dict(command="python examples/picking_limit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   seconds=time.perf_counter() - t0, load_average=os.getloadavg(), numbaem=numbaem.__version__,
                   criterion="aligned relative error against the band-limited truth; picks right within "
                             "Chebyshev distance L // 4 of a particle centre",
                   results=results)
    with open(os.path.join(args.out, "picking_limit.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    plot(results, args.out)
    for res in results:
        logger.info("%s: direct EM wins below SNR %s", res["molecule"],
                    "n/a" if res["crossover_snr"] is None else f"{res['crossover_snr']:.3g}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("numbaem").setLevel(logging.WARNING)
    raise SystemExit(main())
