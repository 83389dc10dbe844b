"""Density maps from atomic models (PDB / mmCIF) with gemmi, and the models shipped with numbaem.

A start for the EM (``reconstruct --init MODEL.pdb``) or a truth for a simulation
(``numbaem molecule --from-model MODEL.cif``) is the Coulomb potential of the model's
atoms, computed by gemmi's own density calculator with its electron scattering factors
(``gemmi.DensityCalculatorE``: the five-Gaussian fits of International Tables vol. C,
table 4.3.2.2, Peng et al. 1996), centred, at the working pixel size, band-limited.

The map
-------
Each atom of occupancy ``q``, isotropic displacement ``B`` and coefficients
``(a_i, b_i)`` scatters ``f(s) = q sum_i a_i exp(-(b_i + B) s^2 / 4)`` at spatial
frequency ``s`` (1/Angstrom); the density is the inverse Fourier transform of the sum
over atoms, in Angstrom^-2 (so its integral is ``sum q f(0)``). The map of side ``L0`` at
pixel size ``a`` is that density band-limited to the frequencies of the ``L0^3`` grid
inside the ball ``|k| <= 1/2`` cycles per pixel (the Nyquist ball of theory section 2), and
sampled at the voxels: voxel ``n`` at ``(n - L0 // 2) a`` from the model's centre of mass,
axes 0, 1, 2 the model's x, y, z. Equivalently it is the Fourier series of the periodic
density on the box of side ``L0 a``, truncated to the ball.

How it is computed: atoms sampled directly at pixel size ``a`` would alias badly (an
atom's narrowest Gaussian is a fraction of an Angstrom wide), so gemmi samples them on
a grid ``oversample`` (odd, default 3) times finer, with every atom blurred by an extra
``B_blur`` chosen so that the narrowest Gaussian is at least 1.5 fine pixels wide
(its transform at the fine Nyquist frequency is then below ``exp(-11)`` of its value at
0). The fine grid's centred DFT is cropped to the ``L0^3`` frequencies, the blur undone
there (``exp(+B_blur s^2 / 4)``, at most ``exp(pi^2 / 8) = 3.4`` inside the ball), and the
result inverted with values preserved. gemmi evaluates each atom out to the radius where
its density falls below ``1e-9`` Angstrom^-2 (its default ``1e-5`` drops up to 1 % of the
mass at pixels of 5-7 Angstrom). The test compares this with an independent
reference: the direct sum of every atom's Gaussians (gemmi's coefficient table, nothing
else of gemmi) at the same grid frequencies (``tests/naive.py``); they agree to about 1e-6
relative. Anisotropic displacements are not used (the shipped entries have none).

Waters are removed (the particle sits in ice) and only the first model of an ensemble
is used; hydrogens and ligands present in the file are kept.

Shipped models (``numbaem/sim/models``, provenance in its README): ``1hvr`` (HIV-1
protease dimer with a cyclic-urea inhibitor) and ``4e43`` (a mutant HIV-1 protease dimer,
another crystal form: a homolog of ``1hvr``). :func:`model_path` turns a shipped name
into the installed file.
"""
import gzip
import logging
import math
import os
from importlib import resources
from pathlib import Path

import numpy as np

from ..runtime.errors import NumbaemError
from ..runtime.fourier import centered_fft, centered_ifft
from ..runtime.validate import check_L, pixel_size as check_pixel_size, whole_number

logger = logging.getLogger(__name__)

__all__ = ["SHIPPED_MODELS", "model_path", "read_model", "model_atoms", "model_density", "is_model_file"]

#: Shipped PDB entries: name -> file in ``numbaem/sim/models``.
SHIPPED_MODELS = {"1hvr": "1hvr.pdb", "4e43": "4e43.pdb"}

_MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")

# The narrowest Gaussian of any atom is made at least this many fine pixels wide (see the module doc).
_MIN_WIDTH_FINE_PX = 1.5

# gemmi evaluates each atom out to the radius where its density falls below this (Angstrom^-2).
_CUTOFF = 1e-9


def is_model_file(path):
    """True if ``path`` names an atomic model (by its suffix) or a shipped model."""
    text = str(path).lower()
    return text in SHIPPED_MODELS or text.endswith(_MODEL_SUFFIXES)


def model_path(name):
    """The installed file of a shipped model (``'1hvr'``, ``'4e43'``), or ``name`` itself.

    A name that is not a shipped model is returned unchanged as a path.
    """
    key = str(name).lower()
    if key in SHIPPED_MODELS and not os.path.exists(str(name)):
        return Path(str(resources.files("numbaem.sim").joinpath("models", SHIPPED_MODELS[key])))
    return Path(name)


