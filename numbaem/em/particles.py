"""Posterior picks: the particles the E-step finds, as coordinates (``reconstruct --write-particles``).

For every patch ``j`` the E-step knows the posterior probability that it holds a
particle, ``1 - w_{j,empty}``, and where: the most likely shift ``l`` (posterior summed
over rotations) and, at that shift, the most likely rotation ``k``
(:func:`numbaem.em.estep.best_states`). A patch whose top-left pixel is ``(r0, r1)`` and
whose best shift is the signed ``(l0, l1)`` puts the projection's top-left pixel at
``(r0 + l0, r1 + l1)`` (theory section 4), so the particle's centre is that plus
``L // 2``.

A particle that straddles patch borders is seen by up to four patches, each holding a
part of it; a patch that holds only a sliver places it poorly. Each particle's centre
lies in exactly one patch, which holds at least a quarter of it, so a patch's pick is kept
only when the centre it finds lies inside that patch (``0 <= l_a + L // 2 < L``). What
remains is merged as a safeguard: in order of decreasing probability, a pick is kept
unless a kept one of the same micrograph lies within Chebyshev distance ``< L`` (two
particles that do not overlap are at least ``L`` apart, theory section 1).
"""
import logging

import numpy as np

from ..analysis.picking import Picks, merge_duplicates
from ..model.projection import Operator
from ..model.rotations import rotation_grid
from ..runtime import fft
from ..runtime.errors import NumbaemError
from ..runtime.memory import default_budget
from .estep import SufficientStats, e_step_chunk, projection_spectra
from .run import stage_plan

logger = logging.getLogger(__name__)


def posterior_particles(source, theta, basis, K, upsilon, sigma2, min_probability=0.5, memory=None):
    """Particles from the posteriors of one E-step pass over every patch (module doc).

    Parameters
    ----------
    source : PatchSource
        The micrographs' regular patch grid.
    theta : ndarray, shape (M,)
        The volume's coefficients in ``basis``.
    basis : FBBasis
    K : int
        Size of the rotation grid (:func:`numbaem.model.rotations.rotation_grid`).
    upsilon : float or numbaem.em.estep.Background
        The empty-patch probability (as reached by the EM), or with the junk field the
        background states (theory section 14.4): a patch the field explains is not a particle.
    sigma2 : float
        The noise variance (as reached by the EM).
    min_probability : float
        Keep patches whose posterior probability of holding a particle is at least this.
    memory : int, optional
        Budget in bytes (default a quarter of the RAM).

    Returns
    -------
    Picks
        Centres in pixels of each micrograph; ``score`` the posterior probability.
    """
    if not 0 <= min_probability <= 1:
        raise NumbaemError(f"min_probability={min_probability} must lie in [0, 1]")
    if getattr(source, "shift_window", None) is not None:
        raise NumbaemError("posterior picks need the micrographs' regular patch grid, not boxes around picks")
    L = source.L
    budget = default_budget() if memory is None else int(memory)
    plan = stage_plan(budget, basis, K, source.n_patches)
    old_limit = fft.set_cache_limit(plan.fft_cache_bytes)
    rots = rotation_grid(K)
    mic, cen, sc, rot = [], [], [], []
    try:
        op = Operator(basis, rots, plan.parts["operator"])
        spectra = projection_spectra(op.project(theta))
        stats = SufficientStats.zeros(K, L)
        n_chunk = plan.n_chunk
        buf = np.empty((n_chunk, L, L))
        for i0 in range(0, source.n_patches, n_chunk):
            idx = np.arange(i0, min(i0 + n_chunk, source.n_patches))
            patches = source.get(idx, out=buf[:len(idx)])
            _, best = e_step_chunk(patches, spectra, upsilon, sigma2, stats, n_chunk=n_chunk, return_best=True)
            R = L // 2
            own = ((best["shift0"] + R >= 0) & (best["shift0"] + R < L) & (best["shift1"] + R >= 0)
                   & (best["shift1"] + R < L))
            keep = (best["occupied"] >= min_probability) & own
            if not np.any(keep):
                continue
            m, r, c = source.locate(idx[keep])
            mic.append(m)
            cen.append(np.stack([r * L + best["shift0"][keep], c * L + best["shift1"][keep]], axis=1) + L // 2)
            sc.append(best["occupied"][keep])
            rot.append(rots[best["rotation"][keep]])
        fft.release((n_chunk, K, 2 * L, 2 * L))
        fft.release((n_chunk, 2 * L, 2 * L))
    finally:
        fft.set_cache_limit(old_limit)
    if not mic:
        return Picks(np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros(0), np.zeros((0, 3, 3)))
    picks = Picks(np.concatenate(mic), np.concatenate(cen), np.concatenate(sc), np.concatenate(rot))
    n_raw = len(picks)
    picks = merge_duplicates(picks, L)
    logger.info("posterior picks: %d patches hold a particle's centre with P(particle) >= %g, %d particles after merging", n_raw,
                min_probability, len(picks))
    return picks
