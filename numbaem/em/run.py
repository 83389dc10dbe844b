"""Orchestration of the approximate EM (theory sections 4-7): iterations and the run loop.

No numba here: the kernels live in ``projection``, ``estep`` and ``mstep``. One
iteration:

1. draw the minibatch (stochastic factor ``frac``, section 7; all patches when 1);
2. project the current volume for the ``K`` grid rotations and take the spectra;
3. stream the minibatch through the E-step in chunks sized from the memory budget,
   adding into the sufficient statistics (nothing of size patches x rotations x shifts
   outlives a chunk);
4. M-step: ``upsilon``, ``H``, ``b``, Cholesky, optional ``sigma^2``.

The schedule of stages (frequency marching) is in :mod:`numbaem.em.schedule`.
"""
import dataclasses
import logging
import math
import time

import numpy as np

from ..analysis.compare import compare_to_truth
from ..model.basis import FBBasis, expand, resize_theta, synthesize
from ..model.projection import Operator
from ..model.rotations import rotation_grid
from ..runtime import fft
from ..runtime.errors import NumbaemError
from ..runtime.threads import prefer_passive_openmp
from ..runtime.validate import as_rng
from ..runtime.memory import default_budget, peak_rss, reset_peak_rss
from ..model import hopf, viewprior
from .estep import Background, GroupSpectra, Records, choose_precision, choose_route, fold_log_prior, projection_spectra, \
    restrict_shifts, stream_stats
from .mstep import normal_equations, solve, update_sigma2, update_upsilon
from .plan import phi_bytes, plan_iteration, plan_search
from .schedule import (Stage, default_schedule, load_schedule, parse_schedule, schedule_or_default,  # noqa: F401
                       validate_schedule)

logger = logging.getLogger(__name__)

def plan_chunk(budget, K, L, M, n_selected, operator_bytes=None, target=None):
    """Patches per chunk within ``budget`` (see :func:`numbaem.em.plan.plan_iteration`)."""
    return plan_iteration(budget, K, L, M, n_selected, target=target).n_chunk


@dataclasses.dataclass
class EMState:
    """Everything needed to continue a run (checkpointed after each iteration)."""

    theta: np.ndarray
    lmax: int
    upsilon: float
    sigma2: float
    stage: int = 0
    iteration: int = 0        # iterations done within the stage
    total_iterations: int = 0
    rng: np.random.Generator = None
    history: list = dataclasses.field(default_factory=list)
    records: Records = None   # what each patch's posterior held last (for local searches)
    view_weights: np.ndarray = None   # orientation prior: HEALPix cell weights q_b (numbaem.model.viewprior)
    view_floor: float = 0.05          # its floor lambda
    view_grid_ratio: float = viewprior.DEFAULT_GRID_RATIO   # updated only on grids this fine (viewprior.resolves)
    view_fixed: bool = False          # hold the weights (a known distribution): no M-step update
    junk_theta: np.ndarray = None     # junk class: coefficients of its isotropic volume (FBBasis(L, 0)), or None
    varsigma: float = 0.0             # the junk class's prior probability per patch
    junk_lam: np.ndarray = None       # junk class as a field: its shell variances (theory 14.4), or None

    def background(self):
        """What the E-step takes for the states other than the molecule: ``upsilon``, or with
        the junk field its :class:`numbaem.em.estep.Background`."""
        return self.upsilon if self.junk_lam is None else Background(self.upsilon, self.varsigma, self.junk_lam)


class LocalExecutor:
    """Runs the E-step in this process (the default; ``numbaem.em.distributed`` has a Dask one)."""

    def sufficient_stats(self, source, idx, spectra, upsilon, sigma2, n_chunk, progress=None):
        return stream_stats(source, idx, spectra, upsilon, sigma2, n_chunk, progress)


def stage_plan(budget, basis, K, n_selected, n_groups=None, route=None, itemsize=8):
    """The memory plan of an exhaustive stage's iterations (:func:`numbaem.em.plan.plan_iteration`)."""
    return plan_iteration(budget, K, basis.L, basis.M, n_selected,
                          phi=phi_bytes(basis.L, basis.lmax, len(basis.ls_pairs)), lmax=basis.lmax,
                          n_groups=n_groups, route=route, itemsize=itemsize)


def _filters(source):
    """``Psi_g`` of the source's CTF groups (G, L^2, L^2), or None (theory sections 4-6 as they are)."""
    get = getattr(source, "filter_matrices", None)
    return get() if get is not None else None


class SearchOperator:
    """Stands in for :class:`numbaem.model.projection.Operator` in a search stage: the basis and
    the search; the operator of the rotations reached is built in blocks in the M-step."""

    def __init__(self, basis, spec):
        self.basis = basis
        self.spec = spec

    @property
    def K(self):
        return sum(hopf.size(r) for r in self.spec.levels)


def check_search_source(source, stage, where="a search stage"):
    """Refuse a coarse-to-fine search on what it does not model: boxes around picks (a shift window)."""
    if not stage.is_search:
        return
    if getattr(source, "shift_window", None) is not None:
        raise NumbaemError(f"{where} (fine=...) does not run on boxes around picks; give the stages rotations=K "
                           "with --particles")


