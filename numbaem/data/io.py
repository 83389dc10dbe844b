"""MRC input and output through the ``mrcfile`` library, and atomic file writing.

Axis convention
---------------
numbaem indexes arrays by coordinate: array axes 0, 1, 2 are x, y, z (docs/theory.md
section 2), so ``vol[i, j, k]`` is the voxel at x = i, y = j, z = k, and an image
``img[i, j]`` is the pixel at x = i, y = j. The MRC format, and ``mrcfile``, store
and return data the other way round, C-ordered as ``data[z, y, x]`` (images as
``data[y, x]``, stacks as ``data[n, y, x]``). Every reader here therefore
transposes what ``mrcfile`` returns, ``data.transpose(2, 1, 0)`` for a volume,
``data.T`` for an image and ``data.transpose(0, 2, 1)`` for a stack, and every
writer transposes back, so a file written by numbaem opens in other MRC software
(Chimera, RELION, ...) with the same handedness and orientation, and a file from
them reads here with x on axis 0.

Readers
-------
:func:`read_volume`, :func:`read_image` and :func:`read_stack` open files with
``permissive=False`` and turn every failure into a :class:`~numbaem.runtime.errors.NumbaemError`
whose message names the file: unreadable or garbage files, headers that describe
more data than the file holds (a truncated file) or less (trailing bytes that
``mrcfile`` only warns about; numbaem refuses them because a header whose sizes do
not match the file cannot be trusted to give the right shape), complex data, empty
arrays, wrong dimensionality or shape, and non-finite values.

Writers
-------
Every writer goes through :func:`atomic_path`: the data are written to a temporary
file in the target's directory, flushed and fsynced, and moved onto the target with
:func:`os.replace`, so a reader never sees a half-written file and a failed write
leaves nothing behind. An existing target is overwritten only with ``force=True``
(``--force`` on the command line). MRC data are written as float32 (mode 2).
"""
import contextlib
import logging
import os
import stat
import tempfile
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from ..runtime.errors import NumbaemError, OutputExists
from ..runtime.validate import pixel_size as check_pixel_size

logger = logging.getLogger(__name__)

__all__ = [
    "read_volume",
    "read_image",
    "read_stack",
    "write_volume",
    "write_image",
    "write_stack",
    "check_output",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
]

# Elements per block when checking a memory-mapped image for non-finite values.
_FINITE_BLOCK = 1 << 22

_READ_ERRORS = (ValueError, OSError, EOFError, OverflowError, MemoryError)


# --------------------------------------------------------------------------- output


def check_output(path, force):
    """Check that ``path`` may be written.

    Parameters
    ----------
    path : str or os.PathLike
        The output file.
    force : bool
        Whether an existing file may be overwritten.

    Returns
    -------
    target : pathlib.Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    NumbaemError
        If the path is empty, names a directory, lies in a directory that does not
        exist, or names an existing file and ``force`` is false.
    """
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise NumbaemError(
            f"output path {path!r} is not a file name; pass a path such as 'out.mrc'"
        )
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise NumbaemError(
            f"output directory {str(parent)!r} of {str(target)!r} does not exist; "
            "create it first or choose another output path"
        )
    if target.is_dir():
        raise NumbaemError(
            f"output {str(target)!r} is a directory; give a file name inside it instead"
        )
    if target.exists() and not force:
        raise OutputExists(target)
    return target


