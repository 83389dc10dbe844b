"""Hostile input, property-based: corrupted MRC files and random option values at the CLI.

Every case must end in one clear sentence and exit status 2 (or succeed), never a
traceback, a hang or a partly written output.
"""
import os

import mrcfile
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from numbaem.cli.main import main

HOSTILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_mrc_bytes(shape, dtype=np.float32):
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "v.mrc")
        with mrcfile.new(p) as m:
            m.set_data(np.random.default_rng(0).standard_normal(shape).astype(dtype))
        with open(p, "rb") as fh:
            return fh.read()


VOLUME = _valid_mrc_bytes((9, 9, 9))


def _check(code, err, outputs):
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code:
        assert err.strip().splitlines()[-1].startswith("numbaem"), err
        for p in outputs:
            assert not os.path.exists(p), p
    leftovers = [f for f in os.listdir(os.path.dirname(outputs[0])) if f.startswith(".tmp") or f.endswith(".tmp")]
    assert not leftovers


@HOSTILE
@given(cut=st.integers(0, len(VOLUME) - 1), flips=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)),
                                                          max_size=6))
def test_corrupted_mrc_volume(tmp_path_factory, capsys, cut, flips):
    d = tmp_path_factory.mktemp("h")
    data = bytearray(VOLUME)
    for pos, val in flips:
        data[pos] = val
    data = bytes(data[:cut]) if cut > 0 else bytes(data)
    src = d / "in.mrc"
    src.write_bytes(data)
    out = d / "out.mrcs"
    code = main(["project", str(src), "-o", str(out), "--patch-size", "5", "--rotations", "3", "-q"])
    _, err = capsys.readouterr()
    _check(code, err, [str(out)])


@HOSTILE
@given(L=st.integers(-5, 40), snr=st.floats(allow_nan=True, allow_infinity=True),
       density=st.floats(allow_nan=True, allow_infinity=True), size=st.integers(-3, 120))
def test_random_simulate_options(tmp_path_factory, capsys, L, snr, density, size):
    d = tmp_path_factory.mktemp("s")
    src = d / "in.mrc"
    src.write_bytes(VOLUME)
    out = d / "mic.mrc"
    argv = ["simulate", str(src), "-o", str(out), "--patch-size", str(L), "--snr", repr(snr), "--density",
            repr(density), "--micrograph-size", str(size), "--method", "2", "-q"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage and one line, status 2
        code = exc.code
    _, err = capsys.readouterr()
    _check(code, err, [str(out), str(d / "mic.json"), str(d / "mic.truth.mrc")])


@HOSTILE
@given(kind=st.sampled_from(["nan", "inf", "int8", "zero", "stack"]))
def test_bad_micrographs_for_reconstruct(tmp_path_factory, capsys, kind):
    d = tmp_path_factory.mktemp("r")
    mic = d / "m.mrc"
    img = np.random.default_rng(1).standard_normal((35, 35)).astype(np.float32)
    if kind == "nan":
        img[3, 3] = np.nan
    elif kind == "inf":
        img[0, 0] = np.inf
    with mrcfile.new(mic) as m:
        if kind == "int8":
            m.set_data((img * 10).astype(np.int8))
        elif kind == "zero":
            m.set_data(np.zeros((2, 2), np.float32))
        elif kind == "stack":
            m.set_data(np.zeros((3, 4, 4), np.float32))
        else:
            m.set_data(img)
    out = d / "e.mrc"
    code = main(["reconstruct", str(mic), "--patch-size", "7", "-o", str(out), "--init", "random", "--noise-var",
                 "1", "--schedule", "lmax=1,iters=1,rotations=5", "-q"])
    _, err = capsys.readouterr()
    _check(code, err, [str(out)])