def em_iteration(state, source, operator, stage, *, estimate_noise=False, tikhonov=0.0,
                 budget=None, progress=None, n_chunk=None, executor=None, temperature=1.0, precision="auto",
                 record=False):
    """One EM iteration (in place on ``state``); returns the iteration's record.

    ``progress`` is an optional callable ``progress(n_done)`` called after each chunk;
    ``executor`` computes the sufficient statistics (default :class:`LocalExecutor`).
    The FFT plan cache is bounded to the plan's workspaces for the iteration.
    ``temperature`` ``T >= 1`` anneals the posterior: the E-step sees the noise variance
    ``T sigma^2``, so every score ``-||y - C T_l Z A_k x||^2 / (2 sigma^2)`` is divided by
    ``T`` (the priors are not); the record's log-likelihood is then the tempered one.

    When ``source`` has CTF groups (``source.filters``, theory section 11) the E-step of
    each group uses its filtered projections ``Psi_g A_k x`` (:class:`GroupSpectra`) and
    the M-step sums the groups' statistics through ``Psi_g``; without, the iteration is
    that of sections 5 and 6, unchanged.

    ``operator`` is the stage's :class:`Operator` for an exhaustive stage, a
    :class:`SearchOperator` for a search (``stage.fine``; :mod:`numbaem.em.search`).
    ``precision`` is the direct route's (:func:`numbaem.em.estep.choose_precision`);
    ``record`` makes the E-step write each patch's record into ``state.records`` (what a
    later local search starts from).
    """
    t0 = time.perf_counter()
    reset_peak_rss()
    basis = operator.basis
    L, M, K = basis.L, basis.M, operator.K
    budget = default_budget() if budget is None else budget
    idx = source.sample(stage.frac, state.rng)
    extra = {}
    junk = False
    sigma2_e = state.sigma2 * temperature
    filters = _filters(source)
    if stage.is_search:
        from .search import SearchModel, search_normal_equations
        check_search_source(source, stage)
        if state.junk_theta is not None or state.junk_lam is not None:
            raise NumbaemError("the junk class runs with exhaustive stages only; give the schedule's stages "
                               "rotations=K instead of fine=STEP")
        spec = stage.search_spec()
        model = SearchModel(state.theta, basis, spec, sigma2=sigma2_e, precision=precision,
                            previous=state.records if spec.local > 0 else None, record=record,
                            view_weights=state.view_weights)
        plan = plan_search(budget, basis, spec, len(idx), model.dtype.itemsize,
                           records=len(state.records or ()), n_groups=None if filters is None else len(filters))
        n_chunk = plan.n_chunk if n_chunk is None else int(n_chunk)
        model.max_rows = plan.parts["max_rows"]
        executor = executor or LocalExecutor()
        stats = executor.sufficient_stats(source, idx, model, state.upsilon, sigma2_e, n_chunk, progress)
        row_rots = model.rotations(stats.rotations) if state.view_weights is not None else None
        del model
        t_e = time.perf_counter()
        H, b = search_normal_equations(stats, spec, basis, max_block_bytes=plan.mstep_block_bytes, filters=filters)
        extra = search_record(stats, spec)
        extra["precision"] = plan.parts["precision"]
        if _view_update(state, _grid_size(stage), extra):
            nside = viewprior.nside_of(state.view_weights)
            state.view_weights = viewprior.update_weights(
                state.view_weights, viewprior.bins_of_rotations(hopf.rotations(spec.fine), nside),
                viewprior.rotation_mass(stats.W), state.view_floor,
                mass_bins=viewprior.bins_of_rotations(row_rots, nside))
    else:
        proj = operator.project(state.theta)
        junk = state.junk_theta is not None
        proj = _with_junk_row(state, proj, L)
        route = choose_route(L)
        dtype = choose_precision(proj, sigma2_e, precision) if route == "direct" else np.dtype(np.float64)
        plan = stage_plan(budget, basis, K + junk, len(idx), None if filters is None else len(filters), route,
                          dtype.itemsize)
        n_chunk = plan.n_chunk if n_chunk is None else int(n_chunk)
        extra["precision"] = str(dtype)
        old_limit = fft.set_cache_limit(plan.fft_cache_bytes)
        try:
            if filters is None:
                spectra = projection_spectra(proj, route=route, precision=str(dtype))
                if record and route == "direct":
                    from ..model.rotations import matrices_to_quaternions
                    q = matrices_to_quaternions(operator.rots)
                    if junk:     # the junk row has no orientation; its records are not used for local searches
                        q = np.concatenate([q, [[1.0, 0.0, 0.0, 0.0]]])
                    spectra.quats = q.astype(np.float32)
            else:
                spectra = GroupSpectra(proj, filters, route=route, precision=str(dtype))
            del proj
            delta, view_bins = _state_log_prior(state, operator.rots)
            if delta is not None:
                spectra = fold_log_prior(spectra, delta, sigma2_e)
            if getattr(source, "shift_window", None) is not None:   # boxes around picks (numbaem.data.boxes)
                spectra = restrict_shifts(spectra, source.shift_window)
            executor = executor or LocalExecutor()
            stats = executor.sufficient_stats(source, idx, spectra, state.background(), sigma2_e, n_chunk, progress)
            del spectra
            t_e = time.perf_counter()
            W, G = (stats.W[..., :K, :, :], stats.G[..., :K, :, :]) if junk else (stats.W, stats.G)
            H, b = normal_equations(operator.blocks(), W, G, L, M, max_block_bytes=plan.mstep_block_bytes,
                                    filters=filters)
            if _view_update(state, K, extra):      # the operator's grid
                state.view_weights = viewprior.update_weights(state.view_weights, view_bins,
                                                              viewprior.rotation_mass(W), state.view_floor)
            if junk:
                junk_update = junk_mstep(stats, K, L, filters, tikhonov)
        finally:
            fft.set_cache_limit(old_limit)
    if getattr(stats, "records", None) is not None:
        state.records = (state.records or Records()).update(stats.records)
    sol = solve(H, b, tikhonov)
    loglik = stats.loglik
    state.theta = sol.theta
    state.upsilon = update_upsilon(stats)
    if state.junk_lam is not None and not stage.is_search:
        state.varsigma, state.junk_lam = junk_field_mstep(stats, state, L)
        extra["varsigma"] = state.varsigma
    if junk:
        H_J, b_J, theta_J, vs = junk_update
        state.varsigma = min(vs, 1.0 - state.upsilon - JUNK_FLOOR)
        if theta_J is not None:
            state.junk_theta = theta_J
            if estimate_noise:   # the junk states' residuals count too: block-diagonal normal equations
                from scipy.linalg import block_diag
                H, b = block_diag(H, H_J), np.concatenate([b, b_J])
                sol = dataclasses.replace(sol, theta=np.concatenate([sol.theta, theta_J]))
        extra["varsigma"] = state.varsigma
    if estimate_noise:
        state.sigma2 = update_sigma2(stats, H, b, sol.theta, L)
    state.iteration += 1
    state.total_iterations += 1
    t1 = time.perf_counter()
    rec = dict(iteration=state.total_iterations, stage=state.stage + 1, stage_iteration=state.iteration,
               lmax=basis.lmax, K=K, M=M, patches=int(len(idx)), chunk=int(n_chunk),
               loglik=float(loglik), loglik_per_patch=float(loglik / len(idx)),
               upsilon=state.upsilon, sigma2=state.sigma2, tikhonov=sol.tikhonov,
               seconds=t1 - t0, seconds_estep=t_e - t0, seconds_mstep=t1 - t_e, peak_memory=peak_rss(),
               planned_peak_bytes=int(plan.peak), temperature=float(temperature),
               filter_groups=None if filters is None else len(filters))
    if state.view_weights is not None:
        rec["view_weights"] = state.view_weights.tolist()
    rec.update(extra)
    return rec


