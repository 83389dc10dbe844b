"""MRC round trips, the axis convention, atomic writes and refusal of bad files."""
import json
import os
import warnings

import mrcfile
import numpy as np
import pytest

from numbaem.runtime.errors import NumbaemError
from numbaem.data.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_output,
    read_image,
    read_stack,
    read_volume,
    write_image,
    write_stack,
    write_volume,
)

# Data go through float32 on disk: relative round-off 2^-24 ~ 6e-8.
F32_RTOL = 1e-7


def _asymmetric(shape):
    """An array whose every entry differs, so any transposition shows."""
    return np.arange(np.prod(shape), dtype=np.float64).reshape(shape) / 7.0 - 3.0


def _leftovers(directory, keep):
    """Files in ``directory`` other than ``keep`` (temporary files left behind)."""
    return sorted(set(os.listdir(directory)) - set(keep))


def _write_raw(path, data_zyx, voxel_size=None):
    """Write with mrcfile directly, bypassing numbaem's checks."""
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        # mrcfile warns when its header statistics meet NaN; the tests want NaN files.
        warnings.filterwarnings("ignore", "Data array contains NaN", RuntimeWarning)
        mrc.set_data(np.asarray(data_zyx, dtype=np.float32))
        if voxel_size is not None:
            mrc.voxel_size = voxel_size


# ------------------------------------------------------------------ round trips


def test_volume_round_trip_values_axes_and_voxel_size(tmp_path, rng):
    vol = rng.standard_normal((5, 5, 5))
    path = tmp_path / "vol.mrc"
    write_volume(path, vol, voxel_size=1.25)
    got, voxel_size = read_volume(path)
    assert got.dtype == np.float64 and got.shape == (5, 5, 5) and got.flags.c_contiguous
    np.testing.assert_allclose(got, vol, rtol=F32_RTOL, atol=1e-7)
    assert voxel_size == pytest.approx(1.25)
    assert _leftovers(tmp_path, ["vol.mrc"]) == []


def test_volume_axis_order_is_kept_and_disk_order_is_zyx(tmp_path):
    vol = np.zeros((5, 5, 5))
    vol[1, 0, 0] = 1.0  # x = 1
    vol[0, 2, 0] = 2.0  # y = 2
    vol[0, 0, 3] = 3.0  # z = 3
    vol += _asymmetric((5, 5, 5)) * 1e-3
    path = tmp_path / "vol.mrc"
    write_volume(path, vol)
    got, _ = read_volume(path)
    assert got[1, 0, 0] != got[0, 1, 0]
    np.testing.assert_allclose(got, vol, rtol=F32_RTOL, atol=1e-7)
    with mrcfile.open(path) as mrc:
        on_disk = np.array(mrc.data)
        assert (int(mrc.header.nx), int(mrc.header.ny), int(mrc.header.nz)) == (5, 5, 5)
    np.testing.assert_array_equal(on_disk, vol.transpose(2, 1, 0).astype(np.float32))
    assert on_disk[0, 0, 1] == pytest.approx(vol[1, 0, 0], rel=F32_RTOL)  # [z, y, x]


def test_volume_from_other_software_reads_with_x_first(tmp_path):
    data_zyx = _asymmetric((3, 3, 3))
    path = tmp_path / "ext.mrc"
    _write_raw(path, data_zyx, voxel_size=2.0)
    vol, voxel_size = read_volume(path)
    np.testing.assert_allclose(vol, data_zyx.transpose(2, 1, 0), rtol=F32_RTOL)
    assert voxel_size == pytest.approx(2.0)


def test_voxel_size_none_when_unset(tmp_path, rng):
    path = tmp_path / "vol.mrc"
    write_volume(path, rng.standard_normal((3, 3, 3)))
    assert read_volume(path)[1] is None


def test_image_round_trip_non_square(tmp_path):
    img = _asymmetric((6, 4))  # 6 along x, 4 along y
    path = tmp_path / "img.mrc"
    write_image(path, img, pixel_size=3.5)
    got, pixel_size = read_image(path)
    assert got.shape == (6, 4) and got.dtype == np.float64
    np.testing.assert_allclose(got, img, rtol=F32_RTOL, atol=1e-7)
    assert pixel_size == pytest.approx(3.5)
    with mrcfile.open(path) as mrc:
        assert mrc.data.shape == (4, 6)  # [y, x]
        np.testing.assert_array_equal(mrc.data, img.T.astype(np.float32))
        assert (int(mrc.header.nx), int(mrc.header.ny)) == (6, 4)


