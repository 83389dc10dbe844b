"""numbaem simulate --orientation-prior / --junk and reconstruct --orientation-prior / --junk-class
end to end: the truth recorded, the outputs written, bad values refused in one sentence."""
import json

import numpy as np
import pytest

from numbaem.cli.main import main
from numbaem.sim.simulate import simulate_micrographs
from numbaem.sim.views import viewing_directions

from test_cli import _assert_one_line_error, molecule, run  # noqa: F401 (fixture)
from test_simulate import _blobs


def test_simulation_switched_off_gives_the_same_bits_and_on_records_the_truth():
    vol = _blobs(21)
    kw = dict(micrograph_size=120, density=0.15, snr=1.0, count=1, rng=3)
    for method in (1, 2):
        a = simulate_micrographs(vol, 7, method=method, **kw)
        b = simulate_micrographs(vol, 7, method=method, views=None, junk=0.0, **kw)
        assert np.array_equal(a.micrographs[0], b.micrographs[0]) and a.sigma2 == b.sigma2 and b.junk is None
    c = simulate_micrographs(vol, 7, method=2, views="top:0.9", junk=0.3, **kw)
    T = len(c.positions[0])
    assert c.views == "top:0.9" and c.junk[0].sum() == round(0.3 * T)
    vz = viewing_directions(c.rotations[0])[:, 2]
    assert np.mean(vz > np.cos(np.radians(30))) > 0.6       # about 0.9 of them within the ~13-degree cap
    # the SNR counts the particles only: sigma2 from their energy alone
    from numbaem.model.basis import FBBasis
    from numbaem.model.projection import project
    P = project(c.truth_theta, FBBasis(7, c.lmax), c.rotations[0][~c.junk[0]])
    assert c.sigma2 == pytest.approx(np.mean(np.sum(P ** 2, axis=(1, 2))) / 49, rel=1e-12)


def test_cli_extensions_end_to_end(tmp_path, molecule, capsys):  # noqa: F811
    mic = tmp_path / "mic.mrc"
    code, _, err = run(["simulate", str(molecule), "-o", str(mic), "--patch-size", "7", "--micrograph-size", "140",
                        "--method", "2", "--density", "0.1", "--snr", "20", "--seed", "1", "--orientation-prior",
                        "top:0.6", "--junk", "0.2", "-q"], capsys)
    assert code == 0, err
    truth = json.loads((tmp_path / "mic.json").read_text())
    assert truth["orientation_prior"] == "top:0.6" and truth["junk_fraction"] == 0.2
    assert sum(map(sum, truth["junk"])) == round(0.2 * truth["projections_per_micrograph"])
    est = tmp_path / "est.mrc"
    code, out, err = run(["reconstruct", str(mic), "--patch-size", "7", "-o", str(est), "--init",
                          str(tmp_path / "mic.truth.mrc"), "--noise-var", str(truth["sigma2"]),
                          "--schedule", "lmax=2,iters=2,rotations=60", "--orientation-prior", "1", "--junk-class",
                          "--json", "-q"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert len(s["orientation_prior"]["weights"]) == 12 and abs(sum(s["orientation_prior"]["distribution"]) - 1) < 1e-12
    # 60 rotations (a 63-degree step) do not resolve 59-degree cells at the default ratio: held uniform
    assert s["orientation_prior"]["grid_ratio"] == 0.6 and s["orientation_prior"]["weights"] == [1.0] * 12
    # a ratio that lets them update it (also infinite, with a checkpoint: JSON has no infinity)
    for ratio, recorded in (("1.5", 1.5), ("inf", None)):
        code, out, err = run(["reconstruct", str(mic), "--patch-size", "7", "-o", str(tmp_path / f"r{ratio}.mrc"),
                              "--init", str(tmp_path / "mic.truth.mrc"), "--noise-var", str(truth["sigma2"]),
                              "--schedule", "lmax=2,iters=2,rotations=60", "--orientation-prior", "1",
                              "--prior-grid-ratio", ratio, "--checkpoint", str(tmp_path / f"ck{ratio}"), "--json",
                              "-q"], capsys)
        assert code == 0, err
        r = json.loads(out)["orientation_prior"]
        assert r["grid_ratio"] == recorded and r["weights"] != [1.0] * 12
    assert 0 < s["junk_class"]["varsigma"] < 1
    assert s["junk_class"]["model"] == "field" and len(s["junk_class"]["spectrum"]) == 5
    assert (tmp_path / "est_views.png").stat().st_size > 1000 and (tmp_path / "est_junk.png").stat().st_size > 1000
    assert not (tmp_path / "est_junk.mrc").exists()
    code, out, err = run(["reconstruct", str(mic), "--patch-size", "7", "-o", str(tmp_path / "img.mrc"), "--init",
                          str(tmp_path / "mic.truth.mrc"), "--noise-var", str(truth["sigma2"]),
                          "--schedule", "lmax=2,iters=1,rotations=60", "--junk-class", "image", "--json", "-q"], capsys)
    assert code == 0, err
    assert json.loads(out)["junk_class"]["model"] == "image" and (tmp_path / "img_junk.mrc").exists()
    # bad values: one sentence, exit 2, nothing written
    for extra, match in ((["--orientation-prior", "0"], "power of two"), (["--prior-floor", "1.5",
                          "--orientation-prior"], "floor"), (["--prior-grid-ratio", "0", "--orientation-prior"], "grid ratio"),
                         (["--junk-class", "--schedule", "lmax=2,iters=1,fine=30"], "exhaustive")):
        code, _, err = run(["reconstruct", str(mic), "--patch-size", "7", "-o", str(tmp_path / "x.mrc"),
                            "--init", "random", "--noise-var", "1", "-q"] + extra, capsys)
        _assert_one_line_error(code, err, match)
        assert not (tmp_path / "x.mrc").exists()
    for extra, match in ((["--junk", "1.5"], "--junk"), (["--orientation-prior", "top:2"], "fraction")):
        code, _, err = run(["simulate", str(molecule), "-o", str(tmp_path / "y.mrc"), "--patch-size", "7", "-q"]
                           + extra, capsys)
        _assert_one_line_error(code, err, match)


def test_junk_model_is_part_of_a_checkpoints_inputs(tmp_path, molecule, capsys):  # noqa: F811
    """A checkpoint made with --junk-class image resumes with --junk-class image (recorded as
    before the field existed, so older checkpoints resume) and refuses the field in one sentence."""
    mic = tmp_path / "mic.mrc"
    code, _, err = run(["simulate", str(molecule), "-o", str(mic), "--patch-size", "7", "--micrograph-size", "98",
                        "--method", "2", "--density", "0.1", "--snr", "20", "--seed", "1", "--junk", "0.2", "-q"],
                       capsys)
    assert code == 0, err
    ck = tmp_path / "ck"
    base = ["reconstruct", str(mic), "--patch-size", "7", "-o", str(tmp_path / "est.mrc"), "--noise-var", "0.01",
            "--schedule", "lmax=2,iters=1,rotations=30", "--checkpoint", str(ck), "-q"]
    code, _, err = run(base + ["--init", "random", "--junk-class", "image"], capsys)
    assert code == 0, err
    ext = json.loads((ck / "state.json").read_text())["inputs"]["extensions"]
    assert ext == dict(orientation_prior=None, prior_floor=0.05, junk_class=True)    # the keys older ones hold
    code, _, err = run(base + ["--resume", "--junk-class", "field", "--force"], capsys)
    _assert_one_line_error(code, err, "another run")
    code, _, err = run(base + ["--resume", "--junk-class", "image", "--force"], capsys)
    assert code == 0, err
