"""RELION 3.1 micrographs STAR files (as CTFFIND / RELION write them), through ``starfile``.

Read (:func:`read_micrographs_star`): the ``data_optics`` block with ``rlnOpticsGroup``,
``rlnVoltage`` (kV), ``rlnSphericalAberration`` (mm), ``rlnAmplitudeContrast`` and
``rlnMicrographPixelSize`` (Angstrom); the ``data_micrographs`` block with
``rlnMicrographName`` (matched to the given micrograph files by base name),
``rlnOpticsGroup``, ``rlnDefocusU``, ``rlnDefocusV`` (Angstrom), ``rlnDefocusAngle``
(degrees) and, if present, ``rlnPhaseShift`` (degrees). The CTF convention is that of
:mod:`numbaem.model.ctf` (CTFFIND's sign; the angle from the micrograph's fast axis).

Write (:func:`write_micrographs_star`): the same blocks, for ``numbaem simulate``'s
``MIC_ctf.star``, atomically.

Every problem (a block or column missing, a micrograph named in the file but not given
or the reverse, a negative or NaN defocus, an unknown optics group, pixel sizes that
disagree) is one :class:`~numbaem.runtime.errors.NumbaemError` sentence naming the fix.
"""
import dataclasses
import logging
import math
import os

import numpy as np

from ..model.ctf import CTFParams
from ..runtime.errors import NumbaemError

logger = logging.getLogger(__name__)

__all__ = ["StarCTF", "read_micrographs_star", "write_micrographs_star", "check_pixel_sizes",
           "OPTICS_COLUMNS", "MICROGRAPH_COLUMNS"]