def junk_operator(L):
    """``A_J`` (L^2, M_0): the projection of the junk class's isotropic volume (``FBBasis(L, 0)``),
    the same for every rotation (taken at the identity)."""
    from ..model.projection import projection_matrices
    return projection_matrices(FBBasis(L, 0), np.eye(3)[None])[0]


def _with_junk_row(state, proj, L):
    """``proj`` (K, L, L) with the image junk class's row ``K`` appended (the same image at
    every rotation, theory section 14.2) when the state has one."""
    if state.junk_theta is None:
        return proj
    return np.concatenate([proj, (junk_operator(L) @ state.junk_theta).reshape(1, L, L)])


def _grid_size(stage):
    """Rotations of a stage's grid: ``K``, or a search's fine Hopf level's."""
    return hopf.size(stage.search_spec().fine) if stage.is_search else stage.rotations


def _view_update(state, K, extra):
    """Whether this iteration's M-step updates the orientation prior's weights, on a grid of ``K``
    rotations (:func:`_grid_size`: a search's is its fine level's): a prior that is on, not held fixed, on a grid that
    resolves its cells (:func:`numbaem.model.viewprior.resolves`, theory section 14.1). Writes
    ``view_prior`` ('updated', 'held' or 'fixed') into the record ``extra``."""
    if state.view_weights is None:
        return False
    if state.view_fixed:
        extra["view_prior"] = "fixed"
        return False
    nside = viewprior.nside_of(state.view_weights)
    if viewprior.resolves(K, nside, state.view_grid_ratio):
        extra["view_prior"] = "updated"
        return True
    extra["view_prior"] = "held"
    if state.iteration == 0:
        logger.info("orientation prior held on this stage: its grid's step of %.0f degrees is coarser than %.2g of "
                    "the %.0f-degree cells (finer stages update it; a coarser NSIDE or a larger grid ratio "
                    "updates it here)", math.degrees(viewprior.grid_step(K)), state.view_grid_ratio,
                    math.degrees(viewprior.cell_size(nside)))
    return False


def _state_log_prior(state, rots):
    """``(delta, view_bins)``: the per-row log-prior offsets of the state's orientation prior
    and image junk class over the grid ``rots`` (:func:`numbaem.em.estep.fold_log_prior`; the
    junk row's last) and the grid's view cells, or None for what the state does not have."""
    if state.view_weights is None and state.junk_theta is None:
        return None, None
    delta, bins = np.zeros(len(rots)), None
    if state.view_weights is not None:
        bins = viewprior.bins_of_rotations(rots, viewprior.nside_of(state.view_weights))
        delta = viewprior.log_offsets(state.view_weights, bins)
    if state.junk_theta is not None:
        delta = junk_offsets(delta, state.upsilon, state.varsigma)
    return delta, bins


def junk_offsets(delta, upsilon, varsigma):
    """Log-prior offsets (K + 1,) of the molecule's rows and the junk row, relative to the kernel's
    scalar prior ``(1 - upsilon) / ((2L-1)^2 (K + 1))`` (theory section 14.2).

    A molecule state of rotation ``k`` has prior ``(1 - upsilon - varsigma) p_k / (2L-1)^2``
    with ``p_k = exp(delta_k) / K``, a junk state ``varsigma / (2L-1)^2``.
    """
    delta = np.asarray(delta, dtype=np.float64)
    K = len(delta)
    base = math.log1p(-upsilon) - math.log(K + 1)
    mol = math.log(1.0 - upsilon - varsigma) + delta - math.log(K) - base
    return np.append(mol, math.log(varsigma) - base)


#: Bounds of the junk class's prior: it neither dies out nor leaves the molecule no mass.
JUNK_FLOOR = 1e-4


