"""One numbaem EM iteration set up the way ``numbaem.em.run.reconstruct`` sets it up, for timing.

:class:`IterationSetup` holds the patch source, the :class:`numbaem.model.projection.Operator`
(``A_k`` kept when the stage's memory plan keeps it, as ``reconstruct`` does), the
current estimate and the chunk size of that plan (:func:`numbaem.em.run.stage_plan`,
the one ``em_iteration`` uses). :meth:`IterationSetup.warm_up` compiles every kernel and builds every FFTW plan
and buffer on exactly the shapes that are timed afterwards (the E-step plan is keyed
by the chunk size, so the warm-up runs one full chunk).
"""
import math
import time

import numpy as np

from numbaem.runtime import fft
from numbaem.model.basis import FBBasis
from numbaem.em.run import EMState, em_iteration, stage_plan
from numbaem.em.estep import SufficientStats, e_step_chunk, projection_spectra, stream_stats
from numbaem.em.schedule import Stage
from numbaem.em.mstep import normal_equations, solve
from numbaem.model.projection import Operator, projection_matrices
from numbaem.model.rotations import rotation_grid

from ._common import PeakMemory, time_call


class IterationSetup:
    """Everything one timed EM iteration needs.

    Parameters
    ----------
    source : numbaem.data.patches.PatchSource
    lmax, K : int
    theta : ndarray, shape (M,)
        The current estimate (the E-step's projections come from it).
    budget : int
        Memory budget in bytes (chunk planning, operator size).
    frac : float
        Stochastic factor: ``ceil(frac Nd)`` patches per iteration.
    n_chunk : int, optional
        Force a chunk size (default: :func:`numbaem.em.run.plan_chunk`).
    sigma2, upsilon : float
    """

    def __init__(self, source, lmax, K, theta, budget, frac=1.0, n_chunk=None, sigma2=1.0, upsilon=0.5,
                 seed=0):
        self.source = source
        self.L = source.L
        self.basis = FBBasis(self.L, lmax)
        self.K = K
        self.M = self.basis.M
        self.theta = np.asarray(theta, dtype=np.float64)
        self.budget = int(budget)
        self.frac = frac
        self.sigma2, self.upsilon = sigma2, upsilon
        self.seed = seed
        self.rots = rotation_grid(K)
        self.n_selected = int(math.ceil(frac * source.n_patches)) if frac < 1 else source.n_patches
        self.plan = stage_plan(self.budget, self.basis, K, self.n_selected)
        t0 = time.perf_counter()
        self.operator = Operator(self.basis, self.rots, self.plan.parts["operator"])
        self.seconds_operator = time.perf_counter() - t0
        self.n_chunk = int(n_chunk) if n_chunk else self.plan.n_chunk
        self.stage = Stage(lmax, 1, frac, K)

    @property
    def params(self):
        return dict(L=self.L, lmax=self.basis.lmax, M=self.M, K=self.K, patches=self.n_selected,
                    patches_in_source=self.source.n_patches, frac=self.frac, chunk=self.n_chunk,
                    chunks=-(-self.n_selected // self.n_chunk), budget_bytes=self.budget,
                    operator_kept=self.operator.A is not None, operator_bytes=self.operator.nbytes,
                    sigma2=self.sigma2, upsilon=self.upsilon)

    def warm_up(self):
        """Compile the kernels and build the plans/buffers of the timed shapes; returns seconds.

        Drops every cached FFT workspace first: numbaem's plan cache keeps the buffers of
        every shape it has seen (up to 32), so setups of different chunk sizes or thread
        counts would otherwise pile up their chunk-sized buffers in memory.
        """
        fft.clear_cache()
        t0 = time.perf_counter()
        projection_matrices(self.basis, self.rots[:2])
        n = min(self.n_chunk, self.source.n_patches)
        for route in ("direct", "fft"):       # the run's route and the one bench/_profile takes apart
            stats = SufficientStats.zeros(self.K, self.L)
            e_step_chunk(self.source.get(np.arange(n)), self.spectra(route), self.upsilon, self.sigma2, stats,
                         n_chunk=self.n_chunk)
        H, b = normal_equations(self.operator.blocks(), stats.W, stats.G, self.L, self.M,
                                max_block_bytes=self.plan.mstep_block_bytes)
        solve(H + np.trace(H) / self.M * np.eye(self.M), b)
        return time.perf_counter() - t0

    def new_state(self):
        return EMState(theta=self.theta.copy(), lmax=self.basis.lmax, upsilon=self.upsilon, sigma2=self.sigma2,
                       rng=np.random.default_rng(self.seed))

    def iteration(self, reps=1):
        """Time whole EM iterations (``em_iteration``) from the same state; best / median and the records."""
        records = []

        def one():
            with PeakMemory() as pm:
                rec = em_iteration(self.new_state(), self.source, self.operator, self.stage, budget=self.budget,
                                   n_chunk=self.n_chunk)
            rec = dict(rec)
            rec["rss_start"] = pm.start
            rec["rss_peak"] = pm.peak
            records.append(rec)
            return rec

        stats, _ = time_call(one, reps=reps)
        best = min(records, key=lambda r: r["seconds"])
        return dict(seconds=stats, seconds_estep=best["seconds_estep"], seconds_mstep=best["seconds_mstep"],
                    peak_memory=max(r["rss_peak"] for r in records), rss_start=best["rss_start"],
                    records=records)

    def indices(self):
        """The patch indices of one iteration's minibatch (the same draw ``em_iteration`` makes)."""
        return self.source.sample(self.frac, np.random.default_rng(self.seed))

    def spectra(self, route=None):
        """The E-step's spectra of the start on ``route`` (default: the route the run takes,
        :func:`numbaem.em.estep.choose_route`), in the precision the run chooses."""
        return projection_spectra(self.operator.project(self.theta), route=route, sigma2=self.sigma2)

    def estep(self, reps=1, route=None):
        """Time ``stream_stats`` alone over the minibatch (on ``route``, default the run's); returns (timing, stats)."""
        idx = self.indices()
        spectra = self.spectra(route)
        return time_call(lambda: stream_stats(self.source, idx, spectra, self.upsilon, self.sigma2, self.n_chunk),
                         reps=reps)
