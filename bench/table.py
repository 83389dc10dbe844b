"""The README's performance table, generated from the reference bench JSON (no figure typed by hand).

    python -m bench.table                           # print the table from bench/reference/*.json
    python -m bench.table --store RESULT.json ...   # copy bench results into bench/reference/
    python -m bench.table --reference DIR           # another directory of reference files

``--store`` writes ``bench/reference/<suite>.json``: the suite's record with long lists
cut (any list of more than :data:`MAX_LIST` items keeps its length, first and last
items), so the committed files stay small. The table has one row per suite found
(``paper-v1``, ``small``, ``baseline``, ``peak``, ``sweep``), each written by the
suite's own ``table_row(record)``, and below it one line per file saying where and
when it was measured: CPU, threads, load average before and after, and the cores
other processes kept busy meanwhile (``machine.cpu_share.other_cores``). A file
measured with ``--quick`` is marked as such.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from numbaem.runtime.errors import NumbaemError

REFERENCE = Path(__file__).resolve().parent / "reference"
ORDER = ("paper-v1", "small", "baseline", "peak", "sweep")
MAX_LIST = 64
# Other processes' cores above this during a suite mark its figures as taken on a loaded machine.
LOADED = 0.25


def strip(obj):
    """A copy of ``obj`` with every list longer than :data:`MAX_LIST` cut to a summary."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) > MAX_LIST:
            return dict(stripped_list=True, length=len(obj), first=strip(obj[0]), last=strip(obj[-1]))
        return [strip(v) for v in obj]
    return obj


def store(paths, reference=REFERENCE):
    """Copy bench result files into ``reference`` as ``<suite>.json`` (stripped); returns the paths written."""
    reference = Path(reference)
    reference.mkdir(parents=True, exist_ok=True)
    written = []
    for p in paths:
        try:
            rec = json.loads(Path(p).read_text())
        except (OSError, ValueError) as exc:
            raise NumbaemError(f"cannot read bench result {p} ({exc}); give a bench-<suite>-<time>.json file") from None
        suite = rec.get("suite")
        if suite not in ORDER:
            raise NumbaemError(f"{p} is not a bench result of a known suite (suite={suite!r}); "
                               f"give one of {', '.join(ORDER)}")
        rec = strip(rec)
        rec["reference_source"] = Path(p).name
        rec.pop("plot", None)
        out = reference / f"{suite}.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
        os.replace(tmp, out)
        written.append(out)
    return written


def load(reference=REFERENCE):
    """The reference records found in ``reference``, by suite, in table order."""
    reference = Path(reference)
    out = {}
    for suite in ORDER:
        f = reference / f"{suite}.json"
        if f.exists():
            out[suite] = json.loads(f.read_text())
    return out


def _where(rec):
    m = rec.get("machine", {})
    la, lb = m.get("load_average") or [None], m.get("load_average_after") or [None]
    share = (m.get("cpu_share") or {}).get("other_cores")
    git = (rec.get("versions") or {}).get("git") or {}
    parts = [f"{m.get('cpu_model', '?')}, {rec.get('threads', {}).get('numba', '?')} threads",
             f"{rec.get('created', '?')}"]
    if share is not None and share > LOADED:
        parts.insert(0, "**measured on a loaded machine: the times are inflated**")
    if la[0] is not None:
        parts.append(f"load average {la[0]:.2f} before, {lb[0]:.2f} after" if lb[0] is not None
                     else f"load average {la[0]:.2f}")
    if share is not None:
        parts.append(f"other processes kept {share:.2f} cores busy")
    cli = (rec.get("results") or {}).get("cli") or {}
    cs = cli.get("cpu_share") or {}
    if cs.get("own_cores") is not None:
        parts.append(f"during the timed `numbaem reconstruct` run it used {cs['own_cores']:.2f} cores and other "
                     f"processes {cs['other_cores']:.2f}")
    if git.get("commit"):
        parts.append(f"commit {git['commit'][:10]}" + (" with uncommitted library changes"
                                                       if git.get("numbaem_uncommitted") else ""))
    if rec.get("quick"):
        parts.append("**quick sizes (smoke test), not a reference figure**")
    return "; ".join(parts)


def table(records):
    """The markdown table (and the provenance lines) for ``records`` (suite -> record)."""
    from .main import SUITES

    if not records:
        raise NumbaemError(f"no reference bench files in {REFERENCE}; run the suites and store their JSON with "
                           "python -m bench.table --store bench/results/bench-<suite>-<time>.json")
    lines = ["| suite | figure |", "|---|---|"]
    for suite, rec in records.items():
        left, right = SUITES[suite].table_row(rec)
        lines.append(f"| {left} | {right} |")
    lines.append("")
    for suite, rec in records.items():
        lines.append(f"- `{suite}` ([`bench/reference/{suite}.json`](bench/reference/{suite}.json)): {_where(rec)}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", default=str(REFERENCE), help="directory of the reference files (default %(default)s)")
    p.add_argument("--store", nargs="+", metavar="RESULT.json",
                   help="copy these bench results into the reference directory (stripped) instead of printing")
    args = p.parse_args(argv)
    try:
        if args.store:
            for out in store(args.store, args.reference):
                print(f"wrote {out}")
            return 0
        print(table(load(args.reference)))
    except NumbaemError as exc:
        print(f"bench.table: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
