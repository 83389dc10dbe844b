"""Cost of the issue-13 extensions: seconds per EM iteration with each switched on and off.

Standalone::

    python -m bench.extensions [--L 7] [--K 300] [--lmax 4] [--size 700] [--count 2] [--reps 3]
                               [--fine DEG] [--out DIR] [--threads T]

One data set (Method 2, density 0.1, SNR 1, ``count`` micrographs of ``size^2`` pixels;
the patches per iteration are in the JSON), one start, and ``em_iteration`` timed
``reps`` times (after a warm-up) for: off, ``orientation_prior`` (nside 2), ``junk_class``
(the field model, theory 14.4), ``junk_class_image`` (14.2), both (prior and field); on
an exhaustive stage of ``K`` rotations, and with ``--fine DEG`` also a search
stage (orientation prior only: the junk class is exhaustive-only). Records the best and
median seconds, the E-step / M-step split, the load average before and after, and writes
``extensions-<UTC time>.json`` into ``--out`` (default ``bench/results``).
"""
import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np

from numbaem.data.patches import PatchSource
from numbaem.em import run as em
from numbaem.em.schedule import Stage
from numbaem.model.basis import FBBasis, expand
from numbaem.model.rotations import rotation_grid
from numbaem.runtime.fourier import downsample
from numbaem.runtime.threads import use_threads
from numbaem.sim.molecule import synthetic_molecule
from numbaem.sim.simulate import simulate_micrographs

VARIANTS = {"off": {}, "orientation_prior": dict(view=True), "junk_class": dict(junk="field"),
            "junk_class_image": dict(junk="image"), "both": dict(view=True, junk="field")}


def _state(theta, basis, sigma2, view=False, junk=None):
    st = em.EMState(theta=theta.copy(), lmax=basis.lmax, upsilon=0.5, sigma2=sigma2, rng=np.random.default_rng(0))
    if view:
        st.view_weights = np.ones(48)
    if junk == "image":
        st.junk_theta = em.resize_theta(theta, basis, FBBasis(basis.L, 0))
    elif junk == "field":
        from numbaem.model.junkfield import shells
        st.junk_lam = np.full(len(shells(basis.L)[1]), 4.0 * sigma2)
    if junk:
        st.varsigma = 0.1
    return st


def time_variant(source, theta, basis, sigma2, stage, op, reps, **kw):
    em.em_iteration(_state(theta, basis, sigma2, **kw), source, op, stage)     # warm-up (compilation, plans)
    recs = []
    for _ in range(reps):
        recs.append(em.em_iteration(_state(theta, basis, sigma2, **kw), source, op, stage))
    s = np.array([r["seconds"] for r in recs])
    return dict(best=float(s.min()), median=float(np.median(s)),
                estep=float(np.median([r["seconds_estep"] for r in recs])),
                mstep=float(np.median([r["seconds_mstep"] for r in recs])), patches=recs[0]["patches"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--L", type=int, default=7)
    p.add_argument("--K", type=int, default=300)
    p.add_argument("--lmax", type=int, default=4)
    p.add_argument("--size", type=int, default=700)
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fine", type=float, default=None, help="also time a search stage of this fine step (degrees)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    L = args.L
    vol = synthetic_molecule(3 * L, rng=0)
    sim = simulate_micrographs(vol, L, micrograph_size=args.size, method=2, density=0.1, snr=1.0,
                               count=args.count, rng=0)
    basis = FBBasis(L, args.lmax)
    theta = expand(downsample(synthetic_molecule(3 * L, rng=1, homolog_of=0), L), basis)
    source = PatchSource(sim.micrographs, L)
    out = dict(args=vars(args), patches=source.n_patches, started=datetime.datetime.utcnow().isoformat() + "Z",
               results={})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"extensions-{datetime.datetime.utcnow().strftime('%Y%m%dT%H%M%SZ')}.json"

    def save():                  # after every variant: an interrupted run keeps what it measured
        path.write_text(json.dumps(out, indent=1) + "\n")
    with use_threads(args.threads):
        stage = Stage(args.lmax, 1, 1.0, args.K)
        op = em.Operator(basis, rotation_grid(args.K), 1 << 31)
        for name, kw in VARIANTS.items():
            load0 = os.getloadavg()
            res = time_variant(source, theta, basis, sim.sigma2, stage, op, args.reps, **kw)
            res.update(load_before=load0, load_after=os.getloadavg())
            out["results"][f"exhaustive_K{args.K}/{name}"] = res
            save()
            print(f"exhaustive K={args.K} {name:18s} {res['median']:.3f} s/iteration (best {res['best']:.3f})",
                  flush=True)
        if args.fine:
            stage = Stage(args.lmax, 1, 1.0, fine=args.fine)
            op = em.SearchOperator(basis, stage.search_spec())
            for name in ("off", "orientation_prior"):
                load0 = os.getloadavg()
                res = time_variant(source, theta, basis, sim.sigma2, stage, op, args.reps, **VARIANTS[name])
                res.update(load_before=load0, load_after=os.getloadavg())
                out["results"][f"search_fine{args.fine:g}/{name}"] = res
                save()
                print(f"search fine={args.fine:g} {name:18s} {res['median']:.3f} s/iteration", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
