"""RELION 3.1 micrographs STAR files: what reconstruct --ctf reads, what simulate writes, and the refusals."""
import pytest

from numbaem.data.star import check_pixel_sizes, read_micrographs_star, write_micrographs_star
from numbaem.model.ctf import CTFParams
from numbaem.runtime.errors import NumbaemError

CTFFIND_LIKE = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnMicrographPixelSize #7
opticsGroup1            1     0.885000   300.000000     2.700000     0.100000     0.885000
opticsGroup2            2     0.885000   200.000000     2.000000     0.070000     0.885000

# version 30001

data_micrographs

loop_
_rlnMicrographName #1
_rlnOpticsGroup #2
_rlnCtfImage #3
_rlnDefocusU #4
_rlnDefocusV #5
_rlnCtfAstigmatism #6
_rlnDefocusAngle #7
_rlnCtfFigureOfMerit #8
_rlnCtfMaxResolution #9
_rlnPhaseShift #10
MotionCorr/job002/Movies/mic_001.mrc     1 CtfFind/job003/Movies/mic_001.ctf:mrc 10864.151367 10595.562500   268.588867    77.029900     0.131930     3.664286     0.000000
MotionCorr/job002/Movies/mic_002.mrc     2 CtfFind/job003/Movies/mic_002.ctf:mrc 20004.000000 19000.000000  1004.000000   -12.500000     0.130000     3.700000    35.000000
"""


@pytest.fixture
def star(tmp_path):
    p = tmp_path / "micrographs_ctf.star"
    p.write_text(CTFFIND_LIKE)
    return p


def test_reads_a_relion_micrographs_file(star):
    got = read_micrographs_star(star, ["/data/mic_002.mrc", "mic_001.mrc"])   # matched by base name, in given order
    assert got.pixel_size == 0.885
    a, b = got.params
    assert (a.defocus_u, a.defocus_v, a.defocus_angle, a.phase_shift) == (20004.0, 19000.0, -12.5, 35.0)
    assert (a.voltage, a.cs, a.amplitude_contrast) == (200.0, 2.0, 0.07)
    assert (b.defocus_u, b.defocus_v, b.defocus_angle, b.voltage) == (10864.151367, 10595.5625, 77.0299, 300.0)


def test_write_then_read_round_trip(tmp_path):
    ps = [CTFParams(15000.5, 14000.0, 30.0), CTFParams(25000.0, 24000.0, 100.0, voltage=200.0, cs=2.0,
                                                         amplitude_contrast=0.07, phase_shift=10.0)]
    path = tmp_path / "sim_ctf.star"
    write_micrographs_star(path, ["a.mrc", "b.mrc"], ps, 3.3)
    got = read_micrographs_star(path, ["a.mrc", "b.mrc"])
    assert got.params == ps and got.pixel_size == 3.3
    with pytest.raises(NumbaemError, match="exists"):
        write_micrographs_star(path, ["a.mrc", "b.mrc"], ps, 3.3)


def _edit(star, old, new):
    star.write_text(CTFFIND_LIKE.replace(old, new))
    return star


@pytest.mark.parametrize("old,new,match", [
    ("_rlnDefocusV #5", "_rlnSomethingElse #5", "lacks the column.*rlnDefocusV"),
    ("_rlnVoltage #4", "_rlnVoltageX #4", "data_optics block lacks.*rlnVoltage"),
    ("data_optics", "data_opticz", "no data_optics"),
    ("10864.151367 10595.562500", "-10864.151367 10595.562500", "rlnDefocusU of mic_001.mrc is -10864"),
    ("10864.151367 10595.562500", "10864.151367 nan", "rlnDefocusV of mic_001.mrc is nan"),
    ("MotionCorr/job002/Movies/mic_002.mrc     2", "MotionCorr/job002/Movies/mic_002.mrc     3", "optics group 3"),
])
def test_bad_star_files(star, old, new, match):
    _edit(star, old, new)
    with pytest.raises(NumbaemError, match=match):
        read_micrographs_star(star, ["mic_001.mrc", "mic_002.mrc"])


def test_micrographs_and_rows_must_match(star):
    with pytest.raises(NumbaemError, match="names 1 micrograph.*not given.*mic_002.mrc"):
        read_micrographs_star(star, ["mic_001.mrc"])
    with pytest.raises(NumbaemError, match="mic_003.mrc is not in"):
        read_micrographs_star(star, ["mic_001.mrc", "mic_002.mrc", "mic_003.mrc"])
    with pytest.raises(NumbaemError, match="does not exist"):
        read_micrographs_star(str(star) + ".nope", ["mic_001.mrc"])


def test_pixel_size_check():
    check_pixel_sizes(1.0, 1.0099, "x.star")
    check_pixel_sizes(1.0, None, "x.star")
    with pytest.raises(NumbaemError, match="more than 1% apart"):
        check_pixel_sizes(1.0, 1.0102, "x.star")