def junk_mstep(stats, K, L, filters=None, tikhonov=0.0):
    """The junk class's M-step from the statistics' row ``K``: ``(H_J, b_J, theta_J, varsigma)``.

    ``varsigma = sum_{j,l} w_{j,J,l} / Nd`` (kept within ``[JUNK_FLOOR, 1 - upsilon - JUNK_FLOOR]``
    by the caller's next E-step: clipped here to ``[JUNK_FLOOR, 1 - 2 JUNK_FLOOR]``) and the
    coefficients by the weighted least squares of section 6 with the one operator ``A_J``;
    ``theta_J`` is None (kept) when the row holds no mass.
    """
    W_J, G_J = stats.W[..., K:K + 1, :, :], stats.G[..., K:K + 1, :, :]
    mass = float(W_J.sum())
    vs = min(max(mass / stats.n_patches, JUNK_FLOOR), 1.0 - 2 * JUNK_FLOOR)
    A_J = junk_operator(L)
    if not mass > 0:
        return None, None, None, vs
    H_J, b_J = normal_equations([(slice(0, 1), A_J[None])], W_J, G_J, L, A_J.shape[1], filters=filters)
    return H_J, b_J, solve(H_J, b_J, tikhonov).theta, vs


#: The junk class's models (theory section 14): an isotropic volume, or a stationary field.
JUNK_MODELS = ("image", "field")
#: Patches whose spectra start the junk field (a seeded sample).
JUNK_START_PATCHES = 4000


def junk_model(junk_class):
    """``junk_class`` as False or one of :data:`JUNK_MODELS` (True: the default, ``'field'``)."""
    if junk_class is None or junk_class is False:
        return False
    if junk_class is True:
        return "field"
    if junk_class not in JUNK_MODELS:
        raise NumbaemError(f"junk class {junk_class!r} is not one of {', '.join(JUNK_MODELS)}; e.g. 'field'")
    return junk_class


def junk_field_mstep(stats, state, L):
    """The junk field's M-step (theory section 14.4): ``varsigma = sum_j r_j / Nd`` (within
    ``[JUNK_FLOOR, 1 - upsilon - JUNK_FLOOR]``, ``upsilon`` already updated) and the shell
    variances :func:`numbaem.model.junkfield.update_spectrum` (kept when no patch is junk)."""
    from ..model.junkfield import update_spectrum
    mass, power = float(stats.junk[0]), stats.junk[1:]
    vs = min(max(mass / stats.n_patches, JUNK_FLOOR), 1.0 - state.upsilon - JUNK_FLOOR)
    lam = update_spectrum(power, mass, state.sigma2, L) if mass > 0 else state.junk_lam
    return float(vs), lam


def search_record(stats, spec):
    """The per-iteration figures of a search (for the iteration's record and the bench).

    ``search_pairs`` per level, ``search_fraction_fine`` (pairs scored at the fine level
    over patches x its rotations), ``search_fraction_all`` (pairs scored at every level over
    patches x the fine level's rotations: the cost relative to an exhaustive search on the
    fine level), ``search_final_level`` (patches whose posteriors live on each level),
    ``search_mass_pruned_mean`` / ``_max`` (per patch), ``search_seconds`` per pass,
    ``search_rows`` (rotations reached) and ``search_local`` (patches searched locally).
    """
    rep = stats.search or {}
    n = max(1, int(rep.get("patches", stats.n_patches)))
    Kf = hopf.size(spec.fine)
    pairs = {r: int(rep.get(f"pairs_level_{r}", 0)) for r in spec.levels}
    return dict(search_levels=list(spec.levels),
                search_steps=[hopf.level_step(r) for r in spec.levels],
                search_pairs=pairs,
                search_fraction_fine=pairs[spec.fine] / (n * Kf),
                search_fraction_all=sum(pairs.values()) / (n * Kf),
                search_final_level={r: int(rep.get(f"patches_final_level_{r}", 0)) for r in spec.levels},
                search_mass_pruned_mean=float(rep.get("mass_pruned", 0.0)) / n,
                search_mass_pruned_max=float(rep.get("max_mass_pruned", 0.0)),
                search_seconds={k[8:]: float(v) for k, v in rep.items() if k.startswith("seconds_")},
                search_rows=int(len(stats.rotations)),
                search_local=int(rep.get("patches_local", 0)))


def sample_patches(source, rng, n=2000):
    """A seeded sample of up to ``n`` patches drawn uniformly from every micrograph.

    Start values (the scale of a random start, the noise variance) are estimated from
    it, so they do not depend on the first micrograph alone.

    Returns
    -------
    patches : ndarray, shape (m, L, L), ``m = min(n, Nd)``
    """
    m = min(int(n), source.n_patches)
    idx = np.sort(rng.choice(source.n_patches, size=m, replace=False)) if m < source.n_patches \
        else np.arange(source.n_patches)
    return source.get(idx)


def initial_noise_variance(patches, quantile=0.25):
    """A start for ``sigma^2`` from the low-signal patches of a sample.

    The mean square ``||y_j||^2 / L^2`` of an empty patch is ``sigma^2 chi^2_{L^2} / L^2``;
    patches that hold a projection only lie higher. The ``quantile`` of the sample's mean
    squares divided by the same quantile of ``chi^2_{L^2} / L^2`` is therefore unbiased
    when at least that fraction of the patches is empty, and biased upwards only by the
    occupied patches that fall below it, never by the signal of all of them (the pixel
    variance is). It is refined by EM afterwards (section 6).

    Parameters
    ----------
    patches : ndarray, shape (n, L, L)
    quantile : float
        Fraction of patches assumed empty at least (default 0.25).
    """
    from scipy.stats import chi2

    n, L, _ = patches.shape
    ms = np.einsum("jab,jab->j", patches, patches) / (L * L)
    val = float(np.quantile(ms, quantile)) / (chi2.ppf(quantile, L * L) / (L * L))
    if not val > 0:
        raise NumbaemError("the micrographs' patches have no variance (all pixels equal?); check the input files")
    return val


