"""examples/picking_limit.py: the crossover it reports, and its refusals (in process)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("picking_limit", ROOT / "examples" / "picking_limit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_crossover_interpolates_in_log2_snr(example):
    snr = [1, 0.5, 0.25, 0.125]
    # direct EM worse at 1 and 0.5 (by 0.1), better from 0.25 down (by 0.2): zero a third of the way in log2
    assert example.crossover(snr, [0.3, 0.4, 0.5, 0.6], [0.2, 0.3, 0.7, 0.9]) == pytest.approx(2 ** (-1 - 1 / 3))
    assert example.crossover(snr, [0.3, 0.4, 0.5, 0.6], [0.2, 0.3, 0.4, 0.5]) is None     # never wins
    assert example.crossover(snr, [0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.5]) == 1.0      # always wins
    # no reconstruction (NaN) counts as a win of direct EM; the crossing is put at that point
    nan = float("nan")
    assert example.crossover(snr, [0.3, 0.4, 0.5, 0.6], [0.2, 0.3, nan, nan]) == 0.25
    assert example.crossover(snr, [0.3, 0.4, 0.5, 0.6], [0.2, 0.3, 0.7, nan]) == pytest.approx(2 ** (-1 - 1 / 3))
    # a win at 0.5 that is lost again at 0.25 does not count: the crossing is the last one
    assert example.crossover(snr, [0.3, 0.2, 0.5, 0.6], [0.2, 0.3, 0.4, 0.9]) == pytest.approx(2 ** -2.25)


@pytest.mark.parametrize("argv, message", [
    (["--memory", "1MiB"], "but the budget is 1.0 MiB; use fewer or smaller micrographs"),
    (["--snr", "1", "-0.5"], "SNR -0.5 is not a positive number"),
    (["--molecules", "ribosome"], "molecule 'ribosome' is not one of"),
    (["--L", "8"], "--L=8 is even"),
])
def test_bad_input_is_one_sentence_and_exit_2(example, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert example.main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
