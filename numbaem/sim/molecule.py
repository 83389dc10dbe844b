"""Seeded synthetic molecules: realistic test volumes made of Gaussian atoms.

A molecule is a few hundred isotropic Gaussian "atoms" strung along a random-walk
backbone through three to five chained lobes (domains) of different sizes, so the
density is compact, textured and asymmetric (it has no point or mirror symmetry to
speak of), like a small protein at low resolution. Everything is drawn in units of
``L`` from ``numpy.random.default_rng(seed)`` and only then scaled to the grid, so
``synthetic_molecule(L1, rng=seed)`` and ``synthetic_molecule(L2, rng=seed)`` are the same
continuous molecule sampled at two pixel sizes (atom widths scale as ``L / 41``:
1 to 1.5 voxels at ``L = 41``), which is what a Method 1 / Method 2 comparison
(theory section 1) needs.

Grid convention (theory section 2): voxel index ``n`` on each axis sits at position
``n - R``, ``R = L // 2``, and array axes 0, 1, 2 are x, y, z. Atom centres lie within
radius ``0.30 L`` of the origin, so with the widths above the density is below about
``1e-3`` of its maximum beyond radius ``0.45 L`` and the volume is close to
band-limited (a Gaussian of width 1 voxel keeps ``exp(-2 pi^2 0.25) ~ 0.7 %`` of its
amplitude at Nyquist).

``homolog_of`` gives a structural homolog, the kind of nearby model a structure
predictor returns: the molecule of seed ``homolog_of`` with each lobe turned and
shifted a little as a rigid domain, atoms jittered by a fraction of their width, a
few amplitudes changed, and about 5 % of the atoms removed and as many new ones added
next to others, all scaled by ``homolog_strength`` and drawn from a generator seeded
by ``(homolog_of, seed)``. At the default strength 0.2 the correlation with the
original is 0.86 to 0.96 (typically 0.93).
"""
import logging
import numbers

import numpy as np

from ..runtime.errors import NumbaemError
from ..runtime.validate import whole_number

logger = logging.getLogger(__name__)

__all__ = ["synthetic_molecule"]

# Widths are drawn for this side and scaled with L / _REF_L.
_REF_L = 41
# Atom centres lie within this fraction of L from the origin (the ball of the
# volume has radius about 0.5 L; 0.30 leaves the density negligible beyond 0.45 L).
_R_MAX = 0.30
# Atom width (standard deviation) range, in voxels at L = _REF_L.
_WIDTH_RANGE = (1.0, 1.5)
# Amplitude range of the atoms (different "elements").
_AMP_RANGE = (0.6, 1.4)
# Backbone step, in units of L (about 1.6 voxels at L = 41).
_STEP = 0.04