def data_scale(theta, basis, source, sigma2, rng):
    """The factor that gives ``theta``'s projections the data's energy.

    The mean projection energy over 20 grid rotations is matched to the data's excess
    energy over the noise, ``mean ||y_j||^2 - L^2 sigma^2`` per patch, over a seeded
    sample of patches from every micrograph (:func:`sample_patches`).
    """
    from ..model.projection import project

    L = basis.L
    y = sample_patches(source, rng)
    excess = max(float(np.mean(np.sum(y ** 2, axis=(1, 2)))) - L * L * sigma2, 1e-3 * L * L * sigma2)
    p = project(theta, basis, rotation_grid(20))
    return math.sqrt(excess / max(np.mean(np.sum(p ** 2, axis=(1, 2))), 1e-300))


def initial_theta(init, L, lmax, rng=None, source=None, sigma2=None, scale=False):
    """Coefficients of the initial guess: a volume (L^3 array) or ``'random'``.

    A random start draws Gaussian coefficients (seeded ``rng``) scaled by
    :func:`data_scale` when the data are given. A volume is expanded as it is, or, with
    ``scale`` (a start in other units, such as an atomic model's density), scaled the
    same way.
    """
    basis = FBBasis(L, lmax)
    if isinstance(init, str):
        if init != "random":
            raise NumbaemError(f"init={init!r} is neither a volume nor 'random'")
        rng, _ = as_rng(np.random.default_rng() if rng is None else rng)
        theta = rng.standard_normal(basis.M)
        if source is not None and sigma2 is not None:
            theta *= data_scale(theta, basis, source, sigma2, rng)
        return theta
    vol = np.asarray(init, dtype=np.float64)
    if vol.shape != (L, L, L):
        raise NumbaemError(f"the initial volume is {vol.shape[0]}^3 but the patch size is L={L}; "
                           f"downsample it to side {L} first (numbaem reconstruct --downsample-init does this)")
    theta = expand(vol, basis)
    if scale and source is not None and sigma2 is not None:
        rng, _ = as_rng(np.random.default_rng() if rng is None else rng)
        theta *= data_scale(theta, basis, source, sigma2, rng)
    return theta


@dataclasses.dataclass
class Reconstruction:
    """What :func:`reconstruct` returns.

    Attributes
    ----------
    volume : ndarray, shape (L, L, L)
        The estimate as a map (axes x, y, z; voxel ``n`` at ``n - L // 2``).
    pixel_size : float or None
        Its voxel size in Angstrom (the patches' pixel size), when known.
    theta : ndarray, shape (M,)
        Its Fourier-Bessel coefficients in ``basis``.
    basis : FBBasis
        The basis of the last stage.
    upsilon, sigma2 : float
        The empty-patch probability and the noise variance reached.
    history : list of dict
        One record per iteration.
    state : EMState
        Everything needed to continue the run (``reconstruct(..., state=result.state)``).
    stopped : bool
        True when ``should_stop`` ended the run before the schedule did.
    restarts : list of dict or None
        With ``restarts > 1``: one record per restart (``restart``, ``loglik`` on the common
        patches, ``kept``, and the truth comparison when a truth was given).
    """

    volume: np.ndarray
    pixel_size: float
    theta: np.ndarray
    basis: FBBasis
    upsilon: float
    sigma2: float
    history: list
    state: "EMState"
    stopped: bool = False
    restarts: list = None


def anneal_temperature(anneal, iteration):
    """The temperature of iteration ``iteration`` (0-based, counted over the whole run).

    ``anneal = (T0, n)``: ``T = T0^(1 - t/n)`` for ``t < n`` (geometric, from ``T0`` down
    towards 1), then 1; ``None`` is no annealing.
    """
    if anneal is None:
        return 1.0
    T0, n = anneal
    return float(T0) ** (1.0 - iteration / n) if iteration < n else 1.0


def _check_anneal(anneal):
    if anneal is None:
        return None
    try:
        T0, n = anneal
        T0, n = float(T0), int(n)
    except (TypeError, ValueError):
        raise NumbaemError(f"anneal={anneal!r} is not a pair (T0, iterations); pass e.g. anneal=(8, 6)") from None
    if not (math.isfinite(T0) and T0 >= 1) or n < 1:
        raise NumbaemError(f"anneal={anneal!r}: the start temperature must be >= 1 and the iterations >= 1; "
                           "pass e.g. anneal=(8, 6)")
    return T0, n


