"""Smoke tests of the benchmark harness (quick sizes, in process) and of its pieces that carry figures."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

bench_main = pytest.importorskip("bench.main")

PHASES = ("build_A", "projections_spectra", "estep", "normal_equations", "solve", "iteration")


def _only(directory, suite):
    files = sorted(Path(directory).glob(f"bench-{suite}-*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


def test_small_quick_runs_the_cli_on_simulated_data(tmp_path):
    status = bench_main.main(["small", "--quick", "--out", str(tmp_path)])
    assert status == 0
    rec = _only(tmp_path, "small")
    assert (tmp_path / rec["plot"]).stat().st_size > 1000
    assert rec["suite"] == "small" and rec["quick"] is True and rec["schema"] == 2

    # the data: made by numbaem simulate at SNR 1, Method 2, written as MRC files in the cache
    d = rec["data"]
    assert d["snr_requested"] == 1.0 and d["method"] == 2 and d["L"] == 7
    assert abs(d["snr_after_downsampling"] - 1.0) < 1e-9          # Method 2 keeps the SNR (float sums)
    assert d["reused"] is False and d["commands"][-1].startswith("numbaem simulate")
    files = [Path(d["directory"]) / m for m in d["micrographs"]]
    assert all(f.suffix == ".mrc" and f.stat().st_size > 0 for f in files)
    assert Path(d["directory"]).parent == tmp_path / "data"

    p = rec["params"]
    assert (p["L"], p["lmax"], p["M"]) == (7, 4, 34)
    assert p["patches"] == p["patches_in_source"] == d["patches"] == 400
    assert rec["threads"]["numba"] >= 1 and rec["threads"]["fftw"] >= 1
    for key in ("numpy", "numba", "pyfftw", "scipy"):
        assert rec["versions"][key]
    assert rec["machine"]["cpu_model"] and rec["machine"]["logical_cpus"] >= 1

    res = rec["results"]
    # the iteration figures are numbaem reconstruct's own log records
    cli = res["cli"]
    assert cli["command"].startswith("numbaem reconstruct") and "--log" in cli["command"]
    assert cli["iterations"] == len(cli["records"]) == 2
    assert cli["seconds"]["all"] == [r["seconds"] for r in cli["records"]]
    for r in cli["records"]:
        assert r["seconds"] >= r["seconds_estep"] > 0 and r["patches"] == 400
        assert 0 < r["relative_error"] < 1                           # --truth was passed
    for name in PHASES:
        t = res["phases"][name]
        assert t["best"] > 0 and t["median"] >= t["best"] and t["reps"] == len(t["all"])

    m = rec["memory"]
    assert m["peak_rss"] == max(r["peak_memory"] for r in cli["records"])
    assert m["budget_bytes"] > 0 and m["within_budget"] == (m["peak_rss"] <= m["budget_bytes"])
    assert 0 < m["mapped_micrographs_resident"] <= sum(f.stat().st_size for f in files) + 8192

    e = res["estep"]
    prof = e["profile"]
    assert prof["available"], prof.get("reason")
    assert prof["seconds"]["posteriors"] > 0 and prof["fft_seconds"] > 0
    k = e["kernels"]
    assert k["available"]
    for step in ("products", "fft_backward", "posteriors", "fft_forward", "accumulate"):
        s = k["steps"][step]
        assert s["bound_seconds"] > 0 and s["distance"] == pytest.approx(s["seconds"] / s["bound_seconds"])
    assert sum(s["share"] for s in k["steps"].values()) <= 1.0 + 1e-12
    assert 0 < e["blocks"]["evaluated_fraction"] <= 1
    pk = e["peaks"]
    assert pk["c2r_per_s"] > 0 and pk["r2c_per_s"] > 0 and pk["exp_per_s"] > 0 and pk["bandwidth"] > 0


def test_data_cache_is_reused_only_when_the_parameters_match(tmp_path):
    from bench._data import DataSpec, prepare

    spec = DataSpec("t", L=5, micrograph_size=30, count=2)
    a = prepare(spec, tmp_path)
    assert not a.reused and len(a.micrographs) == 2 and a.simulation["snr"] == 1.0
    b = prepare(spec, tmp_path)
    assert b.reused and b.directory == a.directory
    c = prepare(DataSpec("t", L=5, micrograph_size=30, count=2, snr=2.0), tmp_path)
    assert not c.reused and c.directory != a.directory and c.simulation["snr"] == 2.0
    # a damaged cache (a file of the wrong size) is simulated again, not used
    a.micrographs[0].write_bytes(b"x")
    d = prepare(spec, tmp_path)
    assert not d.reused and d.micrographs[0].stat().st_size > 1
    assert not list(tmp_path.glob(".*tmp*"))                         # nothing half-written left behind


def test_unknown_suite_is_an_error(tmp_path, capsys):
    assert bench_main.main(["nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'nonsense'" in capsys.readouterr().err


def test_paper_route_mstep_equals_numbaem_on_the_same_posteriors():
    """The paper's eqs. 28-30 with explicit A_kl and numbaem's normal equations: the same H and b.

    Observed about 1e-15 (the two sum the same terms in other orders, numbaem's through
    FFTs of size 2L); 1e-12 leaves room for the summation order at other sizes and seeds.
    """
    from bench._common import Config
    from bench.baseline import verify_tiny

    res = verify_tiny(Config(seed=3))
    for key in ("H_rel_diff", "b_rel_diff", "theta_rel_diff", "posterior_normalisation_error"):
        assert res[key] < 1e-12, (key, res[key])


def test_paper_route_shift_operator_is_crop_shift_pad():
    """``A_kl`` of the baseline is ``C T_l Z A_k`` (theory section 4), pixel by pixel on a random operator."""
    from bench.baseline import PaperRoute

    rng = np.random.default_rng(0)
    L, K, M = 3, 2, 4
    A = rng.standard_normal((K, L * L, M))
    pr = PaperRoute(A, L)
    Akl = pr.shifted_operators()
    x = rng.standard_normal(M)
    s = 0
    for l1 in pr.keep:
        for l2 in pr.keep:
            for k in range(K):
                z = np.zeros((2 * L, 2 * L))
                z[:L, :L] = (A[k] @ x).reshape(L, L)
                want = np.roll(z, (l1, l2), axis=(0, 1))[:L, :L]      # (T_l u)[n] = u[n - l], then crop
                np.testing.assert_allclose((Akl[k, s] @ x).reshape(L, L), want, rtol=0, atol=1e-12)
            s += 1
    assert s == (2 * L - 1) ** 2


def test_table_quotes_the_reference_files(tmp_path):
    """Every row of the README table comes from a reference file's numbers, not from typed text."""
    from bench import table
    from bench._common import fmt_seconds

    records = table.load()
    assert set(records) == set(table.ORDER), "bench/reference/ must hold one file per suite"
    text = table.table(records)
    p = records["paper-v1"]
    assert f"{fmt_seconds(p['results']['iteration_seconds'])} s per EM iteration" in text
    assert f"{fmt_seconds(records['small']['results']['iteration_best'])} s per iteration" in text
    assert f"M-step {fmt_seconds(records['baseline']['results']['paper']['mstep'])} s" in text
    for suite in table.ORDER:
        assert f"bench/reference/{suite}.json" in text
    # --store strips long lists and writes <suite>.json
    big = dict(records["small"], long=list(range(1000)))
    src = tmp_path / "bench-small-x.json"
    src.write_text(json.dumps(big))
    (out,) = table.store([src], tmp_path / "ref")
    stored = json.loads(out.read_text())
    assert out.name == "small.json" and stored["long"]["length"] == 1000 and stored["long"]["stripped_list"]


