"""Particle picking for the pick-then-EM baseline, and picks judged against the truth.

Template matching (``numbaem pick --init``). With white noise of variance ``sigma^2``
(theory section 1), the matched-filter score of template ``p_k`` (an ``L x L``
projection of the initial model) with its top-left pixel at ``s`` is

    z_k[s] = <y[s : s + L], p_k> / (sigma ||p_k||),

standard normal where the micrograph holds only noise; ``z[s] = max_k z_k[s]`` over a
grid of ``K`` rotations. The correlations are computed for all ``s`` at once by FFT.

Blob detector (no initial model). One template: the negative Laplacian of a Gaussian,
``-nabla^2 G_s`` with ``s = d / (2 sqrt 2)`` for a blob of diameter ``d`` pixels, sampled in
the ``L x L`` box; it has zero mean and answers bright round blobs of about that size.
The score is the same normalised correlation.

Peaks. The local maxima of ``z`` are taken greedily in decreasing order, each at
Chebyshev distance ``>= min_distance`` from those already taken (default ``L``: particles
that do not overlap are that far apart), down to a threshold. The default threshold is
measured, not assumed: the same scoring runs on white noise of the same variance over
``n_calibration`` micrographs of the same size (seeded), and the threshold is the score
of the peak ranked ``false_picks * n_calibration`` there, so that about ``false_picks``
false picks per micrograph are expected where there is no particle (the correlations of
the ``K`` templates make any closed-form union bound far too strict).

Judging picks (:func:`match_picks`). A pick is right when a true particle's centre lies
within Chebyshev distance ``tolerance`` of it, each particle matched at most once
(greedily, closest pairs first). Precision = right picks / picks, recall = matched
particles / particles.
"""
import dataclasses
import logging
import math

import numpy as np

from ..runtime import fft
from ..runtime.errors import NumbaemError
from ..runtime.validate import as_rng, check_L, positive_number, whole_number

logger = logging.getLogger(__name__)

__all__ = ["Picks", "merge_duplicates", "log_template", "score_map", "find_peaks", "pick_particles", "match_picks"]


@dataclasses.dataclass
class Picks:
    """Particles found in micrographs.

    Attributes
    ----------
    micrograph : ndarray of int, shape (n,)
        Index of the micrograph of each pick.
    centre : ndarray, shape (n, 2)
        Centre pixel ``(x, y)`` (image axes 0, 1).
    score : ndarray, shape (n,)
        A picker's score, or the posterior probability of a particle.
    rotation : ndarray, shape (n, 3, 3) or None
        The most likely rotation of each pick, when known.
    """

    micrograph: np.ndarray
    centre: np.ndarray
    score: np.ndarray
    rotation: np.ndarray = None

    def __len__(self):
        return len(self.score)

    def select(self, keep):
        return Picks(self.micrograph[keep], self.centre[keep], self.score[keep],
                     None if self.rotation is None else self.rotation[keep])

    def per_micrograph(self, n_micrographs):
        """Centres of each micrograph's picks: list of ndarray (n_m, 2)."""
        return [self.centre[self.micrograph == m] for m in range(n_micrographs)]


def merge_duplicates(picks, min_distance):
    """Keep the highest-scoring pick of each group closer than ``min_distance`` (Chebyshev), greedily."""
    order = np.argsort(-picks.score, kind="stable")
    keep = []
    kept = {}
    for i in order:
        m = int(picks.micrograph[i])
        c = picks.centre[i]
        prev = kept.setdefault(m, [])
        if any(max(abs(c[0] - q[0]), abs(c[1] - q[1])) < min_distance for q in prev):
            continue
        prev.append(c)
        keep.append(i)
    return picks.select(np.sort(np.array(keep, dtype=np.int64)))


def log_template(L, diameter):
    """The blob detector's template: ``-nabla^2 G_s`` on the ``L x L`` box, ``s = diameter / (2 sqrt 2)``.

    Returns
    -------
    ndarray, shape (L, L)
        Zero mean (to round-off), centred on pixel ``(L // 2, L // 2)``.
    """
    L = check_L(L)
    d = positive_number("diameter", diameter, example=0.8 * L, unit=" pixels")
    s = d / (2 * math.sqrt(2))
    x = np.arange(L) - L // 2
    r2 = x[:, None] ** 2 + x[None, :] ** 2
    t = (2.0 - r2 / s ** 2) * np.exp(-r2 / (2 * s ** 2))
    return t - t.mean()


