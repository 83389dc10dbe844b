"""Smoke test of the benchmark harness: ``python -m bench small --quick --out DIR``, in process."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

bench_main = pytest.importorskip("bench.main")

PHASES = ("build_A", "projections_spectra", "estep", "normal_equations", "solve", "iteration")


def test_small_quick_writes_json_and_plot(tmp_path):
    status = bench_main.main(["small", "--quick", "--out", str(tmp_path)])
    assert status == 0
    files = sorted(tmp_path.glob("bench-small-*.json"))
    assert len(files) == 1
    rec = json.loads(files[0].read_text())
    assert (tmp_path / rec["plot"]).stat().st_size > 1000

    assert rec["suite"] == "small" and rec["quick"] is True
    p = rec["params"]
    assert (p["L"], p["lmax"], p["M"]) == (7, 4, 34)
    assert p["K"] > 0 and p["patches"] > 0 and 0 < p["chunk"] <= p["patches"]
    assert rec["threads"]["numba"] >= 1 and rec["threads"]["fftw"] >= 1
    for key in ("numpy", "numba", "pyfftw", "scipy"):
        assert rec["versions"][key]
    assert rec["machine"]["cpu_model"] and rec["machine"]["logical_cpus"] >= 1
    assert rec["peak_memory"] > 0 and rec["memory"]["peak_rss_iteration"] > 0

    res = rec["results"]
    for name in PHASES:
        t = res["phases"][name]
        assert t["best"] > 0 and t["median"] >= t["best"] and t["reps"] == len(t["all"])
    # the iteration contains the per-iteration phases (a loose bound: timings are noisy)
    assert res["iteration_best"] > 0.5 * res["phases"]["estep"]["best"]

    prof = res["estep_profile"]
    assert prof["available"], prof.get("reason")
    assert all(v >= 0 for v in prof["seconds"].values())
    assert prof["seconds"]["posteriors"] > 0 and prof["fft_seconds"] > 0
    assert prof["dominant"] in prof["seconds"]
    # the kernel-by-kernel run reproduces the library's statistics
    assert prof["check"]["W_rel_diff"] < 1e-12 and prof["check"]["G_rel_diff"] < 1e-12


def test_unknown_suite_is_an_error(tmp_path, capsys):
    assert bench_main.main(["nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'nonsense'" in capsys.readouterr().err


def test_baseline_route_matches_numbaem():
    """The paper's per-shift route and numbaem give the same posteriors, H and b (tiny case)."""
    from bench._common import Config
    from bench.baseline import verify_tiny

    res = verify_tiny(Config(seed=3))
    for key in ("posteriors_rel_diff", "empty_rel_diff", "loglik_rel_diff", "H_rel_diff", "b_rel_diff"):
        assert res[key] < 1e-10, (key, res[key])
