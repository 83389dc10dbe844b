"""Orchestration of the approximate EM (MODEL sections 4-7): iterations and the run loop.

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
from ..model.basis import FBBasis, expand, resize_theta
from ..model.projection import Operator
from ..model.rotations import rotation_grid
from ..runtime import fft
from ..runtime.errors import NumbaemError
from ..runtime.memory import default_budget, format_size, peak_rss, reset_peak_rss
from .estep import chunk_bytes, projection_spectra, stream_stats
from .mstep import normal_equations, solve, update_sigma2, update_upsilon
from .schedule import Stage, default_schedule, load_schedule, parse_schedule, validate_schedule  # noqa: F401

logger = logging.getLogger(__name__)

# Work arrays of one chunk are kept near this size when the budget allows more: the
# E-step passes over them several times, and a chunk that stays in cache runs faster
# than one streamed from main memory. Measured on the 2-core machine (bench, 2 threads):
# L=7, K=300: 1.15 / 0.98 / 0.88 / 0.91 / 1.35 us per (patch, rotation) at chunks of
# 8 / 16 / 32 / 64 / 128 MiB; L=11, K=560: 3.69 / 3.49 / 3.56 / 4.31 at 16 / 32 / 64 / 128.
# Override with NUMBAEM_CHUNK_BYTES.
CHUNK_TARGET_BYTES = 32 << 20


def chunk_target_bytes():
    import os
    try:
        return int(float(os.environ.get("NUMBAEM_CHUNK_BYTES", CHUNK_TARGET_BYTES)))
    except ValueError:
        return CHUNK_TARGET_BYTES


def plan_chunk(budget, K, L, M, n_selected, operator_bytes, target=None):
    """Patches per chunk so that the iteration's arrays stay inside ``budget`` bytes.

    Counts the operator (or one block of it), the spectra and statistics (size K),
    ``H``, and per patch the chunk's work arrays (:func:`numbaem.em.estep.chunk_bytes`).
    Raises if not even one patch fits. Within the budget, a chunk is also kept near
    ``target`` bytes (default :data:`CHUNK_TARGET_BYTES`); the E-step kernels are
    parallel over rotations, so even a one-patch chunk keeps every thread busy.
    """
    fixed = (operator_bytes
             + 3 * K * ((2 * L) ** 2 * 8 + (2 * L) * (L + 1) * 16)   # spectra, W, G, and transforms in M-step
             + 4 * K * L * L * 8                                        # projections, h, g
             + 3 * M * M * 8 + (64 << 20))                              # H, its factor, slack for the interpreter
    per = chunk_bytes(1, K, L)
    room = budget - fixed
    if room < per:
        need = fixed + per
        raise NumbaemError(f"the memory budget {format_size(budget)} is too small for K={K} rotations at L={L}, "
                           f"lmax with M={M}: at least {format_size(need)} is needed; raise --memory or lower rotations")
    target = chunk_target_bytes() if target is None else int(target)
    want = max(1, target // per)
    return int(max(1, min(n_selected, room // per, want)))


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


class LocalExecutor:
    """Runs the E-step in this process (the default; ``numbaem.em.distributed`` has a Dask one)."""

    def sufficient_stats(self, source, idx, spectra, upsilon, sigma2, n_chunk, progress=None):
        return stream_stats(source, idx, spectra, upsilon, sigma2, n_chunk, progress)


def em_iteration(state, source, operator, stage, *, estimate_noise=False, tikhonov=0.0,
                 budget=None, progress=None, n_chunk=None, executor=None):
    """One EM iteration (in place on ``state``); returns the iteration's record.

    ``progress`` is an optional callable ``progress(n_done)`` called after each chunk;
    ``executor`` computes the sufficient statistics (default :class:`LocalExecutor`).
    """
    t0 = time.perf_counter()
    reset_peak_rss()
    basis = operator.basis
    L, M, K = basis.L, basis.M, operator.K
    budget = default_budget() if budget is None else budget
    idx = source.sample(stage.frac, state.rng)
    proj = operator.project(state.theta)
    spectra = projection_spectra(proj)
    if n_chunk is None:
        n_chunk = plan_chunk(budget, K, L, M, len(idx), operator.nbytes or operator.block * L * L * M * 8)
    executor = executor or LocalExecutor()
    stats = executor.sufficient_stats(source, idx, spectra, state.upsilon, state.sigma2, n_chunk, progress)
    t_e = time.perf_counter()
    H, b = normal_equations(operator.blocks(), stats.W, stats.G, L, M)
    sol = solve(H, b, tikhonov)
    loglik = stats.loglik
    state.theta = sol.theta
    state.upsilon = update_upsilon(stats)
    if estimate_noise:
        state.sigma2 = update_sigma2(stats, H, b, sol.theta, L)
    state.iteration += 1
    state.total_iterations += 1
    t1 = time.perf_counter()
    return dict(iteration=state.total_iterations, stage=state.stage + 1, stage_iteration=state.iteration,
                lmax=basis.lmax, K=K, M=M, patches=int(len(idx)), chunk=int(n_chunk),
                loglik=float(loglik), loglik_per_patch=float(loglik / len(idx)),
                upsilon=state.upsilon, sigma2=state.sigma2, tikhonov=sol.tikhonov,
                seconds=t1 - t0, seconds_estep=t_e - t0, seconds_mstep=t1 - t_e, peak_memory=peak_rss())


def initial_theta(init, L, lmax, rng=None, source=None, sigma2=None):
    """Coefficients of the initial guess: a volume (L^3 array) or ``'random'``.

    A random start draws Gaussian coefficients (seeded ``rng``) scaled so that the mean
    projection energy matches the data's excess energy over the noise,
    ``mean ||y_j||^2 - L^2 sigma^2`` per occupied patch, when the data are given.
    """
    basis = FBBasis(L, lmax)
    if isinstance(init, str):
        if init != "random":
            raise NumbaemError(f"init={init!r} is neither a volume nor 'random'")
        rng = np.random.default_rng() if rng is None else rng
        theta = rng.standard_normal(basis.M)
        if source is not None and sigma2 is not None:
            idx = np.arange(min(source.n_patches, 2000))
            y = source.get(idx)
            excess = max(float(np.mean(np.sum(y ** 2, axis=(1, 2)))) - L * L * sigma2, 1e-3 * L * L * sigma2)
            from ..model.projection import project
            p = project(theta, basis, rotation_grid(20))
            theta *= math.sqrt(excess / max(np.mean(np.sum(p ** 2, axis=(1, 2))), 1e-300))
        return theta
    vol = np.asarray(init, dtype=np.float64)
    if vol.shape != (L, L, L):
        raise NumbaemError(f"the initial volume is {vol.shape[0]}^3 but the patch size is L={L}; "
                           f"downsample it to side {L} first (numbaem reconstruct --downsample-init does this)")
    return expand(vol, basis)


def reconstruct(source, init, *, sigma2=None, estimate_noise=False, schedule=None, upsilon0=0.5,
                rng=None, memory=None, tikhonov=0.0, truth=None, callback=None, progress=True,
                state=None, should_stop=None, executor=None):
    """Run the approximate EM with frequency marching.

    Parameters
    ----------
    source : numbaem.data.patches.PatchSource
    init : ndarray (L, L, L) or 'random'
    sigma2 : float
        Noise variance (required; with ``estimate_noise`` it is the starting value).
    estimate_noise : bool
        Update ``sigma^2`` by EM each iteration (section 6).
    schedule : list of Stage, optional (default :func:`default_schedule`)
    upsilon0 : float
        Initial probability of an empty patch.
    rng : numpy.random.Generator
        Draws the minibatches.
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

    Returns
    -------
    state : EMState
        ``state.theta`` in the basis of the last stage, ``state.history`` the records.
    """
    L = source.L
    if sigma2 is None or not (sigma2 > 0) or not math.isfinite(sigma2):
        raise NumbaemError(f"noise variance sigma2={sigma2} must be a positive number; pass --noise-var S2 "
                           "(or a starting value with --estimate-noise)")
    if not 0 < upsilon0 < 1:
        raise NumbaemError(f"upsilon0={upsilon0} must lie strictly between 0 and 1")
    schedule = validate_schedule(schedule or default_schedule(L), L)
    rng = np.random.default_rng() if rng is None else rng
    budget = default_budget() if memory is None else int(memory)
    if state is None:
        theta = initial_theta(init, L, schedule[0].lmax, rng=rng, source=source, sigma2=sigma2)
        state = EMState(theta=theta, lmax=schedule[0].lmax, upsilon=upsilon0, sigma2=float(sigma2), rng=rng)
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
            op = Operator(basis, rotation_grid(stage.rotations), budget // 4)
            logger.info("stage %d/%d: lmax=%d (M=%d), K=%d, frac=%g, %d iterations", state.stage + 1,
                        len(schedule), stage.lmax, basis.M, stage.rotations, stage.frac, stage.iters)
            while state.iteration < stage.iters:
                if should_stop is not None and should_stop():
                    return state
                n_sel = int(math.ceil(stage.frac * source.n_patches))
                inner = _progress(n_sel, progress, "E-step patches", 0, leave=False)
                rec = em_iteration(state, source, op, stage, estimate_noise=estimate_noise, tikhonov=tikhonov,
                                   budget=budget, progress=inner.update if inner else None,
                                   executor=executor)
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
            state.stage += 1
            state.iteration = 0
    finally:
        if bar:
            bar.close()
    return state


def _progress(total, enabled, desc, initial=0, leave=True):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, initial=initial, leave=leave, unit="it" if leave else "patch",
                dynamic_ncols=True)
