"""A hierarchical rotation grid on SO(3): HEALPix viewing directions times in-plane angles.

Yershova, Jain, LaValle and Mitchell, "Generating uniform incremental grids on SO(3)
using the Hopf fibration", Int. J. Robotics Research 29 (2010) 801-812: SO(3) fibres over
the sphere S^2 with circles S^1 as fibres, so a grid of equal-area cells on S^2 (HEALPix:
Gorski et al., ApJ 622 (2005) 759) times a uniform grid on S^1 is a near-uniform grid on
SO(3), and refining both (each HEALPix cell into 4, each arc into 2) refines every cell of
SO(3) into 8. cryoDRGN's ``so3_grid`` uses the same construction.

Here the fibration is the one of theory section 3: a rotation is ``w = Rz(alpha)
Ry(theta) Rz(phi)`` (active ZYZ Euler angles), its viewing direction ``(theta, phi)`` a
HEALPix pixel centre, and the fibre over it the in-plane rotations ``Rz(alpha)`` on the
left. In-plane rotations enter the projection as phases (``A_{Rz(alpha) w0}`` is ``A_{w0}``
with ``Phi_{l,s,N}`` times ``e^{-i N alpha}``), so all in-plane angles of one direction
share their work (:func:`numbaem.model.projection.project_hopf`).

The fibre coordinate. Near the poles ``Rz(alpha) Ry(theta) Rz(phi)`` tends to
``Rz(alpha + phi)`` (north) or ``Rz(alpha - phi) Ry(pi)`` (south), so ``alpha`` itself is
a bad coordinate there: the children of a polar cell, whose longitudes ``phi`` differ by
up to 90 degrees, would land far from their parent. No single section of the fibration
is regular on the whole sphere, so the in-plane coordinate ``psi`` is fixed per HEALPix
base face (every descendant of a pixel stays in its face): ``alpha = psi - phi`` on the
four northern faces (regular at the north pole), ``alpha = psi + phi`` on the four
southern ones (regular at the south pole), ``alpha = psi`` on the equatorial ones. Each is
a shear of unit Jacobian, so the Haar measure ``sin(theta) dtheta dphi dalpha`` is
``sin(theta) dtheta dphi dpsi`` on every face: equal-area pixels times equal arcs of
``psi`` are equal-volume cells, and a child is never further from its parent than the
cell's own size (tested).

Levels. Level ``r`` has HEALPix ``nside = 2^r`` (``12 * 4^r`` directions) and
``6 * 2^r`` in-plane angles ``psi_i = (i + 1/2) 2 pi / (6 * 2^r)``: ``72 * 8^r`` rotations,
about ``60 / 2^r`` degrees apart (:func:`level_step`). Rotations are numbered in *tree
order*: level 0 is ``6 pix + i``, and the 8 children of rotation ``k`` at level ``r`` are
``8k .. 8k + 7`` at level ``r + 1`` (child ``2a + b``: HEALPix sub-pixel ``a`` of the nested
scheme, in-plane half ``b``), so a cell's children are contiguous and its parent is ``k // 8``.
"""
import functools
import math

import numpy as np

from ..runtime.errors import NumbaemError

#: HEALPix base resolution: 12 pixels; in-plane angles at level 0.
N_BASE_PIX = 12
N_BASE_PSI = 6
#: Rotations at level 0, and the children of each cell at the next level.
BASE = N_BASE_PIX * N_BASE_PSI
CHILDREN = 8
#: The largest level offered (level 6: 18.9 million rotations, 0.94 degrees).
MAX_LEVEL = 6

_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7])


def _check_level(level):
    if int(level) != level or not 0 <= level <= MAX_LEVEL:
        raise NumbaemError(f"Hopf grid level {level!r} must be a whole number from 0 to {MAX_LEVEL}")
    return int(level)


def size(level):
    """Rotations at ``level``: ``72 * 8^level``."""
    return BASE * CHILDREN ** _check_level(level)


def level_step(level):
    """Angular spacing of ``level`` in degrees: the in-plane step ``360 / (6 * 2^level)``
    (the HEALPix pixel size, ``sqrt(4 pi / n_pix)`` rad, is within 2% of it)."""
    return 360.0 / (N_BASE_PSI * 2 ** _check_level(level))