def _current_umask():
    """Return the process umask without changing it where /proc allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path):
    """Flush ``path``'s contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory):
    """Flush a directory entry to disk where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, force=False):
    """Yield a temporary path beside ``path`` and move it onto ``path`` on success.

    The temporary file is created (empty) in the target's directory with the
    target's suffix, so that writers that infer the format from the name
    (``numpy.savez``, ``matplotlib`` ``savefig``) behave as with the target. When the
    ``with`` block finishes, the file is fsynced, given the permissions a new file
    would get (or the replaced file's), and renamed onto the target with
    :func:`os.replace`; if the block raises, the temporary file is removed and the
    target is untouched.

    Parameters
    ----------
    path : str or os.PathLike
        The final output file.
    force : bool, optional
        Whether an existing file may be overwritten.

    Yields
    ------
    tmp : pathlib.Path
        The temporary file to write to.

    Raises
    ------
    NumbaemError
        From :func:`check_output`, before anything is written, and again just before
        the rename if another process created the target meanwhile.

    Examples
    --------
    >>> with atomic_path("result.npz") as tmp:  # doctest: +SKIP
    ...     np.savez(tmp, a=a)
    """
    target = check_output(path, force)
    suffix = target.suffix or ".tmp"
    handle = tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}.", suffix=suffix, delete=False
    )
    tmp = Path(handle.name)
    handle.close()
    try:
        yield tmp
        _fsync_path(tmp)
        if target.exists():
            if not force:
                raise NumbaemError(
                    f"output {str(target)!r} exists; pass --force (force=True) to "
                    "overwrite it"
                )
            mode = stat.S_IMODE(target.stat().st_mode)
        else:
            mode = 0o666 & ~_current_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)
    logger.debug("wrote %s", target)


def atomic_write_bytes(path, data, force=False):
    """Write ``data`` to ``path`` atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The output file.
    data : bytes
        The contents.
    force : bool, optional
        Whether an existing file may be overwritten.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise NumbaemError(
            f"data is a {type(data).__name__}, not bytes; encode it first or use "
            "atomic_write_text"
        )
    with atomic_path(path, force=force) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_text(path, text, force=False, encoding="utf-8"):
    """Write ``text`` to ``path`` atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The output file.
    text : str
        The contents.
    force : bool, optional
        Whether an existing file may be overwritten.
    encoding : str, optional
        The text encoding, UTF-8 by default.
    """
    if not isinstance(text, str):
        raise NumbaemError(
            f"text is a {type(text).__name__}, not str; pass a string or use "
            "atomic_write_bytes"
        )
    with atomic_path(path, force=force) as tmp:
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)


# --------------------------------------------------------------------------- writers


def _float32_data(name, array, ndim, square_from):
    """Validate ``array`` for writing and return it as float32 in [x, y, ...] order.

    ``square_from`` is the first axis from which all axes must have equal length
    (None for no constraint).
    """
    arr = np.asarray(array)
    if arr.ndim != ndim:
        raise NumbaemError(
            f"{name} has shape {arr.shape}, not {ndim}-D; pass a {ndim}-D array"
        )
    if arr.size == 0:
        raise NumbaemError(f"{name} has shape {arr.shape} with no elements; pass data")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise NumbaemError(
            f"{name} has dtype {arr.dtype}; pass real numbers (take .real of complex data)"
        )
    if square_from is not None and len(set(arr.shape[square_from:])) != 1:
        raise NumbaemError(
            f"{name} has shape {arr.shape}; its last {ndim - square_from} axes must have "
            "equal lengths"
        )
    out = arr.astype(np.float32)
    n_bad = int(np.count_nonzero(~np.isfinite(out)))
    if n_bad:
        raise NumbaemError(
            f"{name} has {n_bad} values that are not finite in float32 (NaN, inf or "
            "beyond 3.4e38); fix them before writing"
        )
    return out


def _write_mrc(path, data_zyx, pixel_size, force, image_stack):
    """Write C-ordered [.., y, x] float32 data to an MRC file atomically."""
    with atomic_path(path, force=force) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data_zyx))
            if image_stack:
                mrc.set_image_stack()
            if pixel_size is not None:
                mrc.voxel_size = pixel_size


def write_volume(path, vol, voxel_size=None, force=False):
    """Write a volume to an MRC file (float32, mode 2), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The output file.
    vol : ndarray, shape (L, L, L)
        The volume, axes x, y, z (written to disk as z, y, x).
    voxel_size : float or None, optional
        Voxel size in Angstrom; None leaves the header's cell at zero.
    force : bool, optional
        Whether an existing file may be overwritten.
    """
    size = check_pixel_size("voxel_size", voxel_size)
    data = _float32_data("vol", vol, 3, 0)
    _write_mrc(path, data.transpose(2, 1, 0), size, force, image_stack=False)


def write_image(path, img, pixel_size=None, force=False):
    """Write a 2-D image (a micrograph, say) to an MRC file (float32), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The output file.
    img : ndarray, shape (N0, N1)
        The image, axes x, y (written to disk as y, x).
    pixel_size : float or None, optional
        Pixel size in Angstrom; None leaves the header's cell at zero.
    force : bool, optional
        Whether an existing file may be overwritten.
    """
    size = check_pixel_size("pixel_size", pixel_size)
    data = _float32_data("img", img, 2, None)
    _write_mrc(path, data.T, size, force, image_stack=False)


def write_stack(path, stack, pixel_size=None, force=False):
    """Write a stack of square images to an MRC file (float32, image stack), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The output file.
    stack : ndarray, shape (n, L, L)
        The images, each with axes x, y (written to disk as n, y, x).
    pixel_size : float or None, optional
        Pixel size in Angstrom; None leaves the header's cell at zero.
    force : bool, optional
        Whether an existing file may be overwritten.
    """
    size = check_pixel_size("pixel_size", pixel_size)
    data = _float32_data("stack", stack, 3, 1)
    _write_mrc(path, data.transpose(0, 2, 1), size, force, image_stack=True)