def reconstruct(source, init, *, sigma2=None, estimate_noise=False, schedule=None, upsilon0=0.5,
                rng=None, memory=None, tikhonov=0.0, truth=None, callback=None, progress=True,
                state=None, should_stop=None, executor=None, anneal=None, restarts=1, scale_init=False,
                precision="auto", orientation_prior=None, prior_floor=0.05, junk_class=False, varsigma0=0.1,
                prior_weights=None, prior_fixed=False, prior_grid_ratio=viewprior.DEFAULT_GRID_RATIO):
    """Run the approximate EM with frequency marching.

    Parameters
    ----------
    source : numbaem.data.patches.PatchSource
    init : ndarray (L, L, L) or 'random'
    sigma2 : float, optional
        Noise variance of the patches' pixels. Required unless ``estimate_noise``; with
        it, the starting value (default: :func:`initial_noise_variance` of a seeded
        sample of patches from every micrograph).
    estimate_noise : bool
        Update ``sigma^2`` by EM each iteration (section 6).
    schedule : list of Stage, optional
        Default :func:`schedule_or_default`: :func:`default_schedule`, its exhaustive
        variant on boxes around picks and with the junk class.
    upsilon0 : float
        Initial probability of an empty patch.
    rng : numpy.random.Generator or int, optional
        Draws the minibatches, the start-value samples and a random start (a seed makes
        one; default unseeded).
    memory : int
        Budget in bytes for one iteration's arrays (default a quarter of the RAM).
    tikhonov : float
        ``lambda`` of the regularised solve.
    truth : ndarray (L, L, L), optional
        When given, each record carries the FSC resolution and relative error of the
        estimate against it, after alignment (section 8; see :func:`compare_to_truth`).
    callback : callable(state, record), optional
        Called after each iteration (checkpointing, logging).
    progress : bool
        tqdm progress bars.
    state : EMState, optional
        Resume from this state (the schedule position it records).
    should_stop : callable() -> bool, optional
        Polled between iterations; a true value ends the run early (the state is
        consistent: it holds only finished iterations).
    executor : object with ``sufficient_stats(...)``, optional
        Where the E-step runs (default in-process; see ``numbaem.em.distributed``).
    anneal : (float, int), optional
        ``(T0, n)``: anneal the posterior over the first ``n`` iterations, from temperature
        ``T0`` geometrically down to 1 (:func:`anneal_temperature`; the E-step sees
        ``T sigma^2``). Ab initio runs use it to keep many poses alive early on: the tempered
        posterior spreads every patch over many rotations and shifts, the M-step's average
        shrinks the random start to a small, nearly round blob made of the data, and the
        structure grows back from it as the temperature falls. (Holding the estimate at
        the data's energy during annealing instead was tried and converged to wrong
        structures more often.)
    restarts : int
        With ``init='random'``: run the whole schedule from this many seeded random starts
        (generators spawned from ``rng``) and keep the run whose final estimate has the
        highest log-likelihood on one common set of patches (:func:`log_likelihood`).
    scale_init : bool
        Scale a volume start by :func:`data_scale` (for starts in other units, e.g. an
        atomic model's density). The data's excess energy is a mean over all patches,
        empty ones included, so the start comes out somewhat small; the first M-step
        sets the scale.
    precision : {'auto', 'float32', 'float64'}
        Floating-point type of the direct route's scores (``numbaem.em.estep.choose_precision``:
        'auto' takes float32 where its rounding stays below 1e-3 nats).
    orientation_prior : int, optional
        Estimate a prior over viewing directions on the ``12 nside^2`` HEALPix cells of this
        ``nside`` (:mod:`numbaem.model.viewprior`; theory section 14.1),
        starting uniform; None: every rotation ``1/K`` (today's model, the same bits).
    prior_floor : float
        Its floor ``lambda``: each update mixes in ``lambda`` of the uniform distribution.
    prior_weights : array_like, shape (12 nside^2,), optional
        Start the prior from these positive cell weights (a known distribution of viewing
        directions, e.g. a previous run's) instead of uniform; switches the prior on, at the
        ``nside`` of their length (``orientation_prior``, if given, must agree).
    prior_fixed : bool
        Hold the prior at its start (no M-step update): a known distribution of views.
    prior_grid_ratio : float
        Update the prior only on stages whose grid step is at most this fraction of the cells'
        size (:func:`numbaem.model.viewprior.resolves`; coarser stages hold it); ``inf``: on
        every stage.
    junk_class : bool or {'field', 'image'}
        Add a junk class for contaminants; exhaustive stages only. ``'field'`` (``True``): a
        patch of junk is a stationary Gaussian field with its own radial spectrum, estimated
        (:mod:`numbaem.model.junkfield`, started from the patches of most energy; theory
        section 14.4); ``'image'``: an isotropic volume of ``FBBasis(L, 0)`` started at the
        spherical average of the start (theory section 14.2).
    varsigma0 : float
        The junk class's starting prior probability per patch.

    Returns
    -------
    Reconstruction
        The estimate as a map with its pixel size, its coefficients, the history, and
        the state to continue from.
    """
    prefer_passive_openmp()   # before numba's OpenMP runtime loads (numbaem.runtime.threads)
    L = source.L
    rng, _ = as_rng(np.random.default_rng() if rng is None else rng)
    if state is None and sigma2 is None and estimate_noise:
        sigma2 = initial_noise_variance(sample_patches(source, rng))
        logger.info("noise variance start %.4g (from the low-signal patches of a sample of %d)", sigma2,
                    min(2000, source.n_patches))
    if sigma2 is None or not (sigma2 > 0) or not math.isfinite(sigma2):
        raise NumbaemError(f"noise variance sigma2={sigma2} must be a positive number; give the noise variance "
                           "of the patches' pixels, or estimate it (estimate_noise=True)")
    if not 0 < upsilon0 < 1:
        raise NumbaemError(f"upsilon0={upsilon0} must lie strictly between 0 and 1")
    boxes = getattr(source, "shift_window", None) is not None
    schedule = validate_schedule(schedule_or_default(schedule, L, boxes, junk_class), L)
    budget = default_budget() if memory is None else int(memory)
    anneal = _check_anneal(anneal)
    restarts = int(restarts)
    if restarts < 1:
        raise NumbaemError(f"restarts={restarts} must be at least 1")
    if restarts > 1:
        if not (isinstance(init, str) and init == "random") or state is not None:
            raise NumbaemError("restarts > 1 needs init='random' and no state to resume; several starts from one "
                               "volume would be the same run")
        return _best_of_restarts(source, sigma2=sigma2, estimate_noise=estimate_noise, schedule=schedule,
                                 upsilon0=upsilon0, rng=rng, memory=budget, tikhonov=tikhonov, truth=truth,
                                 callback=callback, progress=progress, should_stop=should_stop, executor=executor,
                                 anneal=anneal, restarts=restarts, precision=precision,
                                 orientation_prior=orientation_prior, prior_floor=prior_floor, junk_class=junk_class,
                                 varsigma0=varsigma0, prior_weights=prior_weights, prior_fixed=prior_fixed,
                                 prior_grid_ratio=prior_grid_ratio)
    if prior_weights is not None:
        prior_weights = viewprior.check_weights(prior_weights, orientation_prior)
        orientation_prior = viewprior.nside_of(prior_weights)
    elif prior_fixed:
        raise NumbaemError("prior_fixed holds the orientation prior at its start; give that start as prior_weights "
                           "(12 nside^2 positive cell weights), or drop prior_fixed to estimate it")
    if orientation_prior is not None:
        nside = viewprior.check_nside(orientation_prior)
        prior_floor = viewprior.check_floor(prior_floor)
        prior_grid_ratio = viewprior.check_grid_ratio(prior_grid_ratio)
        if not prior_fixed and not any(viewprior.resolves(_grid_size(st), nside, prior_grid_ratio) for st in schedule):
            logger.warning("the orientation prior is never updated (it stays at its start): no stage's rotation grid "
                           "is fine enough for its %.0f-degree cells (step <= %.2g of a cell); add a finer stage "
                           "(e.g. fine=15), take coarser cells (a smaller NSIDE) or a larger grid ratio",
                           math.degrees(viewprior.cell_size(nside)), prior_grid_ratio)
    junk_class = junk_model(junk_class)
    if junk_class:
        if any(st.is_search for st in schedule):
            raise NumbaemError("the junk class runs with exhaustive stages only; give a schedule whose stages all "
                               "have rotations=K (e.g. 'lmax=2,iters=5,frac=1,rotations=600;lmax=4,iters=5,frac=1,rotations=600')")
        if not 0 < varsigma0 < 1 - upsilon0:
            raise NumbaemError(f"varsigma0={varsigma0} must lie strictly between 0 and 1 - upsilon0 = {1 - upsilon0:g}")
    stopped = False
    if state is None:
        theta = initial_theta(init, L, schedule[0].lmax, rng=rng, source=source, sigma2=sigma2, scale=scale_init)
        state = EMState(theta=theta, lmax=schedule[0].lmax, upsilon=upsilon0, sigma2=float(sigma2), rng=rng)
        if orientation_prior is not None:
            state.view_weights, state.view_floor = np.ones(12 * nside * nside), prior_floor
            state.view_grid_ratio = prior_grid_ratio
            if prior_weights is not None:
                state.view_weights, state.view_fixed = prior_weights / prior_weights.mean(), bool(prior_fixed)
        if junk_class == "image":
            state.junk_theta = resize_theta(theta, FBBasis(L, schedule[0].lmax), FBBasis(L, 0))
        elif junk_class == "field":
            from ..model.junkfield import start_spectrum
            sample = source.sample(min(1.0, JUNK_START_PATCHES / source.n_patches), state.rng)
            state.junk_lam = start_spectrum(source.get(sample), sigma2)
        if junk_class:
            state.varsigma = float(varsigma0)
    total = sum(st.iters for st in schedule)
    bar = _progress(total, progress, "EM iterations", state.total_iterations)
    try:
        while state.stage < len(schedule):
            stage = schedule[state.stage]
            if state.iteration >= stage.iters:
                state.stage += 1
                state.iteration = 0
                continue
            basis = FBBasis(L, stage.lmax)
            if state.lmax != stage.lmax:
                state.theta = resize_theta(state.theta, FBBasis(L, state.lmax), basis)
                state.lmax = stage.lmax
            fft.clear_cache()  # the previous stage's chunk buffers (another K) are not reused
            n_sel = int(math.ceil(stage.frac * source.n_patches))
            filters = _filters(source)
            if stage.is_search:
                check_search_source(source, stage, f"stage {state.stage + 1}, a search")
                spec = stage.search_spec()
                plan_search(budget, basis, spec, n_sel, 8, records=source.n_patches,   # refuse early if too small
                            n_groups=None if filters is None else len(filters))
                op = SearchOperator(basis, spec)
                logger.info("stage %d/%d: lmax=%d (M=%d), search %s degrees (levels %d-%d), prune %g%s, frac=%g, "
                            "%d iterations", state.stage + 1, len(schedule), stage.lmax, basis.M,
                            "-".join(f"{hopf.level_step(r):g}" for r in spec.levels), spec.coarse, spec.fine,
                            spec.prune, f", local {spec.local:g} degrees" if spec.local else "", stage.frac,
                            stage.iters)
            else:
                plan = stage_plan(budget, basis, stage.rotations, n_sel, None if filters is None else len(filters),
                                  route=choose_route(L))
                op = Operator(basis, rotation_grid(stage.rotations), plan.parts["operator"])
                logger.info("stage %d/%d: lmax=%d (M=%d), K=%d, frac=%g, %d iterations", state.stage + 1,
                            len(schedule), stage.lmax, basis.M, stage.rotations, stage.frac, stage.iters)
            record = any(st.is_search and st.local > 0 for st in schedule[state.stage:])
            while state.iteration < stage.iters:
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                inner = _progress(n_sel, progress, "E-step patches", 0, leave=False)
                temperature = anneal_temperature(anneal, state.total_iterations)
                rec = em_iteration(state, source, op, stage, estimate_noise=estimate_noise, tikhonov=tikhonov,
                                   budget=budget, progress=inner.update if inner else None,
                                   executor=executor, temperature=temperature, precision=precision, record=record)
                if inner:
                    inner.close()
                if truth is not None:
                    rec.update(compare_to_truth(state.theta, basis, truth))
                state.history.append(rec)
                logger.info("iteration %d (stage %d, lmax %d): loglik/patch %.6g, upsilon %.4f, sigma2 %.4g, %.2f s%s",
                            rec["iteration"], rec["stage"], rec["lmax"], rec["loglik_per_patch"], rec["upsilon"],
                            rec["sigma2"], rec["seconds"],
                            f", aligned FSC 0.5 at {rec['fsc_resolution']:.4f} 1/px" if "fsc_resolution" in rec else "")
                if callback is not None:
                    callback(state, rec)
                if bar:
                    bar.update(1)
            if stopped:
                break
            state.stage += 1
            state.iteration = 0
    finally:
        if bar:
            bar.close()
    basis = FBBasis(L, state.lmax)
    return Reconstruction(volume=synthesize(state.theta, basis), pixel_size=getattr(source, "pixel_size", None),
                          theta=state.theta, basis=basis, upsilon=state.upsilon, sigma2=state.sigma2,
                          history=state.history, state=state, stopped=stopped)