def level_for_step(step_deg):
    """The coarsest level whose step (:func:`level_step`) is at most ``step_deg`` degrees."""
    step_deg = float(step_deg)
    if not step_deg > 0 or not math.isfinite(step_deg):
        raise NumbaemError(f"angular step {step_deg!r} must be a positive number of degrees")
    for r in range(MAX_LEVEL + 1):
        if level_step(r) <= step_deg * (1 + 1e-9):
            return r
    raise NumbaemError(f"angular step {step_deg} degrees is finer than the finest Hopf level "
                       f"({level_step(MAX_LEVEL):.3g} degrees); use a step of at least that")


def _compress_bits(v):
    """De-interleave the even bits of ``v`` (HEALPix nested index -> x coordinate)."""
    v = v & 0x5555555555555555
    v = (v | (v >> 1)) & 0x3333333333333333
    v = (v | (v >> 2)) & 0x0F0F0F0F0F0F0F0F
    v = (v | (v >> 4)) & 0x00FF00FF00FF00FF
    v = (v | (v >> 8)) & 0x0000FFFF0000FFFF
    v = (v | (v >> 16)) & 0x00000000FFFFFFFF
    return v


def healpix_nested_angles(nside, pix):
    """Centres ``(theta, phi)`` of HEALPix pixels in the nested scheme (Gorski et al. 2005).

    Parameters
    ----------
    nside : int
        A power of two.
    pix : ndarray of int
        Pixel numbers in ``[0, 12 nside^2)``.

    Returns
    -------
    theta, phi : ndarray
        Colatitude in ``[0, pi]`` and longitude in ``[0, 2 pi)``.
    """
    pix = np.asarray(pix, dtype=np.int64)
    npface = nside * nside
    face = pix // npface
    ipf = pix % npface
    ix = _compress_bits(ipf)
    iy = _compress_bits(ipf >> 1)
    jr = _JRLL[face] * nside - (ix + iy) - 1
    nl4 = 4 * nside
    north = jr < nside
    south = jr > 3 * nside
    nr = np.where(north, jr, np.where(south, nl4 - jr, nside))
    z = np.where(north, 1.0 - nr ** 2 / (3.0 * nside ** 2),
                 np.where(south, nr ** 2 / (3.0 * nside ** 2) - 1.0, (2 * nside - jr) * 2.0 / (3.0 * nside)))
    kshift = np.where(north | south, 0, (jr - nside) & 1)
    jp = (_JPLL[face] * nr + ix - iy + 1 + kshift) // 2
    jp = np.where(jp > nl4, jp - nl4, jp)
    jp = np.where(jp < 1, jp + nl4, jp)
    phi = (jp - (kshift + 1) * 0.5) * (0.5 * np.pi / nr)
    return np.arccos(np.clip(z, -1.0, 1.0)), phi


