"""Preferred views, contaminants and crowding: each extension on data that breaks its assumption (issue 13).

Data are made by the simulator (Method 1: projected at full size L0, then downsampled),
reconstructed from the same homolog start with the same exhaustive schedule, with and
without the extension:

(a) preferred views (``views='top:0.6'``): ``orientation_prior=NSIDE`` against the uniform
    ``1/K`` (with ``--oracle`` also the truth's own distribution held fixed as the prior,
    carried into the estimate's frame by the alignment of the run without the prior: what
    the best estimate of the views could give); the aligned relative error and the total variation distance of the estimated
    distribution of viewing directions (HEALPix cells) to the truth's (the cells' masses of
    the true distribution, by Monte Carlo, carried into the estimate's frame through the
    alignment by :func:`numbaem.analysis.align.estimate_directions`: ``v -> w^T v`` whether
    or not the estimate came out reflected, since a point reflection only turns the
    projections by 180 degrees in the plane; tested against projections in
    tests/test_view_alignment.py), with the TV of the uniform distribution to the same
    truth as the reference, and the TV to the simulated particles' own directions;
(b) contaminants (``junk=0.3``): ``junk_class='field'`` (the default model) and ``'image'``
    against without; the junk class's prior ``varsigma`` against the fraction of patches
    whose centre object is a contaminant;
(c) crowding: arbitrary against separated spacing at the highest density both reach.

Writes orientation_junk.json and orientation_junk_views.png (estimate against truth, SNR 1)
into --out; seconds per iteration of every run are in the JSON. Runs of parts not named in
--parts that an earlier orientation_junk.json in --out holds are kept in it, each with the
arguments it ran with (``args`` of the run).

    python examples/orientation_junk.py --out examples/results/orientation_junk
"""
import argparse
import json
import logging
import os
import time
from types import SimpleNamespace

import numpy as np

import numbaem
from numbaem.analysis.align import estimate_directions
from numbaem.analysis.compare import compare_to_truth
from numbaem.analysis.plots import plot_view_distribution
from numbaem.model import viewprior
from numbaem.model.basis import FBBasis, expand
from numbaem.runtime.fourier import downsample
from numbaem.sim.simulate import simulate_micrographs
from numbaem.sim.views import parse_views, sample_directions


def truth_cells(views, nside, pair=None, n=400000, seed=0):
    """Probabilities of the HEALPix cells under the view distribution ``views`` (Monte Carlo,
    ``n`` draws: standard error below 1e-3 per cell), carried into the estimate's frame by
    the alignment ``pair`` (its ``rotation`` and ``reflected``; None: the truth's frame)."""
    v = sample_directions(n, parse_views(views), np.random.default_rng(seed))
    return cells_of_directions(v, nside, pair)


def cells_of_directions(v, nside, pair=None):
    """Fractions of the directions ``v`` (n, 3) of the truth's frame in each HEALPix cell of
    the estimate's frame (:func:`numbaem.analysis.align.estimate_directions`)."""
    if pair is not None:
        v = estimate_directions(v, pair.rotation, pair.reflected)
    return np.bincount(viewprior.bins_of_directions(v, nside), minlength=12 * nside * nside) / len(v)


def oracle_weights(views, nside, rec):
    """The truth's cell probabilities in the frame of the estimate of run ``rec`` (its alignment)."""
    pair = SimpleNamespace(rotation=np.asarray(rec["alignment_rotation"]), reflected=rec["reflected"])
    return truth_cells(views, nside, pair)


