"""The picking commands in process: numbaem pick, reconstruct --particles / --write-particles /
--init MODEL / --restarts, molecule --from-model; numbers read back from the files written."""
import json

import numpy as np
import pytest

from numbaem.analysis.picking import match_picks
from numbaem.cli.main import main
from numbaem.data.coordinates import read_coordinates
from numbaem.data.io import read_volume, write_image, write_volume
from numbaem.sim.atomic import model_density
from numbaem.sim.molecule import synthetic_molecule
from numbaem.sim.simulate import simulate_micrographs

SCHEDULE = "lmax=2,iters=1,rotations=30;lmax=3,iters=2,rotations=60"


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 140 x 140 micrographs, L = 7, SNR 4 (Method 2), the truth volume and the true centres."""
    d = tmp_path_factory.mktemp("pickdata")
    sim = simulate_micrographs(synthetic_molecule(7, rng=0), 7, micrograph_size=140, method=2, density=0.1,
                               snr=4.0, count=2, rng=3)
    mics = []
    for i, img in enumerate(sim.micrographs):
        p = d / f"mic_{i}.mrc"
        write_image(p, img)
        mics.append(str(p))
    write_volume(d / "truth.mrc", sim.truth_volume)
    return dict(dir=d, mics=mics, truth=str(d / "truth.mrc"), sigma2=sim.sigma2,
                centres=[p + 3 for p in sim.positions])


def _centres(star, mics):
    df = read_coordinates(star)
    return [df.loc[df["rlnMicrographName"] == m, ["rlnCoordinateX", "rlnCoordinateY"]].to_numpy() for m in mics]


def test_pick_then_reconstruct_on_boxes(data, tmp_path, capsys):
    star = tmp_path / "coords.star"
    code, out, err = run(["pick", *data["mics"], "-o", str(star), "--patch-size", "7", "--init", data["truth"],
                          "--noise-var", str(data["sigma2"]), "--rotations", "100", "--json", "-q"], capsys)
    assert code == 0, err
    m = match_picks(_centres(star, data["mics"]), data["centres"], 1)
    assert m["precision"] >= 0.95 and m["recall"] >= 0.95, m
    assert json.loads(out)["picks"] == m["picks"]
    est = tmp_path / "est.mrc"
    code, out, err = run(["reconstruct", *data["mics"], "--patch-size", "7", "-o", str(est), "--init", data["truth"],
                          "--noise-var", str(data["sigma2"]), "--particles", str(star), "--schedule", SCHEDULE,
                          "--truth", data["truth"], "--json", "-q"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["patches"] == m["picks"]                 # one box per pick (none at an edge here)
    assert s["relative_error"] < 0.3 and s["upsilon"] < 0.1, s     # boxes hold particles: few empty


def test_blob_picking_without_a_model(data, tmp_path, capsys):
    star = tmp_path / "blobs.star"
    code, _, err = run(["pick", *data["mics"], "-o", str(star), "--patch-size", "7", "--estimate-noise", "-q"], capsys)
    assert code == 0, err
    m = match_picks(_centres(star, data["mics"]), data["centres"], 1)
    assert m["precision"] >= 0.9 and m["recall"] >= 0.6, m


def test_write_particles_from_the_posteriors(data, tmp_path, capsys):
    star = tmp_path / "post.star"
    code, out, err = run(["reconstruct", *data["mics"], "--patch-size", "7", "-o", str(tmp_path / "e.mrc"),
                          "--init", data["truth"], "--noise-var", str(data["sigma2"]), "--schedule", SCHEDULE,
                          "--write-particles", str(star), "--json", "-q"], capsys)
    assert code == 0, err
    m = match_picks(_centres(star, data["mics"]), data["centres"], 1)
    assert m["precision"] >= 0.9 and m["recall"] >= 0.9, m
    df = read_coordinates(star)
    assert {"rlnAutopickFigureOfMerit", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} <= set(df.columns)
    assert df["rlnAutopickFigureOfMerit"].min() >= 0.5 and json.loads(out)["particles_written"] == len(df)


def test_restarts_keep_the_highest_log_likelihood(data, tmp_path, capsys):
    code, out, err = run(["reconstruct", *data["mics"], "--patch-size", "7", "-o", str(tmp_path / "r.mrc"),
                          "--init", "random", "--restarts", "2", "--anneal", "3,1", "--noise-var", str(data["sigma2"]),
                          "--schedule", SCHEDULE, "--json", "-q"], capsys)
    assert code == 0, err
    r = json.loads(out)["restarts"]
    assert len(r) == 2 and sum(x["kept"] for x in r) == 1
    assert r[int(np.argmax([x["loglik"] for x in r]))]["kept"]
    assert json.loads(out)["history"][0]["temperature"] == 3.0


def test_atomic_model_map_and_start(data, tmp_path, capsys):
    out = tmp_path / "hiv.mrc"
    code, _, err = run(["molecule", "--from-model", "1hvr", "-o", str(out), "--pixel-size", "7", "--size", "11", "-q"],
                       capsys)
    assert code == 0, err
    vol, px = read_volume(out)
    assert px == pytest.approx(7.0)
    np.testing.assert_allclose(vol, model_density("1hvr", 11, 7.0), rtol=0, atol=1e-6 * np.abs(vol).max())  # float32
    code, o, err = run(["reconstruct", *data["mics"], "--patch-size", "7", "-o", str(tmp_path / "m.mrc"), "--init",
                        "1hvr", "--pixel-size", "9", "--noise-var", str(data["sigma2"]), "--schedule", SCHEDULE,
                        "--json", "-q"], capsys)
    assert code == 0, err
    assert np.isfinite(json.loads(o)["history"][0]["loglik"])


@pytest.mark.parametrize("argv, message", [
    (["molecule", "--from-model", "BAD", "-o", "x.mrc", "--pixel-size", "2"], "gemmi cannot read the atomic model"),
    (["molecule", "--from-model", "1hvr", "-o", "x.mrc"], "--from-model needs --pixel-size"),
    (["reconstruct", "MIC0", "--patch-size", "7", "-o", "x.mrc", "--init", "1hvr", "--noise-var", "1"],
     "carry no pixel size"),
    (["reconstruct", "MIC0", "--patch-size", "7", "-o", "x.mrc", "--init", "BAD", "--noise-var", "1",
      "--pixel-size", "3"], "gemmi cannot read the atomic model"),
    (["reconstruct", "MIC0", "--patch-size", "7", "-o", "x.mrc", "--init", "TRUTH", "--noise-var", "1",
      "--particles", "OTHER"], "names micrograph"),
    (["pick", "MIC0", "-o", "c.star", "--patch-size", "7", "--noise-var", "1", "--init", "BAD"],
     "gemmi cannot read the atomic model"),
    (["reconstruct", "MIC0", "--patch-size", "7", "-o", "x.mrc", "--init", "TRUTH", "--noise-var", "1",
      "--restarts", "2"], "--restarts needs --init random"),
])
def test_bad_input_is_one_sentence(data, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.pdb"
    bad.write_text("not a model\n")
    (tmp_path / "bad.cif").write_text("not a model\n")
    other = tmp_path / "other.star"
    other.write_text("data_particles\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
                     "elsewhere.mrc 20 30\n")
    subst = {"MIC0": data["mics"][0], "BAD": str(tmp_path / "bad.cif"), "TRUTH": data["truth"], "OTHER": str(other)}
    argv = [subst.get(a, a).replace("x.mrc", str(tmp_path / "x.mrc")).replace("c.star", str(tmp_path / "c.star"))
            for a in argv]
    code, _, err = run(argv + ["-q"], capsys)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.mrc").exists() and not (tmp_path / "c.star").exists()
