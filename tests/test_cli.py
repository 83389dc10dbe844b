"""The command line, in process: numbers in the files it writes, and one-line errors."""
import json

import mrcfile
import numpy as np
import pytest

from numbaem.model.basis import FBBasis, expand
from numbaem.cli.main import main
from numbaem.runtime.fourier import downsample
from numbaem.data.io import read_image, read_stack, read_volume
from numbaem.model.projection import project
from numbaem.model.rotations import rotation_grid


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def molecule(tmp_path, capsys):
    p = tmp_path / "mol.mrc"
    assert run(["molecule", "-o", str(p), "--size", "15", "--seed", "3", "-q"], capsys)[0] == 0
    return p


def test_molecule_and_project_numbers(tmp_path, molecule, capsys):
    vol, _ = read_volume(molecule)
    assert vol.shape == (15, 15, 15) and abs(vol.max() - 1) < 1e-6
    out = tmp_path / "p.mrcs"
    code, _, _ = run(["project", str(molecule), "-o", str(out), "--patch-size", "7", "--rotations", "5",
                      "--lmax", "3", "-q"], capsys)
    assert code == 0
    stack, _ = read_stack(out)
    b = FBBasis(7, 3)
    ref = project(expand(downsample(vol, 7), b), b, rotation_grid(5))
    np.testing.assert_allclose(stack, ref, atol=1e-6 * np.abs(ref).max())  # float32 on disk
    assert np.array_equal(np.load(tmp_path / "p.rotations.npy"), rotation_grid(5))