def test_search_decisions_quick_pins_the_exhaustive_equality(tmp_path):
    """``python -m bench.search decisions --quick``: with prune 0 the search's H is the
    exhaustive one's to round-off on SNR-100 data (where coarse masses read 0), the bound
    does better than the defaults, and the record carries every row the theory's table
    quotes."""
    search_bench = pytest.importorskip("bench.search")
    search_bench.main(["decisions", "--quick", "--out", str(tmp_path)])
    files = sorted(Path(tmp_path).glob("search-decisions-*.json"))
    assert len(files) == 1
    rec = json.loads(files[0].read_text())
    rows = rec["rows"]
    assert len(rows) == 5 and rows[0]["e_step"].startswith("exhaustive")
    assert rows[1]["H_relative_difference"] < 1e-10 and rows[1]["b_relative_difference"] < 1e-10
    assert abs(rows[1]["error"] - rows[0]["error"]) < 1e-8
    assert rows[1]["pairs"] == rec["params"]["patches"] * (72 + 576 + 4608)
    # the bound finds the peaks the defaults' masses miss: its M-step is the exhaustive one's to
    # far closer than the defaults'
    assert rows[4]["e_step"].endswith("bound")
    assert abs(rows[4]["error"] - rows[0]["error"]) < 0.1 * (rows[3]["error"] - rows[0]["error"])
