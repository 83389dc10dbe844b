"""Particle coordinates in RELION's STAR format (read and written with the ``starfile`` library).

The file has one data block, ``data_particles``, with one row per particle:

``rlnMicrographName``
    the micrograph's file name as given on the command line;
``rlnCoordinateX``
    the particle's centre along the micrograph file's fast axis (its columns; numbaem's
    image axis 0, see :mod:`numbaem.data.io`), in pixels of the micrograph as given;
``rlnCoordinateY``
    the centre along the file's slow axis (its rows; numbaem's image axis 1).

Both coordinates are the index of the particle's centre pixel counted from 0, so a
particle whose ``L x L`` projection has its top-left pixel at ``(s0, s1)`` (theory section
1) has centre ``(s0 + L // 2, s1 + L // 2)``. Further columns are optional:
``rlnAutopickFigureOfMerit`` (a picker's score, or the posterior probability that the
patch holds a particle) and ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi`` (the most
likely rotation, degrees; see :func:`relion_angles`).
"""
import logging
import os
from pathlib import Path

import numpy as np

from ..runtime.errors import NumbaemError
from .io import atomic_path, check_output

logger = logging.getLogger(__name__)

__all__ = ["read_coordinates", "write_coordinates", "coordinates_by_micrograph", "relion_angles"]

REQUIRED = ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY")


def relion_angles(rots):
    """RELION's ``(rot, tilt, psi)`` in degrees of rotations ``w`` (theory section 3).

    numbaem's projection of rotation ``w`` is the slice ``F(w^T (k, 0))``. RELION's
    ``Euler_angles2matrix(rot, tilt, psi)`` is ``A = Rz(-psi) Ry(-tilt) Rz(-rot)`` (active
    rotations) and its projector samples ``F(A^T (k, 0))``, so ``A = w`` and
    ``(rot, tilt, psi)`` are the ZYZ Euler angles of ``w^T = Rz(rot) Ry(tilt) Rz(psi)``.
    (Derived from RELION's source conventions; not checked against a RELION run.)

    Parameters
    ----------
    rots : ndarray, shape (n, 3, 3)

    Returns
    -------
    angles : ndarray, shape (n, 3)
    """
    from scipy.spatial.transform import Rotation

    rots = np.asarray(rots, dtype=np.float64).reshape(-1, 3, 3)
    if len(rots) == 0:
        return np.zeros((0, 3))
    return Rotation.from_matrix(np.transpose(rots, (0, 2, 1))).as_euler("ZYZ", degrees=True)


def write_coordinates(path, micrographs, centres, extra=None, force=False):
    """Write a RELION coordinate STAR file (module doc), atomically.

    Parameters
    ----------
    path : str or os.PathLike
    micrographs : sequence of str, length n
        ``rlnMicrographName`` of each particle.
    centres : ndarray, shape (n, 2)
        Centre pixel ``(x, y)`` = (image axis 0, image axis 1) of each particle.
    extra : dict of str -> ndarray (n,), optional
        Further columns (e.g. ``rlnAutopickFigureOfMerit``).
    force : bool
        Overwrite an existing file.
    """
    import pandas as pd
    import starfile

    check_output(path, force)
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(micrographs) != len(centres):
        raise NumbaemError(f"{len(micrographs)} micrograph names for {len(centres)} coordinates; give one name per particle")
    cols = {"rlnMicrographName": [str(m) for m in micrographs],
            "rlnCoordinateX": centres[:, 0], "rlnCoordinateY": centres[:, 1]}
    for k, v in (extra or {}).items():
        v = np.asarray(v)
        if v.shape != (len(centres),):
            raise NumbaemError(f"column {k} has shape {v.shape}; give one value per particle ({len(centres)})")
        cols[k] = v
    df = pd.DataFrame(cols)
    with atomic_path(path, force=force) as tmp:
        starfile.write({"particles": df}, tmp, overwrite=True)
    logger.info("wrote %d particle coordinates to %s", len(df), path)
    return df


def read_coordinates(path):
    """Read a RELION coordinate STAR file (module doc).

    A file with one data block is read whatever the block's name; with several, the
    block ``particles`` is used.

    Returns
    -------
    pandas.DataFrame
        With at least the columns of :data:`REQUIRED`.

    Raises
    ------
    NumbaemError
        If the file is missing or unreadable, or lacks a required column.
    """
    import starfile

    if not os.path.isfile(path):
        raise NumbaemError(f"coordinate file {str(path)!r} does not exist; give a RELION STAR file of particle "
                           "coordinates (numbaem pick writes one)")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # noqa: BLE001 - starfile raises many types on bad input
        raise NumbaemError(f"cannot read coordinate file {str(path)!r} as STAR ({type(exc).__name__}); give a RELION "
                           "STAR file with a data_particles block") from None
    tables = {k: v for k, v in blocks.items() if hasattr(v, "columns")}
    if "particles" in tables:
        df = tables["particles"]
    elif len(tables) == 1:
        df = next(iter(tables.values()))
    else:
        raise NumbaemError(f"coordinate file {str(path)!r} has no data_particles table; give a RELION STAR file with "
                           "rlnMicrographName, rlnCoordinateX and rlnCoordinateY columns")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise NumbaemError(f"coordinate file {str(path)!r} lacks the column(s) {', '.join(missing)}; a RELION "
                           "coordinate file has rlnMicrographName, rlnCoordinateX and rlnCoordinateY")
    xy = df[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(xy)):
        raise NumbaemError(f"coordinate file {str(path)!r} has coordinates that are not finite numbers; fix or remove "
                           "those rows")
    return df


def coordinates_by_micrograph(df, micrographs, where="the coordinate file"):
    """Split a coordinate table over the micrographs given.

    A row belongs to micrograph ``m`` when its ``rlnMicrographName`` equals ``m`` as given,
    or, failing that, has the same file name (without directories).

    Parameters
    ----------
    df : pandas.DataFrame
        From :func:`read_coordinates`.
    micrographs : sequence of str
        The micrograph paths as given.

    Returns
    -------
    list of ndarray, shape (n_m, 2)
        The centres ``(x, y)`` of each micrograph's particles, in the order of the file.

    Raises
    ------
    NumbaemError
        If the file names micrographs that were not given.
    """
    given = [str(m) for m in micrographs]
    exact = {m: i for i, m in enumerate(given)}
    by_name = {}
    for i, m in enumerate(given):
        by_name.setdefault(Path(m).name, []).append(i)
    names = df["rlnMicrographName"].astype(str).to_numpy()
    owner = np.empty(len(names), dtype=np.int64)
    unknown = []
    for r, n in enumerate(names):
        if n in exact:
            owner[r] = exact[n]
        elif len(by_name.get(Path(n).name, [])) == 1:
            owner[r] = by_name[Path(n).name][0]
        else:
            owner[r] = -1
            if n not in unknown:
                unknown.append(n)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise NumbaemError(f"{where} names micrograph(s) that were not given ({shown}); pass those micrographs too, "
                           "or drop their rows")
    xy = df[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=np.float64)
    return [xy[owner == i] for i in range(len(given))]
