"""Real-micrograph options measured (issue 10): CTF, coloured noise, offsets, and the working pixel size.

    python examples/ctf_recovery.py --out ctf-run              # a seeded synthetic molecule (65^3)
    python examples/ctf_recovery.py MAP.mrc --out ctf-run      # any cubic map of side 65 or so

Every data set is made by ``numbaem simulate`` (Method 1: the 65^3 ribosome projected at its
own size, then Fourier-cropped to L = 11; the map has no pixel size in its header, so
``--pixel-size 4.5`` A per voxel, 26.6 A per working pixel) and reconstructed by
``numbaem reconstruct`` from the same initial guess (the truth with its high frequencies
scrambled, a homolog stand-in) with ``--estimate-noise``, run in process through the
command line exactly as a user would type it. One JSON file (``results.json``) holds every
figure (aligned relative error and FSC 0.5 against the truth) and the commands.

Experiments

``ctf``
    the same particles and noise (one seed) without a CTF, and with one (defocus 1-2.5 um):
    ``reconstruct`` on the first; ``reconstruct --ctf`` on the second; and the second
    without ``--ctf`` (with ``--invert-contrast``: its particles are dark, and without a
    CTF the model expects them bright; both signs are run and the better is reported).
``pink``
    pink-noise micrographs (``simulate --noise pink``), ``--noise coloured`` against
    ``--noise white``.
``invariance``
    the first data set plus 100 noise standard deviations, plus a linear ramp, and with
    inverted contrast run with ``--invert-contrast``: the estimate's change relative to
    the original run.
``pixel``
    micrographs simulated at 4x the working pixel count (L = 45, 6.5 A pixels) run with
    ``--particle-diameter 292.5`` (= 45 x 6.5 A, so diameter / 11 = 26.6 A), against the same
    micrographs Fourier-cropped beforehand to the same odd size (and scaled by the pixel
    size ratio, as numbaem's crop and the simulator do) and run without it.

``ctfpair``
    only the first two runs of ``ctf`` (for a longer schedule).

``--quick`` shrinks everything to a smoke test.
"""
import argparse
import json
import logging
import os
import time

import numpy as np

from numbaem.cli.main import main as numbaem
from numbaem.data.io import read_image, read_volume, write_image, write_volume
from numbaem.data.preprocess import working_shape
from numbaem.runtime.fourier import downsample_image

VOXEL = 4.5          # Angstrom per voxel of the 65^3 map (its header has none)


def scrambled(truth, rng, start=0.18, strength=1.0):
    """The truth with random phases mixed in above ``start`` cycles/pixel (a homolog stand-in)."""
    from numbaem.runtime.fourier import centered_fft, centered_ifft, frequency_grid
    L = truth.shape[0]
    F = centered_fft(truth)
    k = np.sqrt(sum(g ** 2 for g in frequency_grid(L, 3)))
    w = strength * np.clip((k - start) / 0.1, 0, 1)
    noise = centered_fft(rng.standard_normal(truth.shape))
    noise *= np.abs(F).mean() / np.abs(noise).mean()
    return centered_ifft(F + w * noise).real


class Runner:
    def __init__(self, out, schedule, seed, threads, reuse=()):
        self.out, self.schedule, self.seed, self.threads = out, schedule, seed, threads
        self.reuse = set(reuse)
        self.commands = []

    def cli(self, *argv):
        argv = [str(a) for a in argv]
        if self.threads:
            argv += ["--threads", str(self.threads)]
        self.commands.append("numbaem " + " ".join(argv))
        logging.info("$ %s", self.commands[-1])
        t0 = time.perf_counter()
        code = numbaem(argv + ["-q", "--force"])
        if code != 0:
            raise SystemExit(f"numbaem {argv[0]} failed with exit status {code}")
        return time.perf_counter() - t0

    def simulate(self, name, mapfile, L, size, count, snr, extra=()):
        base = os.path.join(self.out, name, "mic.mrc")
        os.makedirs(os.path.dirname(base), exist_ok=True)
        self.cli("simulate", mapfile, "-o", base, "--patch-size", L, "--micrograph-size", size, "--count", count,
                 "--method", 1, "--snr", snr, "--density", 0.1, "--pixel-size", VOXEL, "--seed", self.seed, *extra)
        d = os.path.dirname(base)
        meta = json.load(open(os.path.join(d, "mic.json")))
        return [os.path.join(d, m) for m in meta["micrographs"]], meta, d

    def reconstruct(self, tag, mics, init, truth, extra=()):
        est = os.path.join(self.out, f"est_{tag}.mrc")
        js = os.path.join(self.out, f"est_{tag}.json")
        import contextlib
        import io
        if tag in self.reuse and os.path.exists(js):
            summary = json.load(open(js))
            secs = summary["seconds"]
            logging.info("%s: reusing %s", tag, js)
        else:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                secs = self.cli("reconstruct", *mics, "--patch-size", 11, "-o", est, "--init", init,
                                "--estimate-noise", "--schedule", self.schedule, "--truth", truth, "--seed", self.seed,
                                "--json", *extra)
            summary = json.loads(buf.getvalue())
            with open(js, "w") as fh:
                json.dump(summary, fh, indent=1)
        rec = dict(relative_error=summary["relative_error"], fsc_resolution=summary["fsc_resolution"],
                   relative_error_to_truth_at_final_lmax=_error_at_lmax(read_volume(est)[0], read_volume(truth)[0],
                                                                        summary["lmax"]),
                   pixel_size=summary["pixel_size"], seconds=secs,
                   groups=None if summary["preprocess"]["groups"] is None else max(summary["preprocess"]["groups"]) + 1,
                   contrast_z=(summary["preprocess"].get("contrast") or {}).get("z"),
                   relative_error_per_iteration=[r.get("relative_error") for r in summary["history"]])
        logging.info("%s: aligned relative error %.4f, FSC 0.5 at %.3f 1/px", tag, rec["relative_error"],
                     rec["fsc_resolution"])
        return rec, read_volume(est)[0]


