"""Positions of the projections in a micrograph (theory section 1): random sequential addition.

Well-separated placement (the paper's eq. 5) keeps any two top-left positions at
Chebyshev distance ``>= 2L - 1``, so every ``L x L`` patch of a regular grid holds at most
one projection; arbitrary spacing only forbids overlaps (distance ``>= L``).
"""
import logging

import numpy as np

from ..runtime.errors import NumbaemError
from ..runtime.jit import jit
from ..runtime.validate import as_rng, image_shape, is_int

logger = logging.getLogger(__name__)

SPACINGS = ("separated", "arbitrary")


def spacing_distance(spacing, L):
    """Minimum Chebyshev distance between two positions (theory section 1)."""
    if spacing not in SPACINGS:
        raise NumbaemError(
            f"spacing={spacing!r} is not one of {SPACINGS}; pass 'separated' (the "
            "paper's well-separated placement) or 'arbitrary' (no overlap only)"
        )
    return 2 * L - 1 if spacing == "separated" else L


@jit
def _place_batch(blocked, free, draws, d, n_target, count, out):
    """Random sequential addition over one batch of draws from the free list.

    ``blocked[a, b]`` is nonzero where a position is within Chebyshev distance
    ``< d`` of a placed one. ``free`` lists flat indices that were free when the
    batch was drawn; ``draws`` index into it. Each drawn position still free is
    accepted, written to ``out[count]`` and blocks its ``(2d - 1)^2`` neighbourhood.
    Returns the new count and the number of draws consumed.
    """
    A0, A1 = blocked.shape
    used = 0
    for q in range(draws.shape[0]):
        if count >= n_target:
            break
        used += 1
        idx = free[draws[q]]
        p0 = idx // A1
        p1 = idx - p0 * A1
        if blocked[p0, p1]:
            continue
        out[count, 0] = p0
        out[count, 1] = p1
        count += 1
        for a in range(max(0, p0 - d + 1), min(A0, p0 + d)):
            for b in range(max(0, p1 - d + 1), min(A1, p1 + d)):
                blocked[a, b] = 1
    return count, used


def place_positions(n_target, N, L, spacing="separated", rng=None, max_tries=None):
    """Top-left positions of ``n_target`` projections by random sequential addition.

    Positions are drawn one at a time, uniformly among those still allowed, until
    ``n_target`` are placed: with ``spacing='separated'`` any two positions are at
    Chebyshev distance ``>= 2L - 1`` (theory section 1, the paper's eq. 5: every
    ``L x L`` patch of a regular grid holds at most one projection), with
    ``'arbitrary'`` at distance ``>= L`` (projections do not overlap).

    The grid of occupied cells is a boolean array over all allowed positions: each
    accepted position blocks its ``(2d - 1)^2`` neighbourhood, and candidates are
    drawn from the list of free positions, recompacted in rounds (rejection sampling
    against the positions blocked since). This is exact random sequential addition
    at a cost of ``O(N0 N1 + T d^2)`` per round, never ``O(T^2)``, and it ends by
    itself when no position is free (the jammed state, about 56 % of the plane
    covered by the ``d x d`` exclusion squares for random sequential addition of
    squares).

    Parameters
    ----------
    n_target : int
        Number of positions wanted, ``>= 0``.
    N : int or tuple of int
        Micrograph shape, ``N`` for ``N x N`` or ``(N0, N1)``.
    L : int
        Side of a projection, ``1 <= L <= min(N0, N1)``.
    spacing : {'separated', 'arbitrary'}, optional
        The separation rule.
    rng : numpy.random.Generator
        Source of randomness.
    max_tries : int or None, optional
        Upper bound on the number of candidate draws; None (default) for no bound
        (placement still ends, at the jammed state at the latest).

    Returns
    -------
    positions : ndarray of int64, shape (n_target, 2)
        Top-left pixels ``(s0, s1)``, ``0 <= s0 <= N0 - L``, ``0 <= s1 <= N1 - L``,
        in placement order.

    Raises
    ------
    NumbaemError
        If an argument is invalid, or fewer than ``n_target`` positions could be
        placed (the message gives the count and the density reachable).
    """
    if not is_int(n_target) or n_target < 0:
        raise NumbaemError(f"n_target={n_target!r} is not a whole number >= 0; pass a count of projections")
    n_target = int(n_target)
    N0, N1 = image_shape(N, "N")
    if not is_int(L) or L < 1:
        raise NumbaemError(f"L={L!r} is not a positive whole number; pass the projection side, e.g. L=7")
    L = int(L)
    if L > min(N0, N1):
        raise NumbaemError(
            f"L={L} does not fit in a {N0} x {N1} micrograph; use a micrograph of at "
            f"least {L} x {L} pixels"
        )
    d = spacing_distance(spacing, L)
    rng, _ = as_rng(rng)
    if max_tries is not None and (not is_int(max_tries) or max_tries < 1):
        raise NumbaemError(f"max_tries={max_tries!r} is not a positive whole number or None; pass e.g. max_tries=10**7")

    out = np.zeros((n_target, 2), np.int64)
    if n_target == 0:
        return out
    A0, A1 = N0 - L + 1, N1 - L + 1
    blocked = np.zeros((A0, A1), np.uint8)
    count, tries, jammed = 0, 0, False
    while count < n_target:
        free = np.flatnonzero(blocked.ravel() == 0)
        if free.size == 0:
            jammed = True
            break
        n_draw = free.size
        if max_tries is not None:
            n_draw = min(n_draw, max_tries - tries)
            if n_draw <= 0:
                break
        draws = rng.integers(0, free.size, n_draw)
        count, used = _place_batch(blocked, free, draws, d, n_target, count, out)
        tries += used
    if count < n_target:
        kind = "well-separated" if spacing == "separated" else "non-overlapping"
        reached = count * L * L / (N0 * N1)
        if jammed:
            why = (
                f"the micrograph is too crowded for {kind} placement (no free position "
                f"is left); lower --density or raise --micrograph-size; the highest "
                f"density reachable is about {reached:.3g}"
            )
        else:
            why = (
                f"placement gave up after max_tries={max_tries} random draws; raise "
                f"max_tries, lower --density or raise --micrograph-size"
            )
        raise NumbaemError(
            f"only {count} of {n_target} projections of side L={L} could be placed in a "
            f"{N0} x {N1} micrograph (density {n_target * L * L / (N0 * N1):.3g} "
            f"requested): {why}"
        )
    logger.debug("placed %d positions in %d draws", count, tries)
    return out


# --------------------------------------------------------------------------- real-space projection