OPTICS_COLUMNS = ("rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                  "rlnMicrographPixelSize")
MICROGRAPH_COLUMNS = ("rlnMicrographName", "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")

#: Largest relative difference allowed between the STAR file's and the MRC header's pixel size.
PIXEL_SIZE_TOLERANCE = 0.01


@dataclasses.dataclass
class StarCTF:
    """The CTF of each given micrograph, from a STAR file.

    Attributes
    ----------
    params : list of CTFParams
        In the order of the micrograph files given.
    pixel_size : float
        ``rlnMicrographPixelSize`` of their optics group(s), Angstrom (one for all).
    path : str
    """

    params: list
    pixel_size: float
    path: str


def _blocks(path):
    import starfile

    if not os.path.isfile(path):
        raise NumbaemError(f"the STAR file {path} does not exist; give the micrographs STAR file written by "
                           "CTFFIND / RELION (--ctf MICROGRAPHS.star)")
    try:
        data = starfile.read(path, always_dict=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise NumbaemError(f"{path} is not a readable STAR file ({type(exc).__name__}: {exc}); give a RELION 3.1 "
                           "micrographs STAR file with data_optics and data_micrographs blocks") from None
    return data


def _block(data, name, columns, path):
    block = data.get(name)
    if block is None or not hasattr(block, "columns"):
        raise NumbaemError(f"{path} has no data_{name} loop; give a RELION 3.1 micrographs STAR file "
                           "(CTFFIND / RELION write data_optics and data_micrographs)")
    missing = [c for c in columns if c not in block.columns]
    if missing:
        raise NumbaemError(f"{path}: the data_{name} block lacks the column(s) {', '.join(missing)}; add them "
                           "(they are written by CTFFIND / RELION CtfFind)")
    return block


def _numbers(block, column, path, name):
    try:
        vals = np.asarray(block[column], dtype=np.float64)
    except (TypeError, ValueError):
        raise NumbaemError(f"{path}: column {column} of data_{name} holds values that are not numbers") from None
    return vals


def read_micrographs_star(path, micrographs):
    """The CTF of each of the given micrographs from a RELION 3.1 micrographs STAR file.

    Parameters
    ----------
    path : str
    micrographs : list of str
        The micrograph files, matched to ``rlnMicrographName`` by base name.

    Returns
    -------
    StarCTF
    """
    path = str(path)
    data = _blocks(path)
    optics = _block(data, "optics", OPTICS_COLUMNS, path)
    mics = _block(data, "micrographs", MICROGRAPH_COLUMNS, path)
    og = _numbers(optics, "rlnOpticsGroup", path, "optics")
    table = {}
    for col in OPTICS_COLUMNS[1:]:
        vals = _numbers(optics, col, path, "optics")
        for g, v in zip(og, vals):
            if not math.isfinite(v):
                raise NumbaemError(f"{path}: {col} of optics group {int(g)} is {v}; give a finite value")
            table.setdefault(int(g), {})[col] = float(v)
    names = [os.path.basename(str(n)) for n in mics["rlnMicrographName"]]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise NumbaemError(f"{path} names {dup[0]} more than once; keep one row per micrograph")
    given = [os.path.basename(str(m)) for m in micrographs]
    dup = sorted({n for n in given if given.count(n) > 1})
    if dup:
        raise NumbaemError(f"two micrograph files share the base name {dup[0]}, so the STAR file cannot tell them "
                           "apart; rename one")
    extra = [n for n in names if n not in set(given)]
    if extra:
        raise NumbaemError(f"{path} names {len(extra)} micrograph(s) that were not given (first: {extra[0]}); "
                           "give those files too, or remove their rows from the STAR file")
    missing = [n for n in given if n not in set(names)]
    if missing:
        raise NumbaemError(f"micrograph {missing[0]} is not in {path} ({len(missing)} given file(s) are not); "
                           "give a STAR file with a row for every micrograph, or leave those files out")
    cols = {c: _numbers(mics, c, path, "micrographs") for c in MICROGRAPH_COLUMNS[1:]}
    phase = _numbers(mics, "rlnPhaseShift", path, "micrographs") if "rlnPhaseShift" in mics.columns \
        else np.zeros(len(names))
    row = {n: i for i, n in enumerate(names)}
    params, sizes = [], set()
    for n in given:
        i = row[n]
        u, v = cols["rlnDefocusU"][i], cols["rlnDefocusV"][i]
        for label, d in (("rlnDefocusU", u), ("rlnDefocusV", v)):
            if not (math.isfinite(d) and d >= 0):
                raise NumbaemError(f"{path}: {label} of {n} is {d}; a defocus must be a finite number >= 0 "
                                   "(Angstrom, underfocus positive): re-estimate that micrograph's CTF or drop it")
        for label, d in (("rlnDefocusAngle", cols["rlnDefocusAngle"][i]), ("rlnPhaseShift", phase[i])):
            if not math.isfinite(d):
                raise NumbaemError(f"{path}: {label} of {n} is {d}; give a finite angle in degrees")
        g = int(cols["rlnOpticsGroup"][i])
        if g not in table:
            raise NumbaemError(f"{path}: micrograph {n} is in optics group {g}, which data_optics does not list; "
                               "add the optics group")
        o = table[g]
        params.append(CTFParams(defocus_u=float(u), defocus_v=float(v), defocus_angle=float(cols["rlnDefocusAngle"][i]),
                                voltage=o["rlnVoltage"], cs=o["rlnSphericalAberration"],
                                amplitude_contrast=o["rlnAmplitudeContrast"], phase_shift=float(phase[i])))
        sizes.add(o["rlnMicrographPixelSize"])
    if len(sizes) > 1 and (max(sizes) - min(sizes)) > 1e-6 * max(sizes):
        raise NumbaemError(f"{path}: the micrographs' optics groups have different pixel sizes "
                           f"({', '.join(f'{s:g}' for s in sorted(sizes))} A); reconstruct one pixel size at a time")
    px = sizes.pop()
    if not px > 0:
        raise NumbaemError(f"{path}: rlnMicrographPixelSize is {px}; give the micrographs' pixel size in Angstrom")
    logger.debug("read the CTF of %d micrograph(s) from %s (pixel size %g A)", len(params), path, px)
    return StarCTF(params, float(px), path)


def check_pixel_sizes(star_pixel, header_pixel, path):
    """Refuse a STAR pixel size that differs from the micrographs' header by more than 1%."""
    if header_pixel is None:
        return
    if abs(star_pixel - header_pixel) > PIXEL_SIZE_TOLERANCE * header_pixel:
        raise NumbaemError(f"{path} gives a pixel size of {star_pixel:g} A but the micrographs' header says "
                           f"{header_pixel:g} A (more than 1% apart); correct the one that is wrong, or override "
                           "the header with --pixel-size")


def write_micrographs_star(path, names, params, pixel_size, force=False):
    """Write a RELION 3.1 micrographs STAR file (one optics group per distinct voltage/Cs/Q).

    Parameters
    ----------
    path : str or os.PathLike
    names : list of str
        ``rlnMicrographName`` of each micrograph.
    params : list of CTFParams
    pixel_size : float
        ``rlnMicrographPixelSize``, Angstrom.
    force : bool
    """
    import pandas as pd
    import starfile

    from .io import atomic_path

    keys = []
    for p in params:
        k = (p.voltage, p.cs, p.amplitude_contrast)
        if k not in keys:
            keys.append(k)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(len(keys))],
        "rlnOpticsGroup": list(range(1, len(keys) + 1)),
        "rlnMicrographOriginalPixelSize": [float(pixel_size)] * len(keys),
        "rlnVoltage": [k[0] for k in keys],
        "rlnSphericalAberration": [k[1] for k in keys],
        "rlnAmplitudeContrast": [k[2] for k in keys],
        "rlnMicrographPixelSize": [float(pixel_size)] * len(keys),
    })
    mics = pd.DataFrame({
        "rlnMicrographName": [str(n) for n in names],
        "rlnOpticsGroup": [keys.index((p.voltage, p.cs, p.amplitude_contrast)) + 1 for p in params],
        "rlnDefocusU": [float(p.defocus_u) for p in params],
        "rlnDefocusV": [float(p.defocus_v) for p in params],
        "rlnCtfAstigmatism": [abs(p.defocus_u - p.defocus_v) for p in params],
        "rlnDefocusAngle": [float(p.defocus_angle) for p in params],
        "rlnPhaseShift": [float(p.phase_shift) for p in params],
    })
    with atomic_path(path, force=force) as tmp:
        starfile.write({"optics": optics, "micrographs": mics}, tmp, float_format="%.6f")