def score_map(image, templates, sigma2, batch=None):
    """``z[s] = max_k <y[s:s+L], p_k> / (sigma ||p_k||)`` for every top-left ``s`` (module doc).

    Parameters
    ----------
    image : ndarray, shape (N0, N1)
    templates : ndarray, shape (K, L, L)
    sigma2 : float
        Noise variance of a pixel.
    batch : int, optional
        Templates correlated at a time (memory about ``3 batch N0 N1`` numbers; default
        as many as fit in 64 MiB of them, at least one).

    Returns
    -------
    z : ndarray, shape (N0 - L + 1, N1 - L + 1)
    best : ndarray of int, shape (N0 - L + 1, N1 - L + 1)
        The template that attains it.
    """
    image = np.asarray(image, dtype=np.float64)
    templates = np.asarray(templates, dtype=np.float64)
    K, L, _ = templates.shape
    N0, N1 = image.shape
    if N0 < L or N1 < L:
        raise NumbaemError(f"the micrograph ({N0}x{N1}) is smaller than the {L}x{L} template")
    norms = np.sqrt(np.sum(templates ** 2, axis=(1, 2)))
    if not np.all(norms > 0):
        raise NumbaemError("a template is zero (the initial model projects to nothing); give a model with density")
    Y = fft.rfft2(image)
    batch = max(1, min(K, (64 << 20) // (3 * 8 * N0 * N1))) if batch is None else int(batch)
    n0, n1 = N0 - L + 1, N1 - L + 1
    z = np.full((n0, n1), -np.inf)
    best = np.zeros((n0, n1), dtype=np.int64)
    scale = 1.0 / math.sqrt(sigma2)
    for k0 in range(0, K, batch):
        T = np.zeros((min(batch, K - k0), N0, N1))
        T[:, :L, :L] = templates[k0:k0 + batch] / norms[k0:k0 + batch, None, None]
        corr = fft.irfft2(Y[None] * np.conj(fft.rfft2(T)), N1)[:, :n0, :n1] * scale   # sum_u y[s+u] t[u]
        k = np.argmax(corr, axis=0)
        zb = np.take_along_axis(corr, k[None], axis=0)[0]
        better = zb > z
        z[better] = zb[better]
        best[better] = k[better] + k0
    return z, best


def find_peaks(z, min_distance, threshold):
    """Greedy peaks of a score map: decreasing score, Chebyshev distance ``>= min_distance``, above ``threshold``.

    Returns
    -------
    positions : ndarray of int, shape (n, 2)
        Top-left pixels (indices of ``z``).
    scores : ndarray, shape (n,)
    """
    from scipy import ndimage

    d = int(min_distance)
    local = z >= ndimage.maximum_filter(z, size=2 * d - 1 if d > 1 else 1, mode="constant", cval=-np.inf)
    cand = np.argwhere(local & (z > threshold))
    order = np.argsort(-z[cand[:, 0], cand[:, 1]], kind="stable")
    taken = np.zeros(z.shape, dtype=bool)
    out = []
    for i in order:
        a, b = cand[i]
        if taken[a, b]:
            continue
        out.append((a, b))
        taken[max(0, a - d + 1):a + d, max(0, b - d + 1):b + d] = True
    pos = np.array(out, dtype=np.int64).reshape(-1, 2)
    return pos, z[pos[:, 0], pos[:, 1]] if len(pos) else np.zeros(0)


def calibrate_threshold(shape, templates, sigma2, min_distance, false_picks=1.0, n_calibration=4, rng=0):
    """The score above which about ``false_picks`` noise peaks per micrograph are expected (module doc)."""
    rng, _ = as_rng(rng)
    scores = []
    for _ in range(int(n_calibration)):
        noise = rng.normal(0.0, math.sqrt(sigma2), shape)
        z, _ = score_map(noise, templates, sigma2)
        scores.append(find_peaks(z, min_distance, -np.inf)[1])
    scores = np.sort(np.concatenate(scores))[::-1]
    rank = max(1, int(round(false_picks * n_calibration)))
    return float(scores[min(rank, len(scores)) - 1])


def pick_particles(images, templates, sigma2, min_distance=None, threshold=None, false_picks=1.0,
                   n_calibration=4, rng=0):
    """Pick particles by template matching (module doc).

    Parameters
    ----------
    images : list of ndarray, shape (N0, N1)
    templates : ndarray, shape (K, L, L)
        Projections of an initial model, or the one blob template (:func:`log_template`).
    sigma2 : float
        Noise variance of a pixel.
    min_distance : int, optional
        Least Chebyshev distance between picks (default ``L``).
    threshold : float, optional
        Score threshold; default calibrated on noise for ``false_picks`` false picks per
        micrograph (:func:`calibrate_threshold`).
    false_picks : float
        Expected false picks per micrograph for the calibrated threshold.
    n_calibration : int
        Noise micrographs of the calibration.
    rng : numpy.random.Generator or int
        The calibration's noise.

    Returns
    -------
    picks : Picks
        Centres (top-left + ``L // 2``) and scores ``z``; no rotations (see ``template``).
    template : ndarray of int, shape (n,)
        Index of the best template of each pick.
    threshold : float
        The threshold used.
    """
    templates = np.asarray(templates, dtype=np.float64)
    if templates.ndim != 3 or templates.shape[1] != templates.shape[2]:
        raise NumbaemError(f"templates have shape {templates.shape}; give a stack (K, L, L)")
    L = check_L(templates.shape[1], "template side")
    sigma2 = positive_number("sigma2", sigma2, example=1.0)
    d = L if min_distance is None else whole_number("min_distance", min_distance, 1, example=L)
    if threshold is None:
        threshold = calibrate_threshold(np.asarray(images[0]).shape, templates, sigma2, d, false_picks,
                                        n_calibration, rng)
        logger.info("threshold %.3f: about %g false pick(s) per micrograph on noise alone", threshold, false_picks)
    mic, cen, sc, tpl = [], [], [], []
    for m, img in enumerate(images):
        z, best = score_map(np.asarray(img), templates, sigma2)
        pos, s = find_peaks(z, d, threshold)
        mic.append(np.full(len(pos), m, dtype=np.int64))
        cen.append(pos + L // 2)
        sc.append(s)
        tpl.append(best[pos[:, 0], pos[:, 1]] if len(pos) else np.zeros(0, np.int64))
    picks = Picks(np.concatenate(mic), np.concatenate(cen).reshape(-1, 2), np.concatenate(sc))
    return picks, np.concatenate(tpl).astype(np.int64), float(threshold)


def match_picks(picks, true_centres, tolerance):
    """Precision and recall of picks against the true particle centres (module doc).

    Parameters
    ----------
    picks : list of ndarray, shape (n_m, 2)
        Pick centres of each micrograph.
    true_centres : list of ndarray, shape (t_m, 2)
        True centres of each micrograph.
    tolerance : float
        Largest Chebyshev distance (pixels) between a right pick and its particle.

    Returns
    -------
    dict with ``precision``, ``recall``, ``f1``, ``picks``, ``particles``, ``matched``.
    """
    if len(picks) != len(true_centres):
        raise NumbaemError(f"picks for {len(picks)} micrographs but truth for {len(true_centres)}")
    n_pick = n_true = matched = 0
    for p, t in zip(picks, true_centres):
        p = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        t = np.asarray(t, dtype=np.float64).reshape(-1, 2)
        n_pick += len(p)
        n_true += len(t)
        if len(p) == 0 or len(t) == 0:
            continue
        d = np.max(np.abs(p[:, None, :] - t[None, :, :]), axis=2)
        pairs = np.argwhere(d <= tolerance)
        order = np.argsort(d[pairs[:, 0], pairs[:, 1]], kind="stable")
        used_p, used_t = set(), set()
        for i in order:
            a, b = pairs[i]
            if a in used_p or b in used_t:
                continue
            used_p.add(a)
            used_t.add(b)
        matched += len(used_p)
    precision = matched / n_pick if n_pick else float("nan")
    recall = matched / n_true if n_true else float("nan")
    f1 = 2 * matched / (n_pick + n_true) if n_pick + n_true else float("nan")
    return dict(precision=precision, recall=recall, f1=f1, picks=n_pick, particles=n_true, matched=matched)