def read_model(path):
    """Read an atomic model with gemmi: waters removed, first model only.

    Parameters
    ----------
    path : str or os.PathLike
        PDB or mmCIF file (optionally gzipped), or a shipped model's name.

    Returns
    -------
    gemmi.Structure

    Raises
    ------
    NumbaemError
        If the file is missing, gemmi cannot read it, or it holds no atoms.
    """
    import gemmi

    p = model_path(path)
    if not p.is_file():
        shipped = ", ".join(sorted(SHIPPED_MODELS))
        raise NumbaemError(f"atomic model {str(path)!r} does not exist; give a PDB or mmCIF file, or a shipped model "
                           f"({shipped})")
    try:
        st = gemmi.read_structure(str(p))
    except (RuntimeError, ValueError, OSError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise NumbaemError(f"gemmi cannot read the atomic model {str(path)!r} ({_first_line(exc)}); "
                           "give a PDB or mmCIF file") from None
    st.remove_waters()
    st.remove_empty_chains()
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise NumbaemError(f"the atomic model {str(path)!r} holds no atoms (besides waters); give a PDB or mmCIF "
                           "file with coordinates")
    while len(st) > 1:
        del st[1]
    return st


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def model_atoms(structure):
    """The atoms of the first model, centred at the centre of mass.

    Parameters
    ----------
    structure : gemmi.Structure or path

    Returns
    -------
    dict with
        ``pos`` : ndarray, shape (n, 3), Angstrom, relative to the centre of mass;
        ``occ``, ``b_iso`` : ndarray, shape (n,);
        ``a``, ``b`` : ndarray, shape (n, 5), the atoms' electron scattering coefficients
        (gemmi's ``Element.c4322``);
        ``centre`` : ndarray, shape (3,), the centre of mass in the file's frame.
    """
    st = structure if not isinstance(structure, (str, os.PathLike)) else read_model(structure)
    model = st[0]
    com = model.calculate_center_of_mass()
    centre = np.array([com.x, com.y, com.z])
    pos, occ, biso, a, b = [], [], [], [], []
    for cra in model.all():
        at = cra.atom
        pos.append([at.pos.x, at.pos.y, at.pos.z])
        occ.append(at.occ)
        biso.append(at.b_iso)
        c = at.element.c4322
        a.append(list(c.a))
        b.append(list(c.b))
    return dict(pos=np.array(pos) - centre, occ=np.array(occ), b_iso=np.array(biso), a=np.array(a), b=np.array(b),
                centre=centre)


def ball_mask(L):
    """Boolean (L, L, L): the centred DFT frequencies with ``|k| <= 1/2`` cycles per pixel."""
    f = (np.arange(L) - L // 2) / L
    k2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    return k2 <= 0.25 + 1e-12


def model_density(model, size, pixel_size, oversample=3):
    """The model's density at pixel size ``pixel_size`` on an ``size^3`` grid (module doc).

    Parameters
    ----------
    model : str, os.PathLike or gemmi.Structure
        A PDB / mmCIF file, a shipped model's name, or a structure from :func:`read_model`.
    size : int
        Side ``L0`` of the map, odd.
    pixel_size : float
        Angstrom per voxel.
    oversample : int
        Odd factor of the fine grid gemmi samples on (default 3).

    Returns
    -------
    vol : ndarray, shape (size, size, size)
        Axes x, y, z; voxel ``n`` at ``(n - size // 2) pixel_size`` from the centre of
        mass; band-limited to the ball ``|k| <= 1/2`` cycles per pixel; Angstrom^-2.
    """
    import gemmi

    L0 = check_L(size, "size")
    a = check_pixel_size("pixel_size", pixel_size, allow_none=False)
    os_ = whole_number("oversample", oversample, 1, example=3)
    if os_ % 2 == 0:
        raise NumbaemError(f"oversample={os_} is even; use an odd factor such as 3 (odd grids keep the centre on a voxel)")
    st = model if not isinstance(model, (str, os.PathLike)) else read_model(model)
    st = st.clone()
    mdl = st[0]
    atoms = model_atoms(st)
    reach = float(np.max(np.linalg.norm(atoms["pos"], axis=1)))
    if reach > 0.5 * L0 * a:
        logger.warning("the model reaches %.1f A from its centre, beyond the box's half side %.1f A: its density "
                       "wraps around; use a larger size or pixel size", reach, 0.5 * L0 * a)
    nf = os_ * L0
    af = a / os_
    Rf = nf // 2
    shift = gemmi.Position(*(Rf * af - atoms["centre"]))
    for cra in mdl.all():
        cra.atom.pos = cra.atom.pos + shift
    dc = gemmi.DensityCalculatorE()
    dc.grid.set_unit_cell(gemmi.UnitCell(nf * af, nf * af, nf * af, 90, 90, 90))
    dc.grid.spacegroup = gemmi.find_spacegroup_by_name("P1")
    dc.grid.set_size(nf, nf, nf)
    dc.d_min = 2 * af
    dc.cutoff = _CUTOFF
    narrowest = float(np.min(atoms["b"][:, :].min(axis=1) + atoms["b_iso"]))
    dc.blur = max(0.0, 8 * math.pi ** 2 * (_MIN_WIDTH_FINE_PX * af) ** 2 - narrowest)
    dc.add_model_density_to_grid(mdl)
    fine = np.array(dc.grid, dtype=np.float64, copy=True)        # [u, v, w]: x, y, z; index i at i * af
    F = centered_fft(fine)
    c0 = Rf - L0 // 2
    F = F[c0:c0 + L0, c0:c0 + L0, c0:c0 + L0]
    s2 = ((np.arange(L0) - L0 // 2) / (L0 * a)) ** 2
    s2 = s2[:, None, None] + s2[None, :, None] + s2[None, None, :]
    F *= np.exp(dc.blur * s2 / 4.0)
    F[~ball_mask(L0)] = 0.0
    vol = centered_ifft(F).real / os_ ** 3
    logger.info("density of %d atoms on %d^3 voxels of %.4g A (fine grid %d^3, blur B %.3g A^2)",
                len(atoms["occ"]), L0, a, nf, dc.blur)
    return np.ascontiguousarray(vol)