def _random_unit(rng, n=None):
    """Uniformly distributed unit vectors, shape (3,) or (n, 3)."""
    v = rng.standard_normal(3 if n is None else (n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _base_atoms(rng, n_atoms):
    """Draw a molecule's atoms in units of L.

    Returns
    -------
    pos : ndarray, shape (n_atoms, 3)
        Atom centres, units of L, within radius ``_R_MAX`` of the origin.
    width : ndarray, shape (n_atoms,)
        Standard deviations, units of L.
    amp : ndarray, shape (n_atoms,)
        Amplitudes.
    lobe : ndarray of int, shape (n_atoms,)
        The lobe (domain) of each atom.
    """
    n_lobes = int(rng.integers(3, 6))
    radii = rng.uniform(0.12, 0.19, n_lobes)
    centres = np.zeros((n_lobes, 3))
    for j in range(1, n_lobes):
        # Compact growth: each lobe touches the previous one, overlaps no other, and
        # of a few random directions takes the one closest to the centroid so far.
        cand = centres[j - 1] + 0.8 * (radii[j - 1] + radii[j]) * _random_unit(rng, 12)
        gap = np.linalg.norm(cand[:, None, :] - centres[None, :j, :], axis=2)
        gap = np.min(gap / (0.8 * (radii[None, :j] + radii[j])), axis=1)
        spread = np.linalg.norm(cand - centres[:j].mean(axis=0), axis=1)
        ok = gap >= 0.999
        best = np.argmin(np.where(ok, spread, np.inf)) if ok.any() else np.argmax(gap)
        centres[j] = cand[best]
    counts = rng.multinomial(n_atoms, radii**3 / np.sum(radii**3))

    pos = np.empty((n_atoms, 3))
    lobe = np.repeat(np.arange(n_lobes), counts)
    i = 0
    for j in range(n_lobes):
        # A backbone random walk with persistence, kept inside lobe j.
        p = centres[j] + 0.5 * radii[j] * rng.uniform(-1, 1, 3) / np.sqrt(3)
        heading = _random_unit(rng)
        for _ in range(counts[j]):
            heading = heading + 0.8 * _random_unit(rng)
            heading /= np.linalg.norm(heading)
            trial = p + _STEP * heading
            offset = trial - centres[j]
            dist = np.linalg.norm(offset)
            if dist > radii[j]:
                # Turn back towards the lobe centre.
                heading = heading - 2.0 * (heading @ offset) / dist**2 * offset
                trial = p + _STEP * heading
            p = trial
            pos[i] = p
            i += 1
    pos -= pos.mean(axis=0)
    reach = np.max(np.linalg.norm(pos, axis=1))
    if reach > _R_MAX:
        pos *= _R_MAX / reach
    width = rng.uniform(*_WIDTH_RANGE, n_atoms) / _REF_L
    amp = rng.uniform(*_AMP_RANGE, n_atoms)
    return pos, width, amp, lobe


def _rotation(axis, angle):
    """Rotation matrix about the unit vector ``axis`` by ``angle`` (Rodrigues)."""
    K = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * K + (1.0 - np.cos(angle)) * (K @ K)


def _perturb(rng, pos, width, amp, lobe, strength):
    """A homolog of the atoms ``(pos, width, amp)``: see the module docstring."""
    n = pos.shape[0]
    pos = pos.copy()
    # Domain motion: each lobe turns about its centroid by an angle of standard
    # deviation 0.75 * strength radians and shifts by 2 * strength mean atom widths.
    mean_width = float(np.mean(width))
    for j in np.unique(lobe):
        members = lobe == j
        centre = pos[members].mean(axis=0)
        turn = _rotation(_random_unit(rng), 0.75 * strength * rng.standard_normal())
        shift = 2.0 * strength * mean_width * rng.standard_normal(3)
        pos[members] = (pos[members] - centre) @ turn.T + centre + shift
    # Atom jitter: standard deviation 2.5 * strength atom widths per coordinate
    # (half a width at the default strength 0.2).
    pos += 2.5 * strength * width[:, None] * rng.standard_normal((n, 3))
    # A fraction `strength` of the atoms change amplitude by up to +-50 %.
    amp = amp.copy()
    changed = rng.random(n) < strength
    amp[changed] *= rng.uniform(0.5, 1.5, int(np.count_nonzero(changed)))
    # Remove and add round(0.25 * strength * n) atoms (5 % at the default strength).
    n_swap = min(n - 1, int(round(0.25 * strength * n)))
    if n_swap > 0:
        keep = np.sort(rng.permutation(n)[: n - n_swap])
        pos, width, amp = pos[keep], width[keep], amp[keep]
        anchor = rng.integers(0, n - n_swap, n_swap)
        new_pos = pos[anchor] + 1.5 * width[anchor, None] * rng.standard_normal((n_swap, 3))
        new_width = rng.uniform(*_WIDTH_RANGE, n_swap) / _REF_L
        new_amp = rng.uniform(*_AMP_RANGE, n_swap)
        pos = np.concatenate([pos, new_pos])
        width = np.concatenate([width, new_width])
        amp = np.concatenate([amp, new_amp])
    # Keep every centre inside the support radius.
    radius = np.linalg.norm(pos, axis=1)
    outside = radius > _R_MAX
    pos[outside] *= (_R_MAX / radius[outside])[:, None]
    return pos, width, amp


def _render(L, pos, width, amp):
    """Sum the Gaussians on the L^3 grid (index n at n - R), separably.

    ``pos`` and ``width`` are in units of L. Each atom is a product of three 1-D
    Gaussians, so the sum is one matrix product of shape (L, n) x (n, L^2).
    """
    coords = np.arange(L) - L // 2
    p = pos * L
    s = width * L
    g = [np.exp(-0.5 * ((coords[None, :] - p[:, a, None]) / s[:, None]) ** 2) for a in range(3)]
    yz = (g[1][:, :, None] * g[2][:, None, :]).reshape(len(amp), L * L)
    vol = ((amp[:, None] * g[0]).T @ yz).reshape(L, L, L)
    return vol


def synthetic_molecule(L=41, rng=0, n_atoms=300, homolog_of=None, homolog_strength=0.2):
    """A seeded synthetic molecule (or a homolog of one) on an ``L^3`` grid.

    Parameters
    ----------
    L : int, optional
        Side of the volume, odd, at least 5.
    rng : int or numpy.random.Generator, optional
        The molecule's randomness: a seed (non-negative; the same seed gives the same
        continuous molecule at every ``L``) or a generator. With ``homolog_of``, the
        randomness of the perturbation instead (a seed ``s`` draws it from
        ``SeedSequence([homolog_of, s])``).
    n_atoms : int, optional
        Number of Gaussian atoms.
    homolog_of : int or None, optional
        If given, return a homolog of ``synthetic_molecule(L, rng=homolog_of,
        n_atoms=n_atoms)``: that molecule perturbed (deterministically given
        ``(homolog_of, rng)``) into a nearby structure.
    homolog_strength : float, optional
        Size of the homolog's perturbation: lobe turns of ``0.75 *
        homolog_strength`` radians and shifts of ``2 * homolog_strength`` atom
        widths (standard deviations), atom jitter of ``2.5 * homolog_strength``
        atom widths, amplitude changes on a fraction ``homolog_strength`` of the
        atoms, ``25 * homolog_strength`` % of the atoms replaced. The default 0.2
        gives a correlation of about 0.93 with the original (0.98 at 0.1, 0.88 at
        0.3); 0 returns the original.

    Returns
    -------
    vol : ndarray, shape (L, L, L), float64
        The density, axes x, y, z, voxel ``n`` at position ``n - L//2``, non-negative,
        maximum 1.

    Raises
    ------
    NumbaemError
        If ``L`` is even or below 5, or another argument is out of range.

    Examples
    --------
    >>> truth = synthetic_molecule(41, rng=0)
    >>> start = synthetic_molecule(41, rng=1, homolog_of=0)   # a nearby model
    """
    if isinstance(L, numbers.Integral) and not isinstance(L, bool) and L >= 5 and L % 2 == 0:
        raise NumbaemError(
            f"L={L} is even; numbaem works with odd sizes, use L={L + 1}"
        )
    L = whole_number("L", L, 5)
    if not isinstance(rng, np.random.Generator):
        rng = whole_number("rng", rng, 0)   # a seed: kept as a number (homologs mix it with homolog_of)
    n_atoms = whole_number("n_atoms", n_atoms, 1)
    if homolog_of is not None:
        homolog_of = whole_number("homolog_of", homolog_of, 0)
    try:
        strength = float(homolog_strength)
    except (TypeError, ValueError):
        strength = float("nan")
    if not np.isfinite(strength) or strength < 0 or isinstance(homolog_strength, bool):
        raise NumbaemError(
            f"homolog_strength={homolog_strength!r} is not a non-negative number; pass "
            "e.g. homolog_strength=0.2"
        )

    if homolog_of is None:
        pos, width, amp, _ = _base_atoms(np.random.default_rng(rng), n_atoms)
    else:
        pos, width, amp, lobe = _base_atoms(np.random.default_rng(homolog_of), n_atoms)
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(np.random.SeedSequence([homolog_of, rng]))
        pos, width, amp = _perturb(rng, pos, width, amp, lobe, strength)
    vol = _render(L, pos, width, amp)
    vol /= np.max(vol)
    return vol
