"""``python -m bench [suite ...] [--out DIR] [--data-dir DIR] [--threads T] [--quick]``: run suites, write JSON and a PNG each.

Every suite's data are micrographs made by ``numbaem simulate``, cached under
``--data-dir`` (default ``OUT/data``) and reused while their parameters match
(``bench/_data.py``); ``small`` and ``paper-v1`` time ``numbaem reconstruct`` itself.

With no suite named, ``small``, ``peak`` and ``baseline`` run (the three that take
minutes, not tens of minutes, on a laptop-class machine); ``all`` runs every suite.
Each suite writes ``bench-<suite>-<timestamp>.json`` and ``bench-<suite>-<timestamp>.png``
into ``--out`` (default ``bench/results``, created when missing).
"""
import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from numbaem.runtime.errors import NumbaemError
from numbaem.runtime import fft
from numbaem.runtime.fft import planner_effort
from numbaem.runtime.memory import format_size, parse_size
from numbaem.runtime.threads import use_threads

from . import baseline, paper, peak, small, sweep
from ._common import Config, CpuShare, machine_info, thread_info, versions

logger = logging.getLogger("bench")

SUITES = {
    "small": small,
    "paper-v1": paper,
    "sweep": sweep,
    "baseline": baseline,
    "peak": peak,
}
DEFAULT_SUITES = ("small", "peak", "baseline")
ALL_SUITES = ("small", "peak", "baseline", "sweep", "paper-v1")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SCHEMA = 2


def build_parser():
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="suites: " + ", ".join(SUITES) + ", all.  Default: " + " ".join(DEFAULT_SUITES))
    p.add_argument("suites", nargs="*", metavar="suite",
                   help="suites to run (default: %s; 'all' runs every suite)" % " ".join(DEFAULT_SUITES))
    p.add_argument("--out", default=str(DEFAULT_OUT), help="directory for the JSON and PNG files (default %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numba and FFTW together (default: NUMBAEM_THREADS / NUMBA_NUM_THREADS / all cores)")
    p.add_argument("--quick", action="store_true", help="shrink every size for a smoke test")
    p.add_argument("--memory", default=None,
                   help="memory budget of an EM iteration, e.g. 4GiB (default: each suite's own; paper-v1 4GiB)")
    p.add_argument("--data-dir", default=None,
                   help="directory of the simulated micrographs, reused across runs when the parameters match "
                        "(default OUT/data; paper-v1's take 575 MB)")
    p.add_argument("--resimulate", action="store_true", help="simulate the data again even when cached")
    p.add_argument("--iterations", type=int, default=None,
                   help="iterations of the timed numbaem reconstruct run (default: small 3, paper-v1 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the minibatch draws and of the sampled patches (default %(default)s)")
    p.add_argument("--baseline-patches", type=int, default=None,
                   help="patches both routes of the baseline run on (default 2000)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def _resolve_suites(names):
    names = list(names) or list(DEFAULT_SUITES)
    out = []
    for n in names:
        if n == "all":
            out.extend(ALL_SUITES)
        elif n in SUITES:
            out.append(n)
        else:
            raise NumbaemError(f"unknown suite {n!r}; choose from {', '.join(SUITES)} or all")
    seen = set()
    return [n for n in out if not (n in seen or seen.add(n))]


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.bool_,)):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _paths(out, suite, stamp):
    base = out / f"bench-{suite}-{stamp}"
    i = 1
    while base.with_suffix(".json").exists():
        i += 1
        base = out / f"bench-{suite}-{stamp}-{i}"
    return base.with_suffix(".json"), base.with_suffix(".png")


def run_suite(name, cfg, out, argv):
    module = SUITES[name]
    fft.clear_cache()   # each suite's memory figures are its own (cached plans hold their buffers)
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    t0 = time.perf_counter()
    with CpuShare() as share:
        body = module.run(cfg)
    wall = time.perf_counter() - t0
    machine["load_average_after"] = list(os.getloadavg())
    machine["cpu_share"] = share.result
    record = dict(schema=SCHEMA, suite=name, created=started.isoformat(timespec="seconds"), argv=list(argv),
                  quick=cfg.quick, threads=thread_info(), fftw_effort=planner_effort(), machine=machine,
                  versions=versions(), wall_seconds=wall)
    record.update(body)
    json_path, png_path = _paths(out, name, started.strftime("%Y%m%d-%H%M%S"))
    record["plot"] = png_path.name
    tmp = json_path.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1, default=_json_default)
    os.replace(tmp, json_path)
    try:
        module.plot(record, png_path)
    except Exception as exc:  # a failed figure must not lose the measured numbers
        logger.warning("plot for %s failed: %s", name, exc)
    return record, json_path, png_path


def main(argv=None):
    """Entry point; returns the exit status (0 on success)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        suites = _resolve_suites(args.suites)
        if args.iterations is not None and args.iterations < 1:
            raise NumbaemError(f"--iterations {args.iterations} must be at least 1")
        if args.baseline_patches is not None and args.baseline_patches < 1:
            raise NumbaemError(f"--baseline-patches {args.baseline_patches} must be at least 1")
        cfg = Config(quick=args.quick, memory=parse_size(args.memory) if args.memory else None, seed=args.seed,
                     baseline_patches=args.baseline_patches, out=args.out, data_dir=args.data_dir,
                     resimulate=args.resimulate, iterations=args.iterations)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with use_threads(args.threads) as n_threads:
            cfg.threads = n_threads
            for name in suites:
                logger.info("suite %s (%d threads%s)", name, n_threads, ", quick" if cfg.quick else "")
                record, json_path, png_path = run_suite(name, cfg, out, argv)
                print(f"{name}: {module_summary(name, record)}  [{record['wall_seconds']:.1f} s]\n"
                      f"  -> {json_path}\n  -> {png_path}", flush=True)
    except NumbaemError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


def module_summary(name, record):
    try:
        return SUITES[name].summary(record)
    except Exception:  # pragma: no cover - the summary line is informational
        return f"peak memory {format_size(record.get('peak_memory', 0))}"
