"""Orientation distributions of simulated particles: uniform, or with preferred views.

Viewing direction. numbaem projects ``R_w f(r) = f(w^T r)`` along ``z`` (theory section
1), so the particle is seen along the molecule-frame direction ``v = w^T e_z`` (the
third row of ``w``). A rotation with viewing direction ``v`` and in-plane angle ``psi``
is ``w = Rz(psi) Q_v`` with ``Q_v`` any rotation taking ``v`` to ``e_z``; drawing
``psi`` uniformly makes the distribution of ``w`` depend on ``v`` alone. A Haar-random
rotation has a uniform viewing direction on the sphere and a uniform in-plane angle.

Preferred views, written ``KIND:VALUE`` (``numbaem simulate --orientation-prior``):

``uniform``
    Haar (the default).
``top:F``
    a fraction ``F`` of the particles seen from near the molecule's ``+z`` axis (viewing
    directions drawn from a von Mises–Fisher distribution of concentration
    :data:`TOP_KAPPA` about ``e_z``: a cap of about 13 degrees), the rest uniform.
``side:F``
    a fraction ``F`` seen from near the equator (``v`` uniform in azimuth, its
    ``z`` component normal with standard deviation :data:`SIDE_WIDTH`), the rest uniform.
``vmf:KAPPA``
    every particle from a von Mises–Fisher distribution of concentration ``KAPPA``
    about ``e_z`` (0 is uniform).
"""
import dataclasses
import math

import numpy as np

from ..runtime.errors import NumbaemError
from ..runtime.validate import as_rng, whole_number

#: Concentration of the ``top`` views' cap (mean angle from the axis about 13 degrees, 98 % within 30).
TOP_KAPPA = 30.0
#: Standard deviation of ``v_z`` of the ``side`` views.
SIDE_WIDTH = 0.15

KINDS = ("uniform", "top", "side", "vmf")


@dataclasses.dataclass(frozen=True)
class ViewDistribution:
    """A distribution of viewing directions (module doc), in-plane angles uniform.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    value : float
        The fraction (``top``, ``side``) or the concentration (``vmf``); 0 for ``uniform``.
    """

    kind: str = "uniform"
    value: float = 0.0

    def __str__(self):
        return self.kind if self.kind == "uniform" else f"{self.kind}:{self.value:g}"

    def density(self, v):
        """The probability density of viewing directions ``v`` (n, 3) on the unit sphere
        (integrates to 1 over the sphere, area ``4 pi``)."""
        v = np.asarray(v, dtype=np.float64)
        uniform = np.full(len(v), 1.0 / (4 * np.pi))
        if self.kind == "uniform":
            return uniform
        if self.kind == "vmf":
            return _vmf_density(v[:, 2], self.value)
        if self.kind == "top":
            return self.value * _vmf_density(v[:, 2], TOP_KAPPA) + (1 - self.value) * uniform
        # side: z normal (truncated to [-1, 1]) times a uniform azimuth
        from scipy.stats import norm
        mass = norm.cdf(1 / SIDE_WIDTH) - norm.cdf(-1 / SIDE_WIDTH)
        side = norm.pdf(v[:, 2] / SIDE_WIDTH) / (SIDE_WIDTH * mass) / (2 * np.pi)
        return self.value * side + (1 - self.value) * uniform


def parse_views(text):
    """``'top:0.6'`` -> :class:`ViewDistribution` (one sentence naming the problem otherwise)."""
    if isinstance(text, ViewDistribution):
        return text
    raw = str(text).strip()
    kind, _, value = raw.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise NumbaemError(f"orientation prior {raw!r} is not one of uniform, top:F, side:F, vmf:KAPPA; "
                           "write e.g. top:0.6")
    if kind == "uniform":
        if value:
            raise NumbaemError(f"orientation prior {raw!r}: 'uniform' takes no value")
        return ViewDistribution()
    try:
        val = float(value)
    except ValueError:
        raise NumbaemError(f"orientation prior {raw!r} needs a number after the colon, e.g. {kind}:0.6") from None
    if kind in ("top", "side") and not 0 <= val <= 1:
        raise NumbaemError(f"orientation prior {raw!r}: the fraction must lie in [0, 1], e.g. {kind}:0.6")
    if kind == "vmf" and not (val >= 0 and math.isfinite(val)):
        raise NumbaemError(f"orientation prior {raw!r}: the concentration must be a number >= 0, e.g. vmf:5")
    return ViewDistribution(kind, val)