def test_image_mmap_equals_normal_read(tmp_path, rng):
    img = rng.standard_normal((7, 5))
    path = tmp_path / "img.mrc"
    write_image(path, img, pixel_size=1.5)
    full, p1 = read_image(path)
    mapped, p2 = read_image(path, mmap=True)
    assert mapped.shape == (7, 5) and p1 == p2
    assert isinstance(mapped.base, np.memmap) or isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(np.asarray(mapped, dtype=np.float64), full)
    assert not mapped.flags.writeable


def test_image_mmap_finds_nan_in_blocks(tmp_path, monkeypatch):
    import numbaem.data.io as io_module

    monkeypatch.setattr(io_module, "_FINITE_BLOCK", 5)  # one row per block
    data = np.zeros((6, 5), dtype=np.float32)
    data[4, 2] = np.nan
    data[5, 0] = np.inf
    path = tmp_path / "bad.mrc"
    _write_raw(path, data)
    with pytest.raises(NumbaemError, match="2 non-finite"):
        read_image(path, mmap=True)


def test_stack_round_trip(tmp_path):
    stack = _asymmetric((3, 4, 4))
    path = tmp_path / "stack.mrc"
    write_stack(path, stack, pixel_size=0.8)
    got, pixel_size = read_stack(path)
    np.testing.assert_allclose(got, stack, rtol=F32_RTOL, atol=1e-7)
    assert got[0, 1, 0] != got[0, 0, 1]
    assert pixel_size == pytest.approx(0.8)
    with mrcfile.open(path) as mrc:
        assert mrc.is_image_stack()
        np.testing.assert_array_equal(mrc.data, stack.transpose(0, 2, 1).astype(np.float32))


# ------------------------------------------------------------------ atomic writing


def test_refuses_to_overwrite_without_force(tmp_path, rng):
    path = tmp_path / "vol.mrc"
    first = rng.standard_normal((3, 3, 3))
    write_volume(path, first)
    with pytest.raises(NumbaemError, match="exists; pass force=True"):
        write_volume(path, first + 1.0)
    np.testing.assert_allclose(read_volume(path)[0], first, rtol=F32_RTOL, atol=1e-7)
    write_volume(path, first + 1.0, force=True)
    np.testing.assert_allclose(read_volume(path)[0], first + 1.0, rtol=F32_RTOL, atol=1e-7)
    assert _leftovers(tmp_path, ["vol.mrc"]) == []


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_set_data(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(mrcfile.mrcfile.MrcFile, "set_data", broken_set_data)
    with pytest.raises(OSError, match="disk full"):
        write_image(tmp_path / "img.mrc", np.ones((3, 3)))
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path, force=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert _leftovers(tmp_path, ["a.txt"]) == []


def test_atomic_path_keeps_suffix_for_savez_and_json(tmp_path):
    with atomic_path(tmp_path / "arrays.npz") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npz"
        np.savez(tmp, a=np.arange(3))
    with atomic_path(tmp_path / "meta.json") as tmp:
        tmp.write_text(json.dumps({"L": 7}))
    assert sorted(os.listdir(tmp_path)) == ["arrays.npz", "meta.json"]
    np.testing.assert_array_equal(np.load(tmp_path / "arrays.npz")["a"], np.arange(3))
    assert json.loads((tmp_path / "meta.json").read_text()) == {"L": 7}
    # A new file gets the usual permissions, not the temporary file's 0600.
    from numbaem.data.io import _current_umask

    assert os.stat(tmp_path / "meta.json").st_mode & 0o777 == 0o666 & ~_current_umask()


def test_atomic_write_bytes_and_text(tmp_path):
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "hello")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text() == "hello"
    with pytest.raises(NumbaemError, match="exists; pass force=True"):
        atomic_write_bytes(tmp_path / "b.bin", b"")
    with pytest.raises(NumbaemError, match="not bytes"):
        atomic_write_bytes(tmp_path / "c.bin", "text")