# --------------------------------------------------------------------------- readers


def _unreadable(path, reason):
    return NumbaemError(
        f"cannot read MRC file {str(path)!r}: {reason}; check that it is a complete "
        "MRC file"
    )


def _size_mismatch(path):
    """Describe how the file is shorter than its header claims, or return None.

    ``mrcfile`` reports a truncated file in its own words ("Expected 96 bytes in
    data block but limit is 88" when reading, "mmap length is greater than file
    size" when memory-mapping); this reads the header alone and says it plainly.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=False, header_only=True) as mrc:
                header = mrc.header
                dtype = mrcfile.utils.data_dtype_from_header(header)
                shape = mrcfile.utils.data_shape_from_header(header)
                header_bytes = header.nbytes + int(header.nsymbt)
    except _READ_ERRORS:
        return None
    if any(n < 0 for n in shape):
        return f"its header gives negative sizes {shape[::-1]} (x, y, ...)"
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    available = os.path.getsize(path) - header_bytes
    if expected > available:
        return (
            f"its header describes {expected} bytes of data, shape {shape[::-1]} "
            f"(x, y, ...) of {dtype.name}, but only {max(available, 0)} bytes follow the "
            f"{header_bytes}-byte header, so the file is truncated or its header is wrong"
        )
    return None


def _open_mrc(path, mmap):
    """Open ``path`` with mrcfile, strictly, and return ``(data, pixel_size)``.

    ``data`` is what mrcfile gives, C-ordered [.., y, x]; with ``mmap`` it is a
    read-only ``numpy.memmap`` that stays valid after the file object is closed
    (mrcfile closes only its own handle; the memory map keeps its own).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise NumbaemError(
            f"path {path!r} is a {type(path).__name__}, not a file name; pass a path"
        )
    if not Path(path).exists():
        raise NumbaemError(
            f"MRC file {str(path)!r} does not exist; check the path"
        )
    if Path(path).is_dir():
        raise NumbaemError(
            f"MRC file {str(path)!r} is a directory; pass the path of a file inside it"
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if mmap:
                handle = mrcfile.mmap(path, mode="r", permissive=False)
            else:
                handle = mrcfile.open(path, mode="r", permissive=False)
            with handle as mrc:
                data = mrc.data
                header = mrc.header
                voxel = mrc.voxel_size
                pixel = (float(voxel.x), float(voxel.y), float(voxel.z))
                header_bytes = header.nbytes + int(header.nsymbt)
                nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
                mode = int(header.mode)
    except NumbaemError:
        raise
    except _READ_ERRORS as err:
        raise _unreadable(path, _size_mismatch(path) or err) from err
    if data is None:
        raise _unreadable(path, "mrcfile found no data block")
    if data.size == 0:
        raise NumbaemError(
            f"MRC file {str(path)!r} holds no data (nx={nx}, ny={ny}, nz={nz}); "
            "check that it is a complete MRC file"
        )
    for warning in caught:
        message = str(warning.message)
        if "larger than expected" in message:
            raise NumbaemError(
                f"MRC file {str(path)!r} is longer than its header says ({message}; "
                f"header: nx={nx}, ny={ny}, nz={nz}, {header_bytes} header bytes); "
                "rewrite it with a header that matches its data"
            )
        logger.warning("MRC file %s: %s", path, message)
    if np.iscomplexobj(data):
        raise NumbaemError(
            f"MRC file {str(path)!r} holds complex data (mode {mode}); "
            "numbaem reads real-valued maps only, convert it to mode 2"
        )
    return data, pixel


def _pixel_size(path, pixel, axes):
    """The pixel size from the header's per-axis sizes, or None if not set."""
    sizes = [pixel[a] for a in axes]
    if not all(np.isfinite(s) and s > 0 for s in sizes):
        return None
    if not np.allclose(sizes, sizes[0], rtol=1e-5, atol=0):
        logger.warning(
            "MRC file %s has unequal pixel sizes %s along x, y, z; using the x one",
            path, sizes,
        )
    return sizes[0]


def _check_finite(path, data):
    """Raise if ``data`` (in memory) holds NaN or inf."""
    if np.issubdtype(data.dtype, np.integer):
        return
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise NumbaemError(
            f"MRC file {str(path)!r} holds {n_bad} non-finite values (NaN or inf) out "
            f"of {data.size}; fix or mask them before using the file"
        )


def _check_finite_blocks(path, data):
    """Raise if a memory-mapped 2-D [y, x] array holds NaN or inf, a block of rows at a time."""
    if np.issubdtype(data.dtype, np.integer):
        return
    rows = max(1, _FINITE_BLOCK // max(1, data.shape[1]))
    n_bad = 0
    for start in range(0, data.shape[0], rows):
        n_bad += int(np.count_nonzero(~np.isfinite(data[start:start + rows])))
    if n_bad:
        raise NumbaemError(
            f"MRC file {str(path)!r} holds {n_bad} non-finite values (NaN or inf) out "
            f"of {data.size}; fix or mask them before using the file"
        )


def read_volume(path):
    """Read a cubic volume from an MRC file.

    Parameters
    ----------
    path : str or os.PathLike
        The MRC file.

    Returns
    -------
    vol : ndarray, shape (L, L, L), float64
        The volume with axes x, y, z (the file's z, y, x transposed), C-contiguous.
    voxel_size : float or None
        The voxel size in Angstrom from the header, None where the header leaves it
        at zero.

    Raises
    ------
    NumbaemError
        If the file cannot be read, is not 3-D, is not cubic, is empty, or holds NaN
        or inf.
    """
    data, pixel = _open_mrc(path, mmap=False)
    if data.ndim != 3:
        raise NumbaemError(
            f"MRC file {str(path)!r} holds an array of shape {data.shape} (z, y, x), "
            "not a 3-D volume; pass a volume file"
        )
    if len(set(data.shape)) != 1:
        raise NumbaemError(
            f"MRC file {str(path)!r} holds a volume of shape {data.shape[::-1]} (x, y, z), "
            "not a cube; pad or crop it to L x L x L"
        )
    _check_finite(path, data)
    vol = np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float64)
    return vol, _pixel_size(path, pixel, (0, 1, 2))


def read_image(path, mmap=False):
    """Read a 2-D image (a micrograph) from an MRC file.

    Parameters
    ----------
    path : str or os.PathLike
        The MRC file: one image (``nz = 1``).
    mmap : bool, optional
        If true, memory-map the file instead of reading it: the result is a
        read-only transposed view of a ``numpy.memmap`` (Fortran-ordered in
        [x, y], dtype as stored on disk, no copy); the finiteness check reads the
        file a block of rows at a time.

    Returns
    -------
    img : ndarray, shape (N0, N1)
        The image with axes x, y (the file's y, x transposed): float64 and
        C-contiguous when ``mmap`` is false.
    pixel_size : float or None
        The pixel size in Angstrom from the header, None where not set.

    Raises
    ------
    NumbaemError
        If the file cannot be read, is not a single 2-D image, is empty, or holds
        NaN or inf.
    """
    data, pixel = _open_mrc(path, mmap=bool(mmap))
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise NumbaemError(
            f"MRC file {str(path)!r} holds an array of shape {data.shape} (.., y, x), "
            "not a single 2-D image; pass a micrograph file"
        )
    if mmap:
        _check_finite_blocks(path, data)
        img = data.T
    else:
        _check_finite(path, data)
        img = np.ascontiguousarray(data.T, dtype=np.float64)
    return img, _pixel_size(path, pixel, (0, 1))


def read_stack(path):
    """Read a stack of square images from an MRC file.

    Parameters
    ----------
    path : str or os.PathLike
        The MRC file: an image stack, or a volume whose sections are read as images;
        a single image is read as a stack of one.

    Returns
    -------
    stack : ndarray, shape (n, L, L), float64
        The images, each with axes x, y (the file's n, y, x with y and x swapped),
        C-contiguous.
    pixel_size : float or None
        The pixel size in Angstrom from the header, None where not set.

    Raises
    ------
    NumbaemError
        If the file cannot be read, is not a stack of square images, is empty, or
        holds NaN or inf.
    """
    data, pixel = _open_mrc(path, mmap=False)
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3:
        raise NumbaemError(
            f"MRC file {str(path)!r} holds an array of shape {data.shape}, not a stack "
            "of 2-D images; pass an image stack file"
        )
    if data.shape[1] != data.shape[2]:
        raise NumbaemError(
            f"MRC file {str(path)!r} holds images of {data.shape[2]} x {data.shape[1]} "
            "pixels, not square ones; crop them to L x L"
        )
    _check_finite(path, data)
    stack = np.ascontiguousarray(data.transpose(0, 2, 1), dtype=np.float64)
    return stack, _pixel_size(path, pixel, (0, 1))