def test_simulate_reconstruct_fsc(tmp_path, molecule, capsys):
    mic = tmp_path / "mic.mrc"
    code, _, err = run(["simulate", str(molecule), "-o", str(mic), "--patch-size", "7", "--micrograph-size", "140",
                        "--method", "2", "--density", "0.1", "--snr", "50", "--seed", "1", "-q"], capsys)
    assert code == 0, err
    truth = json.loads((tmp_path / "mic.json").read_text())
    img, _ = read_image(mic)
    assert img.shape == (140, 140) and truth["L"] == 7 and truth["sigma2"] > 0
    est = tmp_path / "est.mrc"
    log = tmp_path / "run.jsonl"
    code, out, err = run(["reconstruct", str(mic), "--patch-size", "7", "-o", str(est), "--init",
                          str(tmp_path / "mic.truth.mrc"), "--noise-var", str(truth["sigma2"]),
                          "--schedule", "lmax=2,iters=2,rotations=30;lmax=3,iters=1,rotations=60",
                          "--truth", str(tmp_path / "mic.truth.mrc"), "--log", str(log), "--json", "-q"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["lmax"] for r in recs] == [2, 2, 3] and [r["K"] for r in recs] == [30, 30, 60]
    assert all(np.isfinite(r["loglik"]) and 0 < r["upsilon"] < 1 and r["fsc_resolution"] > 0 for r in recs)
    assert summary["iterations"] == 3 and summary["lmax"] == 3
    vol, _ = read_volume(est)
    assert vol.shape == (7, 7, 7)
    code, out, err = run(["fsc", str(est), str(tmp_path / "mic.truth.mrc"), "--json", "-q"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert 0 < res["resolution_per_pixel"] <= 3 / 7 + 1e-12 and len(res["fsc"]) == 4
    t, _ = read_volume(tmp_path / "mic.truth.mrc")
    assert abs(res["relative_error"] - np.linalg.norm(vol - t) / np.linalg.norm(t)) < 1e-6
    # the summary's unaligned figure is the same measure on the float64 estimate
    assert abs(res["resolution_per_pixel"] - summary["fsc_resolution_unaligned"]) < 1e-3
    assert summary["relative_error"] <= res["relative_error"] + 1e-3  # alignment does not make it worse


def _assert_one_line_error(code, err, match):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert any(match in ln for ln in lines), err
    assert lines[-1].startswith("numbaem")


def test_bad_inputs_one_sentence(tmp_path, molecule, capsys):
    out = tmp_path / "x.mrc"
    # even L
    code, _, err = run(["simulate", str(molecule), "-o", str(out), "--patch-size", "8"], capsys)
    _assert_one_line_error(code, err, "even")
    # L larger than the map
    code, _, err = run(["project", str(molecule), "-o", str(out), "--patch-size", "21"], capsys)
    _assert_one_line_error(code, err, "larger than the map")
    # unreadable MRC
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(b"not an mrc file at all" * 10)
    code, _, err = run(["fsc", str(junk), str(molecule)], capsys)
    _assert_one_line_error(code, err, "junk.mrc")
    # NaN voxels
    nan = tmp_path / "nan.mrc"
    with mrcfile.new(nan) as m:
        d = np.ones((9, 9, 9), np.float32)
        d[1, 1, 1] = np.nan
        m.set_data(d)
    code, _, err = run(["project", str(nan), "-o", str(out), "--patch-size", "7"], capsys)
    _assert_one_line_error(code, err, "NaN")
    # existing output without --force: refused, untouched
    out.write_bytes(b"keep")
    code, _, err = run(["molecule", "-o", str(out), "--size", "9"], capsys)
    _assert_one_line_error(code, err, "exists")
    assert out.read_bytes() == b"keep"
    # a schedule that makes no sense
    mic = tmp_path / "m.mrc"
    from numbaem.data.io import write_image
    write_image(mic, np.random.default_rng(0).standard_normal((70, 70)))
    code, _, err = run(["reconstruct", str(mic), "--patch-size", "7", "-o", str(tmp_path / "e.mrc"), "--init",
                        "random", "--noise-var", "1", "--schedule", "lmax=2,iters=2,speed=fast"], capsys)
    _assert_one_line_error(code, err, "unknown key")
    code, _, err = run(["reconstruct", str(mic), "--patch-size", "7", "-o", str(tmp_path / "e.mrc"), "--init",
                        "random"], capsys)
    _assert_one_line_error(code, err, "noise")
    assert not (tmp_path / "e.mrc").exists()
    # an initial volume of another size: offer to downsample
    code, _, err = run(["reconstruct", str(mic), "--patch-size", "7", "-o", str(tmp_path / "e.mrc"), "--init",
                        str(molecule), "--noise-var", "1"], capsys)
    _assert_one_line_error(code, err, "--downsample-init")


def test_nonpositive_noise_var_exits_2(tmp_path, capsys):
    """An option's bad value: one sentence under the command's own name, no usage block."""
    with pytest.raises(SystemExit) as exc:
        main(["reconstruct", "m.mrc", "--patch-size", "7", "-o", str(tmp_path / "e.mrc"), "--init", "random",
              "--noise-var", "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("numbaem reconstruct: error:") and "positive" in err
    assert "usage" not in err


def test_messages_a_new_user_met(tmp_path, molecule, capsys):
    """Issue 9's list: each message names the problem in the command line's own words."""
    mic = tmp_path / "m.mrc"
    from numbaem.data.io import write_image
    write_image(mic, np.random.default_rng(0).standard_normal((77, 77)))
    base = ["reconstruct", str(mic), "--patch-size", "11", "-o", str(tmp_path / "e.mrc"), "--init", "random",
            "--noise-var", "1"]
    for schedule, bad in (("lmax=x", "lmax='x'"), ("lmax=x,iters=2", "lmax='x'"), ("lmax=2,iters=two", "iters='two'")):
        code, _, err = run(base + ["--schedule", schedule], capsys)
        _assert_one_line_error(code, err, bad)
        assert "{" not in err and "not a whole number" in err
    code, _, err = run(base + ["--memory", "1KiB", "--schedule", "lmax=2,iters=1,rotations=100"], capsys)
    _assert_one_line_error(code, err, "100 rotations and lmax=2 (")
    # an existing output is refused before any work, in the command line's words
    (tmp_path / "mic.mrc").write_bytes(b"keep")
    code, _, err = run(["simulate", str(molecule), "-o", str(tmp_path / "mic.mrc"), "--patch-size", "7",
                        "--micrograph-size", "5000", "--density", "0.2"], capsys)
    _assert_one_line_error(code, err, "--force")
    assert "force=True" not in err and (tmp_path / "mic.mrc").read_bytes() == b"keep"
    # the usage says that a start is required: --init or --resume
    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    usage = capsys.readouterr().out
    assert "(--init INIT.mrc|random | --resume)" in " ".join(usage.split())


def test_simulate_records_its_seed(tmp_path, molecule, capsys):
    code, _, err = run(["simulate", str(molecule), "-o", str(tmp_path / "s.mrc"), "--patch-size", "7",
                        "--micrograph-size", "70", "--seed", "11", "-q"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["seed"] == 11


def test_demo_reports_each_stage_as_it_ends(tmp_path, capsys, monkeypatch):
    """The demo (at a toy size): Method 1 data, one line per stage printed when the stage
    ends (not all at the end), no progress bars when stderr is not a terminal, and the
    files its help names, with numbers that agree with each other."""
    from numbaem.cli import demo
    from numbaem.em.schedule import Stage
    monkeypatch.setattr(demo, "settings", lambda quick: dict(
        L0=15, L=5, N=150, count=1, density=0.1, homolog_strength=0.6,
        schedule=[Stage(1, 1, 1.0, 20), Stage(2, 2, 1.0, 40)]))
    printed, done = [], [0]
    real_say, real_reconstruct = demo._say, demo.reconstruct

    def counting_reconstruct(*a, callback=None, **kw):
        def cb(state, rec):
            done[0] += 1
            callback(state, rec)
        return real_reconstruct(*a, callback=cb, **kw)

    monkeypatch.setattr(demo, "reconstruct", counting_reconstruct)
    monkeypatch.setattr(demo, "_say", lambda text: (printed.append((text, done[0])), real_say(text)))
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "-o", str(out), "--quick"], capsys)
    assert code == 0, err
    assert "it/s" not in err and "\r" not in err            # no tqdm bars into a redirected stream
    stage_lines = [(t, n) for t, n in printed if t.startswith("after stage")]
    assert [n for _, n in stage_lines] == [1, 3]            # printed as each stage ends
    assert "aligned relative error" in stage_lines[0][0]
    for name in ("estimate.mrc", "truth.mrc", "init.mrc", "micrograph.mrc", "micrograph.json", "run.jsonl",
                 "fsc.png", "convergence.png", "slices.png", "micrograph.png"):
        assert (out / name).exists(), name
    sim = json.loads((out / "micrograph.json").read_text())
    assert sim["method"] == 1 and sim["seed"] == 0
    recs = [json.loads(x) for x in (out / "run.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs] == [1, 2, 2]
    final = [t for t, _ in printed if t.startswith("final estimate")][0]
    assert f"{recs[-1]['relative_error']:.3f}" in final