def log_likelihood(source, theta, basis, K, upsilon, sigma2, idx=None, memory=None, state=None):
    """The approximate log-likelihood (theory section 4) of ``theta`` on the patches ``idx``.

    One E-step pass (no M-step) with the ``K``-rotation grid; ``idx`` defaults to every
    patch; the source's CTF groups filter the projections as in the EM. With ``state`` its
    extensions enter as in its iterations (theory section 14): the orientation prior's
    weights, the junk class (image row or field) with its ``varsigma``. Used to compare runs
    (restarts) on the same patches.
    """
    budget = default_budget() if memory is None else int(memory)
    idx = np.arange(source.n_patches) if idx is None else np.asarray(idx, dtype=np.int64)
    L = basis.L
    filters = _filters(source)
    image_junk = state is not None and state.junk_theta is not None
    plan = stage_plan(budget, basis, K + image_junk, len(idx), None if filters is None else len(filters))
    old_limit = fft.set_cache_limit(plan.fft_cache_bytes)
    try:
        rots = rotation_grid(K)
        op = Operator(basis, rots, plan.parts["operator"])
        proj = op.project(theta)
        background, delta = upsilon, None
        if state is not None:
            proj = _with_junk_row(state, proj, L)
            delta, _ = _state_log_prior(state, rots)
            background = state.background()
        spectra = projection_spectra(proj) if filters is None else GroupSpectra(proj, filters)
        if delta is not None:
            spectra = fold_log_prior(spectra, delta, sigma2)
        if getattr(source, "shift_window", None) is not None:
            spectra = restrict_shifts(spectra, source.shift_window)
        stats = LocalExecutor().sufficient_stats(source, idx, spectra, background, sigma2, plan.n_chunk)
    finally:
        fft.set_cache_limit(old_limit)
    return float(stats.loglik)