def _vmf_density(cos_angle, kappa):
    """von Mises–Fisher density on the sphere about ``e_z`` at ``cos(angle) = v_z``."""
    if kappa == 0:
        return np.full(np.shape(cos_angle), 1.0 / (4 * np.pi))
    # kappa / (4 pi sinh kappa) e^{kappa c}, written stably for large kappa
    return kappa / (2 * np.pi * (1 - np.exp(-2 * kappa))) * np.exp(kappa * (np.asarray(cos_angle) - 1))


def _sample_vmf_z(n, kappa, rng):
    """``v`` from a von Mises–Fisher distribution about ``e_z`` (Wood 1994, exact in 3-D)."""
    u = rng.random(n)
    if kappa == 0:
        w = 2 * u - 1
    else:
        w = 1 + np.log(u + (1 - u) * np.exp(-2 * kappa)) / kappa
    phi = 2 * np.pi * rng.random(n)
    s = np.sqrt(np.clip(1 - w * w, 0, None))
    return np.stack([s * np.cos(phi), s * np.sin(phi), w], axis=1)


def _sample_uniform(n, rng):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _sample_side(n, rng):
    z = np.empty(n)
    filled = 0
    while filled < n:   # normal truncated to [-1, 1] by rejection (loses < 1e-10 of the draws)
        d = rng.normal(0.0, SIDE_WIDTH, n - filled)
        d = d[np.abs(d) <= 1]
        z[filled:filled + len(d)] = d
        filled += len(d)
    phi = 2 * np.pi * rng.random(n)
    s = np.sqrt(1 - z * z)
    return np.stack([s * np.cos(phi), s * np.sin(phi), z], axis=1)


def sample_directions(n, views, rng):
    """``n`` viewing directions (n, 3) from a :class:`ViewDistribution`."""
    views = parse_views(views)
    rng, _ = as_rng(rng)
    n = whole_number("n", n, 0)
    if views.kind == "uniform":
        return _sample_uniform(n, rng)
    if views.kind == "vmf":
        return _sample_vmf_z(n, views.value, rng)
    preferred = rng.random(n) < views.value
    out = _sample_uniform(n, rng)
    m = int(preferred.sum())
    out[preferred] = _sample_vmf_z(m, TOP_KAPPA, rng) if views.kind == "top" else _sample_side(m, rng)
    return out


def rotations_viewing(v, psi):
    """Rotations ``w = Rz(psi) Q_v`` with ``w^T e_z = v`` (module doc).

    Parameters
    ----------
    v : ndarray, shape (n, 3)
        Unit viewing directions.
    psi : ndarray, shape (n,)
        In-plane angles (radians).

    Returns
    -------
    rots : ndarray, shape (n, 3, 3)
    """
    v = np.asarray(v, dtype=np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    # Q_v = Ry(-b) Rz(-a) with v = (sin b cos a, sin b sin a, cos b): Q_v v = e_z
    b = np.arccos(np.clip(v[:, 2], -1, 1))
    a = np.arctan2(v[:, 1], v[:, 0])
    return _rz(psi) @ _ry(-b) @ _rz(-a)


def _rz(t):
    c, s = np.cos(t), np.sin(t)
    out = np.zeros((len(c), 3, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1], out[:, 2, 2] = c, -s, s, c, 1.0
    return out


def _ry(t):
    c, s = np.cos(t), np.sin(t)
    out = np.zeros((len(c), 3, 3))
    out[:, 0, 0], out[:, 0, 2], out[:, 2, 0], out[:, 2, 2], out[:, 1, 1] = c, s, -s, c, 1.0
    return out


def sample_rotations(n, views, rng):
    """``n`` rotations whose viewing directions follow ``views`` and in-plane angles are uniform.

    ``views='uniform'`` gives Haar-random rotations (same distribution as
    :func:`numbaem.model.rotations.random_rotations`, other draws).
    """
    rng, _ = as_rng(rng)
    v = sample_directions(n, views, rng)
    return rotations_viewing(v, 2 * np.pi * rng.random(len(v)))


def viewing_directions(rots):
    """The viewing directions ``w^T e_z`` (n, 3) of rotations (n, 3, 3)."""
    return np.asarray(rots)[:, 2, :].copy()