def _error_at_lmax(est, truth, lmax):
    """Aligned relative error against the truth cut to the run's final ``lmax``: the part of the error
    the run could remove (the rest, the truth's orders above ``lmax``, is the same floor for every run)."""
    from numbaem.analysis.compare import compare_to_truth
    from numbaem.model.basis import FBBasis, expand, synthesize
    basis = FBBasis(truth.shape[0], lmax)
    return float(compare_to_truth(expand(est, basis), basis, synthesize(expand(truth, basis), basis))["relative_error"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("map", nargs="?", default=None,
                   help="cubic MRC map (default: numbaem molecule --size 65 --seed 0, written into --out)")
    p.add_argument("--out", default="ctf-run")
    p.add_argument("--size", type=int, default=440, help="micrograph side at the working pixel size (default 440)")
    p.add_argument("--count", type=int, default=3, help="micrographs per data set (default 3)")
    p.add_argument("--snr", type=float, default=1.0, help="SNR at the generation size (default 1)")
    p.add_argument("--schedule", default="lmax=3,iters=3,rotations=150;lmax=5,iters=3,rotations=300;"
                                         "lmax=6,iters=3,rotations=500")
    p.add_argument("--experiments", default="ctf,pink,invariance,pixel")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a smoke test: small micrographs, a short schedule")
    p.add_argument("--reuse", default="", help="comma-separated run tags (e.g. plain) whose results in --out are "
                                                "reused instead of run again (same data and schedule)")
    p.add_argument("--results", default="results.json", help="name of the JSON file written in --out")
    args = p.parse_args()
    if args.quick:
        args.size, args.count, args.schedule = 154, 1, "lmax=2,iters=1,rotations=30"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.makedirs(args.out, exist_ok=True)
    if args.map is None:
        args.map = os.path.join(args.out, "molecule.mrc")
        if not os.path.exists(args.map):
            numbaem(["molecule", "-o", args.map, "--size", "65", "--seed", "0"])
    run = Runner(args.out, args.schedule, args.seed, args.threads, [t for t in args.reuse.split(",") if t])
    todo = set(args.experiments.split(","))
    results = dict(map=args.map, voxel_size=VOXEL, size=args.size, count=args.count, snr=args.snr,
                   schedule=args.schedule, seed=args.seed, loadavg_start=list(os.getloadavg()))

    plain, meta, d0 = run.simulate("plain", args.map, 11, args.size, args.count, args.snr)
    truth_path = os.path.join(d0, "mic.truth.mrc")
    truth, _ = read_volume(truth_path)
    init_path = os.path.join(args.out, "init.mrc")
    write_volume(init_path, scrambled(truth, np.random.default_rng(args.seed)), voxel_size=meta["pixel_size"],
                 force=True)
    results["snr_downsampled_plain"] = meta["snr_downsampled"]

    if todo & {"ctf", "ctfpair", "invariance"}:
        results["plain"], est_plain = run.reconstruct("plain", plain, init_path, truth_path)

    if todo & {"ctf", "ctfpair"}:
        ctf, cmeta, d1 = run.simulate("ctf", args.map, 11, args.size, args.count, args.snr, ["--defocus", "1:2.5"])
        star = os.path.join(d1, "mic_ctf.star")
        results["snr_downsampled_ctf"] = cmeta["snr_downsampled"]
        results["defocus_A"] = [c["defocus_u"] for c in cmeta["ctf"]]
        results["ctf_with_ctf"], _ = run.reconstruct("ctf", ctf, init_path, truth_path, ["--ctf", star])
        results["ctf_verdict"] = dict(
            no_ctf_data=results["plain"]["relative_error"], with_ctf=results["ctf_with_ctf"]["relative_error"],
            with_ctf_over_no_ctf_data=results["ctf_with_ctf"]["relative_error"] / results["plain"]["relative_error"],
            within_25_percent=results["ctf_with_ctf"]["relative_error"] <= 1.25 * results["plain"]["relative_error"])
    if "ctf" in todo:
        a, _ = run.reconstruct("ctf_no_ctf_inverted", ctf, init_path, truth_path, ["--invert-contrast"])
        b, _ = run.reconstruct("ctf_no_ctf", ctf, init_path, truth_path)
        results["ctf_without_ctf_inverted"], results["ctf_without_ctf_as_given"] = a, b
        best = min(a["relative_error"], b["relative_error"])
        results["ctf_verdict"].update(without_ctf_best=best,
                                      without_ctf_worse=best > results["ctf_with_ctf"]["relative_error"])

    if "pink" in todo:
        pink, pmeta, _ = run.simulate("pink", args.map, 11, args.size, args.count, args.snr, ["--noise", "pink"])
        results["pink_coloured"], _ = run.reconstruct("pink_coloured", pink, init_path, truth_path,
                                                      ["--noise", "coloured"])
        results["pink_white"], _ = run.reconstruct("pink_white", pink, init_path, truth_path, ["--noise", "white"])
        results["pink_verdict"] = dict(coloured=results["pink_coloured"]["relative_error"],
                                       white=results["pink_white"]["relative_error"],
                                       whitened_better=results["pink_coloured"]["relative_error"]
                                       < results["pink_white"]["relative_error"])

    if "invariance" in todo:
        sd = float(np.sqrt(meta["sigma2"]))
        inv = {}
        for name, fn, extra in (("offset_100sd", lambda im: im + 100 * sd, []),
                                ("ramp", lambda im: im + 100 * sd + sd * (0.01 * np.arange(im.shape[0])[:, None]
                                                                           - 0.02 * np.arange(im.shape[1])[None, :]),
                                 []),
                                ("inverted", lambda im: -im, ["--invert-contrast"])):
            mics = []
            for m in plain:
                img, px = read_image(m)
                q = os.path.join(args.out, "invariance", name, os.path.basename(m))
                os.makedirs(os.path.dirname(q), exist_ok=True)
                write_image(q, fn(img), pixel_size=px, force=True)
                mics.append(q)
            rec, est = run.reconstruct(f"inv_{name}", mics, init_path, truth_path, extra)
            rec["change_relative_to_original"] = float(np.linalg.norm(est - est_plain) / np.linalg.norm(est_plain))
            inv[name] = rec
        results["invariance"] = inv

    if "pixel" in todo:
        big = 4 * args.size + 1 if (4 * args.size) % 2 == 0 else 4 * args.size
        # --lmax 2: the simulator's band-limited truth at L = 45 (not used here; the truth is the L = 11
        # one) would otherwise be a least-squares fit of thousands of coefficients
        raw, rmeta, d2 = run.simulate("pixel4x", args.map, 45, big, args.count, args.snr, ["--lmax", 2])
        a_raw = rmeta["pixel_size"]
        diameter = 45 * a_raw
        shapes = [working_shape(read_image(m, mmap=True)[0].shape, a_raw, diameter / 11) for m in raw]
        pre = []
        for m, shp in zip(raw, shapes):
            img, _ = read_image(m)
            q = os.path.join(args.out, "pixel4x_cropped", os.path.basename(m))
            os.makedirs(os.path.dirname(q), exist_ok=True)
            work = a_raw * np.mean([img.shape[0] / shp[0], img.shape[1] / shp[1]])
            # the crop numbaem makes (Fourier crop, values times a_raw / a_work: the simulator's scale)
            write_image(q, downsample_image(img, shp) * (a_raw / work), pixel_size=work, force=True)
            pre.append(q)
        r1, e1 = run.reconstruct("pixel4x_diameter", raw, init_path, truth_path, ["--particle-diameter", diameter])
        r2, e2 = run.reconstruct("pixel4x_precropped", pre, init_path, truth_path)
        results["pixel"] = dict(raw_pixel_size=a_raw, particle_diameter=diameter, working_shapes=shapes,
                                with_diameter=r1, precropped=r2,
                                estimates_relative_difference=float(np.linalg.norm(e1 - e2) / np.linalg.norm(e2)))

    results["commands"] = run.commands
    results["loadavg_end"] = list(os.getloadavg())
    with open(os.path.join(args.out, args.results), "w") as fh:
        json.dump(results, fh, indent=1)
    logging.info("wrote %s", os.path.join(args.out, args.results))


if __name__ == "__main__":
    main()