def _tagged(callback, restart):
    """``callback`` with each record tagged by its restart."""
    def cb(state, rec):
        rec["restart"] = restart
        callback(state, rec)
    return cb


def _best_of_restarts(source, *, restarts, rng, schedule, truth, callback, memory, **kw):
    """``restarts`` runs from random starts; the one with the highest log-likelihood is returned."""
    rng, _ = as_rng(np.random.default_rng() if rng is None else rng)
    last = schedule[-1]
    # One common set of patches to compare the runs on: all of them, or a seeded sample of
    # the last stage's minibatch size.
    idx = source.sample(last.frac, rng)
    children = rng.spawn(restarts)
    runs, records = [], []
    for r, child in enumerate(children):
        cb = None if callback is None else _tagged(callback, r)
        res = reconstruct(source, "random", rng=child, schedule=schedule, truth=truth, callback=cb, memory=memory,
                          restarts=1, **kw)
        ll = log_likelihood(source, res.theta, res.basis, last.rotations, res.upsilon, res.sigma2, idx, memory,
                            state=res.state)
        rec = dict(restart=r, loglik=ll, loglik_per_patch=ll / len(idx), upsilon=res.upsilon, stopped=res.stopped)
        if truth is not None:
            rec.update(compare_to_truth(res.theta, res.basis, truth))
        logger.info("restart %d/%d: loglik/patch %.6g%s", r + 1, restarts, rec["loglik_per_patch"],
                    f", aligned FSC 0.5 at {rec['fsc_resolution']:.4f} 1/px, relative error "
                    f"{rec['relative_error']:.3f}" if truth is not None else "")
        runs.append(res)
        records.append(rec)
        if res.stopped:
            break
    best = int(np.argmax([rec["loglik"] for rec in records]))
    for rec in records:
        rec["kept"] = rec["restart"] == best
    logger.info("kept restart %d of %d (highest log-likelihood)", best + 1, len(records))
    out = runs[best]
    out.restarts = records
    out.stopped = any(res.stopped for res in runs)
    return out


def _progress(total, enabled, desc, initial=0, leave=True):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, initial=initial, leave=leave, unit="it" if leave else "patch",
                dynamic_ncols=True)