def tree_to_cells(level, idx):
    """Tree-order indices at ``level`` -> ``(pix, psi)``: nested HEALPix pixel at ``nside = 2^level``
    and in-plane index in ``[0, 6 * 2^level)``."""
    level = _check_level(level)
    idx = np.asarray(idx, dtype=np.int64)
    pix = np.zeros_like(idx)
    psi = np.zeros_like(idx)
    rest = idx
    for r in range(level):
        c = rest % CHILDREN
        rest = rest // CHILDREN
        pix += (c >> 1) << (2 * r)
        psi += (c & 1) << r
    pix += (rest // N_BASE_PSI) << (2 * level)
    psi += (rest % N_BASE_PSI) << level
    return pix, psi


def cells_to_tree(level, pix, psi):
    """Inverse of :func:`tree_to_cells`."""
    level = _check_level(level)
    pix = np.asarray(pix, dtype=np.int64)
    psi = np.asarray(psi, dtype=np.int64)
    idx = (pix >> (2 * level)) * N_BASE_PSI + (psi >> level)
    for r in range(level - 1, -1, -1):
        idx = idx * CHILDREN + (((pix >> (2 * r)) & 3) << 1) + ((psi >> r) & 1)
    return idx


def euler_angles(level, idx=None):
    """ZYZ Euler angles ``(alpha, theta, phi)`` of the rotations ``idx`` (default all) at ``level``.

    Returns
    -------
    angles : ndarray, shape (n, 3)
        ``w = Rz(alpha) Ry(theta) Rz(phi)`` with ``alpha = psi - phi``, ``psi`` or
        ``psi + phi`` on the northern, equatorial and southern base faces (module doc),
        ``psi = (i + 1/2) 2 pi / (6 * 2^level)``.
    """
    level = _check_level(level)
    if idx is None:
        idx = np.arange(size(level))
    pix, psi = tree_to_cells(level, idx)
    theta, phi = healpix_nested_angles(2 ** level, pix)
    n_psi = N_BASE_PSI * 2 ** level
    face = pix >> (2 * level)
    sign = np.where(face < 4, -1.0, np.where(face >= 8, 1.0, 0.0))
    return np.stack([(psi + 0.5) * (2 * np.pi / n_psi) + sign * phi, theta, phi], axis=1)


def rotations(level, idx=None):
    """The rotation matrices of ``idx`` (default all) at ``level``, shape (n, 3, 3)."""
    a = euler_angles(level, idx)
    return _zyz(a[:, 0], a[:, 1], a[:, 2])


def _zyz(alpha, beta, gamma):
    ca, sa = np.cos(alpha), np.sin(alpha)
    cb, sb = np.cos(beta), np.sin(beta)
    cg, sg = np.cos(gamma), np.sin(gamma)
    out = np.empty((len(alpha), 3, 3))
    out[:, 0, 0] = ca * cb * cg - sa * sg
    out[:, 0, 1] = -ca * cb * sg - sa * cg
    out[:, 0, 2] = ca * sb
    out[:, 1, 0] = sa * cb * cg + ca * sg
    out[:, 1, 1] = -sa * cb * sg + ca * cg
    out[:, 1, 2] = sa * sb
    out[:, 2, 0] = -sb * cg
    out[:, 2, 1] = sb * sg
    out[:, 2, 2] = cb
    return out


def children(idx):
    """Tree-order children (one level finer) of the rotations ``idx``: shape (n, 8)."""
    idx = np.asarray(idx, dtype=np.int64)
    return idx[..., None] * CHILDREN + np.arange(CHILDREN)


def parent(idx, levels=1):
    """The ancestor ``levels`` levels coarser of the rotations ``idx`` (``levels`` a number or
    an array like ``idx``, each >= 0)."""
    return np.asarray(idx, dtype=np.int64) // np.int64(CHILDREN) ** np.asarray(levels, dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _quaternions(level):
    from .rotations import matrices_to_quaternions
    q = matrices_to_quaternions(rotations(level))
    q.setflags(write=False)
    return q


def neighbours(level, idx, radius_deg):
    """Rotations of ``level`` within ``radius_deg`` degrees (geodesic) of any of ``idx``.

    Returns a sorted array of tree-order indices (``idx`` itself included when its own
    cells are at that level). Uses a k-d tree on the unit quaternions (``q`` and ``-q``).
    """
    from .rotations import matrices_to_quaternions
    tree = _kdtree(_check_level(level))
    q = matrices_to_quaternions(rotations(level, idx))
    chord = 2.0 * math.sin(math.radians(float(radius_deg)) / 4.0)   # |q1 - q2| for angle t: 2 sin(t/4)
    hits = tree.query_ball_point(np.concatenate([q, -q]), chord)
    n = size(level)
    return np.unique(np.concatenate([np.asarray(h, dtype=np.int64) for h in hits] or [np.zeros(0, np.int64)]) % n)


@functools.lru_cache(maxsize=8)
def neighbour_table(level, radius_deg):
    """Every rotation's neighbours within ``radius_deg`` degrees at ``level`` (itself included).

    Returns
    -------
    ptr, nbr : ndarray of int64
        The neighbours of rotation ``k`` are ``nbr[ptr[k]:ptr[k+1]]``, sorted.
    """
    level = _check_level(level)
    q = _quaternions(level)
    chord = 2.0 * math.sin(math.radians(float(radius_deg)) / 4.0)
    tree = _kdtree(level)
    n = len(q)
    lists = tree.query_ball_point(np.concatenate([q, -q]), chord)
    counts = np.zeros(n, np.int64)
    rows = []
    for k in range(n):
        r = np.unique(np.asarray(lists[k] + lists[n + k], dtype=np.int64))
        rows.append(r)
        counts[k] = len(r)
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    nbr = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    ptr.setflags(write=False)
    nbr.setflags(write=False)
    return ptr, nbr


@functools.lru_cache(maxsize=4)
def _kdtree(level):
    from scipy.spatial import cKDTree
    return cKDTree(_quaternions(level))


__all__ = ["BASE", "CHILDREN", "MAX_LEVEL", "cells_to_tree", "children", "euler_angles", "healpix_nested_angles",
           "level_for_step", "level_step", "neighbours", "parent", "rotations", "size", "tree_to_cells"]
