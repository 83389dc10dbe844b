"""RELION coordinate STAR files: the columns, the axes, the micrographs they name, RELION's angles."""
import math

import mrcfile
import numpy as np
import pytest

from numbaem.data.coordinates import (coordinates_by_micrograph, read_coordinates, relion_angles,
                                      write_coordinates)
from numbaem.data.io import write_image
from numbaem.model.rotations import random_rotations
from numbaem.runtime.errors import NumbaemError


def test_round_trip_and_the_block_and_column_names(tmp_path):
    p = tmp_path / "c.star"
    write_coordinates(p, ["a.mrc", "b.mrc", "a.mrc"], np.array([[3, 4], [10.5, 2], [7, 8]]),
                      extra={"rlnAutopickFigureOfMerit": np.array([0.9, 0.8, 0.7])})
    text = p.read_text()
    assert "data_particles" in text
    for col in ("_rlnMicrographName", "_rlnCoordinateX", "_rlnCoordinateY", "_rlnAutopickFigureOfMerit"):
        assert col in text
    df = read_coordinates(p)
    assert list(df["rlnMicrographName"]) == ["a.mrc", "b.mrc", "a.mrc"]
    np.testing.assert_array_equal(df["rlnCoordinateX"], [3, 10.5, 7])
    np.testing.assert_array_equal(df["rlnCoordinateY"], [4, 2, 8])
    with pytest.raises(NumbaemError, match="exists"):
        write_coordinates(p, ["a.mrc"], np.array([[1, 1]]))


def test_x_is_the_file_fast_axis(tmp_path):
    """A particle whose centre is image pixel (x, y) = (5, 12) is at column 5, row 12 of the MRC
    file (mrcfile's data[row, column]), and the STAR file says rlnCoordinateX = 5, Y = 12."""
    img = np.zeros((20, 30))
    img[5, 12] = 1.0
    mic = tmp_path / "m.mrc"
    write_image(mic, img)
    with mrcfile.open(mic) as f:
        rows, cols = np.nonzero(f.data)
    assert (int(cols[0]), int(rows[0])) == (5, 12)
    star = tmp_path / "c.star"
    write_coordinates(star, [str(mic)], np.argwhere(img > 0))
    df = read_coordinates(star)
    assert (df["rlnCoordinateX"][0], df["rlnCoordinateY"][0]) == (cols[0], rows[0])


def test_micrographs_are_matched_by_path_then_by_name(tmp_path):
    star = tmp_path / "c.star"
    write_coordinates(star, ["/data/run1/m0.mrc", "m1.mrc", "m0.mrc"], np.array([[1, 2], [3, 4], [5, 6]]))
    df = read_coordinates(star)
    out = coordinates_by_micrograph(df, [str(tmp_path / "m0.mrc"), "m1.mrc"])
    np.testing.assert_array_equal(out[0], [[1, 2], [5, 6]])
    np.testing.assert_array_equal(out[1], [[3, 4]])
    with pytest.raises(NumbaemError, match=r"names micrograph\(s\) that were not given \(m1.mrc\)"):
        coordinates_by_micrograph(df, ["m0.mrc"])


def test_bad_files_are_one_sentence(tmp_path):
    with pytest.raises(NumbaemError, match="does not exist"):
        read_coordinates(tmp_path / "none.star")
    bad = tmp_path / "bad.star"
    bad.write_text("data_particles\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\nm.mrc 3\n")
    with pytest.raises(NumbaemError, match="lacks the column"):
        read_coordinates(bad)


def _relion_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix (src/euler.cpp), written out literally (angles in degrees)."""
    a, b, g = (math.radians(v) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(g), math.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([[cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
                     [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
                     [sc, ss, cb]])


def test_relion_angles_give_back_the_rotation(rng):
    """RELION's matrix of the angles written is the rotation w itself (the projector samples F(A^T k))."""
    rots = random_rotations(20, rng)
    for w, (r, t, p) in zip(rots, relion_angles(rots)):
        np.testing.assert_allclose(_relion_matrix(r, t, p), w, atol=1e-12)