def json_safe(obj):
    """``obj`` with every non-finite float written as a string ('inf'): standard JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


def run_one(truth_full, init, args, snr, rng_seed, sim_kw, rec_kw):
    L = args.L
    sim = simulate_micrographs(truth_full, L, micrograph_size=args.micrograph_size, method=1, snr=snr,
                               count=args.count, rng=np.random.default_rng(rng_seed), **sim_kw)
    source = numbaem.PatchSource(sim.micrographs, L)
    t0 = time.perf_counter()
    result = numbaem.reconstruct(source, init, sigma2=sim.sigma2, schedule=numbaem.parse_schedule(args.schedule),
                                 rng=np.random.default_rng(args.seed), progress=False, **rec_kw)
    seconds = time.perf_counter() - t0
    figures, pair = compare_to_truth(result.theta, result.basis, sim.truth_volume, return_alignment=True)
    out = dict(snr=snr, snr_downsampled=sim.snr_downsampled, **{k: v for k, v in sim_kw.items()},
               extension={k: (np.asarray(v).tolist() if k == "prior_weights" else v) for k, v in rec_kw.items()}, upsilon=result.upsilon, **figures,
               reflected=bool(pair.reflected), seconds=seconds,
               seconds_per_iteration=float(np.mean([r["seconds"] for r in result.history])),
               iterations=len(result.history), load=os.getloadavg())
    if "views" in sim_kw:
        nside = rec_kw.get("orientation_prior") or args.nside
        if rec_kw.get("prior_weights") is not None:
            nside = viewprior.nside_of(rec_kw["prior_weights"])
        t = truth_cells(sim_kw["views"], nside, pair)
        # the simulated particles' own viewing directions W^T e_z (third rows), a finite sample of t
        t_particles = cells_of_directions(np.concatenate([np.asarray(r)[:, 2, :] for r in sim.rotations]),
                                          nside, pair)
        uniform = np.full(len(t), 1.0 / len(t))
        est = viewprior.distribution(result.state.view_weights) if result.state.view_weights is not None \
            else uniform
        out.update(tv_distance=viewprior.tv_distance(est, t), tv_uniform=viewprior.tv_distance(uniform, t),
                   tv_distance_particles=viewprior.tv_distance(est, t_particles),
                   tv_uniform_particles=viewprior.tv_distance(uniform, t_particles),
                   n_particles=int(sum(len(r) for r in sim.rotations)), view_distribution=est.tolist(),
                   truth_distribution=t.tolist(), particles_distribution=t_particles.tolist(),
                   view_mapping="estimate_directions (w^T v, either reflection)",
                   alignment_rotation=np.asarray(pair.rotation).tolist())
    if result.state.junk_theta is not None:
        out.update(varsigma=result.state.varsigma, junk_theta=result.state.junk_theta.tolist())
    if result.state.junk_lam is not None:
        out.update(varsigma=result.state.varsigma, junk_spectrum=result.state.junk_lam.tolist(),
                   sigma2=result.state.sigma2)
    if "junk" in sim_kw:
        out["junk_true_fraction_of_patches"] = float(
            sum(int(j.sum()) for j in sim.junk) / source.n_patches) if sim.junk is not None else 0.0
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="orientation-junk-run")
    p.add_argument("--L", type=int, default=7)
    p.add_argument("--L0", type=int, default=21)
    p.add_argument("--snrs", default="1,0.25")
    p.add_argument("--micrograph-size", type=int, default=350)
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--crowded-density", type=float, default=0.15,
                   help="density of the crowding comparison (the highest separated spacing reaches reliably)")
    p.add_argument("--nside", type=int, default=2)
    p.add_argument("--schedule", default="lmax=2,iters=3,rotations=100;lmax=4,iters=4,rotations=300")
    p.add_argument("--parts", default="views,junk,crowding")
    p.add_argument("--start", choices=("homolog", "truth"), default="homolog",
                   help="start from a homolog (default) or from the truth itself (isolates the extension's estimate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oracle", action="store_true",
                   help="views: also run with the truth's distribution of views held fixed as the prior")
    p.add_argument("--views-runs", default="off,prior",
                   help="views: which of off, prior (and oracle, as --oracle) to run")
    p.add_argument("--prior-grid-ratio", type=float, default=None,
                   help="views: the prior's grid ratio (default the library's; inf: updated on every stage)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.makedirs(args.out, exist_ok=True)
    truth_full = numbaem.synthetic_molecule(args.L0, rng=args.seed)
    homolog = numbaem.synthetic_molecule(args.L0, rng=args.seed + 1, homolog_of=args.seed, homolog_strength=0.6)
    basis = FBBasis(args.L, FBBasis.max_lmax(args.L))
    init = numbaem.synthesize(expand(downsample(homolog if args.start == "homolog" else truth_full, args.L), basis),
                              basis)
    parts = args.parts.split(",")
    path = os.path.join(args.out, "orientation_junk.json")
    runs = []
    kept = []                 # runs of the parts not rerun now stay in the JSON, each with the arguments it ran with
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
        kept = [dict(r, args=r.get("args", old.get("args"))) for r in old.get("runs", []) if r.get("part") not in parts]
    plan = []
    for snr in (float(s) for s in args.snrs.split(",")):
        if "views" in parts:
            prior = dict(orientation_prior=args.nside)
            if args.prior_grid_ratio is not None:
                prior["prior_grid_ratio"] = args.prior_grid_ratio
            chosen = set(args.views_runs.split(",")) | ({"oracle"} if args.oracle else set())
            if not chosen <= {"off", "prior", "oracle"}:
                p.error(f"--views-runs takes off, prior and oracle, not {', '.join(sorted(chosen - {'off', 'prior', 'oracle'}))}")
            if "oracle" in chosen and "off" not in chosen:
                p.error("the oracle run takes its frame from the run without the prior: add off to --views-runs")
            for name, ext in (("off", {}), ("prior", prior), ("oracle", dict(oracle=True))):
                if name in chosen:
                    plan.append(("views", snr, dict(views="top:0.6", density=args.density), ext))
        if "junk" in parts:
            for ext in ({}, dict(junk_class="field"), dict(junk_class="image")):
                plan.append(("junk", snr, dict(junk=0.3, density=args.density), ext))
        if "crowding" in parts:
            for spacing in ("separated", "arbitrary"):
                plan.append(("crowding", snr, dict(spacing=spacing, density=args.crowded_density), {}))
    for i, (part, snr, sim_kw, ext) in enumerate(plan):
        seed = [args.seed, int(1000 * snr), ["views", "junk", "crowding"].index(part)]
        if ext.get("oracle"):     # after the run without the prior on the same data: its alignment
            off = [r for r in runs if r["part"] == "views" and r["snr"] == snr and not r["extension"]][-1]
            ext = dict(prior_weights=oracle_weights(sim_kw["views"], args.nside, off), prior_fixed=True)
        rec = run_one(truth_full, init, args, snr, seed, sim_kw, ext)
        rec["part"] = part
        rec["args"] = vars(args)
        runs.append(rec)
        label = "oracle prior (fixed)" if ext.get("prior_fixed") else (ext or "off")
        print(f"{part:8s} SNR {snr:g} {sim_kw} {label}: aligned relative error {rec['relative_error']:.3f}"
              + (f", TV {rec['tv_distance']:.3f} (uniform {rec['tv_uniform']:.3f})" if "tv_distance" in rec else "")
              + (f", varsigma {rec['varsigma']:.3f}" if "varsigma" in rec else "")
              + f", {rec['seconds_per_iteration']:.2f} s/iteration", flush=True)
        with open(path, "w") as fh:       # after every run: a partial table survives an interrupted job
            json.dump(json_safe(dict(args=vars(args), runs=kept + runs)), fh, indent=1, allow_nan=False)
        if part == "views" and ext.get("orientation_prior") and snr == 1.0:
            plot_view_distribution(np.asarray(rec["view_distribution"]), os.path.join(args.out,
                                   "orientation_junk_views.png"), truth=np.asarray(rec["truth_distribution"]),
                                   force=True, title=f"viewing directions, top:0.6, SNR {snr:g} (L = {args.L})")


if __name__ == "__main__":
    main()