def test_check_output(tmp_path):
    assert check_output(tmp_path / "new.mrc", force=False) == tmp_path / "new.mrc"
    with pytest.raises(NumbaemError, match="does not exist; create it"):
        check_output(tmp_path / "missing" / "x.mrc", force=True)
    with pytest.raises(NumbaemError, match="is a directory"):
        check_output(tmp_path, force=True)
    (tmp_path / "x.mrc").write_bytes(b"")
    with pytest.raises(NumbaemError, match="x.mrc' exists; pass force=True"):
        check_output(tmp_path / "x.mrc", force=False)
    assert check_output(tmp_path / "x.mrc", force=True) == tmp_path / "x.mrc"


# ------------------------------------------------------------------ bad files


@pytest.mark.parametrize("mmap", [False, True])
def test_truncated_file(tmp_path, mmap):
    path = tmp_path / "img.mrc"
    write_image(path, np.ones((8, 8)))
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(NumbaemError, match="cannot read MRC file .*truncated"):
        read_image(path, mmap=mmap)


@pytest.mark.parametrize("mmap", [False, True])
def test_header_claiming_more_data_than_file_holds(tmp_path, mmap):
    path = tmp_path / "img.mrc"
    write_image(path, np.ones((4, 4)))
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.nx = 100000
        mrc.header.ny = 100000
    # mrcfile rewrote the header only; the data block still holds 16 floats.
    with pytest.raises(NumbaemError, match="40000000000 bytes of data.*only 64 bytes"):
        read_image(path, mmap=mmap)


def test_file_longer_than_header_says(tmp_path):
    path = tmp_path / "vol.mrc"
    write_volume(path, np.ones((3, 3, 3)))
    with open(path, "ab") as fh:
        fh.write(b"\x00" * 12)
    with pytest.raises(NumbaemError, match="longer than its header says"):
        read_volume(path)


def test_garbage_and_empty_files(tmp_path, rng):
    garbage = tmp_path / "garbage.mrc"
    garbage.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(NumbaemError, match="cannot read MRC file .*complete MRC file"):
        read_volume(garbage)
    empty = tmp_path / "empty.mrc"
    empty.write_bytes(b"")
    with pytest.raises(NumbaemError, match="cannot read MRC file"):
        read_image(empty, mmap=True)
    with pytest.raises(NumbaemError, match="does not exist"):
        read_stack(tmp_path / "missing.mrc")


def test_nan_voxel(tmp_path):
    data = np.zeros((4, 4, 4), dtype=np.float32)
    data[1, 2, 3] = np.nan
    path = tmp_path / "nan.mrc"
    _write_raw(path, data)
    with pytest.raises(NumbaemError, match="1 non-finite"):
        read_volume(path)


def test_non_cubic_and_wrong_dimension(tmp_path):
    path = tmp_path / "box.mrc"
    _write_raw(path, np.zeros((4, 5, 6)))
    with pytest.raises(NumbaemError, match=r"shape \(6, 5, 4\) \(x, y, z\), not a cube"):
        read_volume(path)
    with pytest.raises(NumbaemError, match="not square"):
        read_stack(path)
    with pytest.raises(NumbaemError, match="not a single 2-D image"):
        read_image(path)
    flat = tmp_path / "flat.mrc"
    _write_raw(flat, np.zeros((4, 4)))
    with pytest.raises(NumbaemError, match="not a 3-D volume"):
        read_volume(flat)


def test_zero_size_header(tmp_path):
    path = tmp_path / "img.mrc"
    write_image(path, np.ones((4, 4)))
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.nx = 0
    with pytest.raises(NumbaemError, match="holds no data"):
        read_image(path)


def test_writers_validate_input(tmp_path):
    with pytest.raises(NumbaemError, match="not 3-D"):
        write_volume(tmp_path / "v.mrc", np.zeros((3, 3)))
    with pytest.raises(NumbaemError, match="equal lengths"):
        write_volume(tmp_path / "v.mrc", np.zeros((3, 3, 4)))
    with pytest.raises(NumbaemError, match="not finite"):
        write_image(tmp_path / "i.mrc", np.array([[1.0, np.nan]]))
    with pytest.raises(NumbaemError, match="pixel_size=-1"):
        write_stack(tmp_path / "s.mrc", np.zeros((2, 3, 3)), pixel_size=-1)
    with pytest.raises(NumbaemError, match="complex"):
        write_image(tmp_path / "i.mrc", np.zeros((3, 3), dtype=complex))
    assert os.listdir(tmp_path) == []
