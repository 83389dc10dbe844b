"""The EM loop (theory sections 4-7): monotone likelihood, recovery, schedules, memory, threads."""
import math
import tracemalloc

import numpy as np
import pytest

from numbaem.em import run as em
from numbaem.em import schedule
from numbaem.model.basis import FBBasis, synthesize
from numbaem.runtime.errors import NumbaemError
from numbaem.em.estep import SufficientStats, e_step_chunk, projection_spectra
from numbaem.analysis.fsc import fsc, relative_error, resolution
from numbaem.data.patches import PatchSource
from numbaem.model.projection import project
from numbaem.model.rotations import rotation_grid
from numbaem.runtime.threads import use_threads


def make_micrograph(rng, theta, basis, rots, N, n_proj, snr):
    """Well-separated projections at the given rotations (drawn uniformly from ``rots``)."""
    L = basis.L
    pos = []
    while len(pos) < n_proj:
        s = rng.integers(0, N - L + 1, 2)
        if all(max(abs(s[0] - p[0]), abs(s[1] - p[1])) >= 2 * L - 1 for p in pos):
            pos.append(s)
    P = project(theta, basis, rots[rng.integers(0, len(rots), n_proj)])
    mic = np.zeros((N, N))
    for s, p in zip(pos, P):
        mic[s[0]:s[0] + L, s[1]:s[1] + L] += p
    sigma2 = float(np.mean(np.sum(P ** 2, axis=(1, 2))) / (L * L * snr))
    return mic + rng.standard_normal(mic.shape) * math.sqrt(sigma2), sigma2


def perturbed(rng, theta, rel):
    return theta + rel * np.linalg.norm(theta) / math.sqrt(len(theta)) * rng.standard_normal(len(theta))


@pytest.mark.parametrize("estimate_noise", [False, True])
def test_full_batch_loglik_never_decreases(rng, estimate_noise):
    """Section 7: full-batch EM never decreases log L (sigma^2 fixed or updated)."""
    L, lmax, K = 7, 3, 40
    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M)
    rots = rotation_grid(K)
    mic, s2 = make_micrograph(rng, theta, basis, rots, 112, 20, snr=2.0)
    src = PatchSource([mic], L)
    st = em.reconstruct(src, synthesize(perturbed(rng, theta, 0.5), basis), sigma2=s2 * (1.5 if estimate_noise else 1),
                        estimate_noise=estimate_noise, schedule=[schedule.Stage(lmax, 6, 1.0, K)],
                        rng=rng, progress=False)
    ll = np.array([r["loglik"] for r in st.history])
    y = src.get(np.arange(src.n_patches))
    tol = 1e-12 * src.n_patches * np.max(np.sum(y ** 2, axis=(1, 2))) / (2 * min(r["sigma2"] for r in st.history))
    assert np.all(np.diff(ll) >= -tol), np.diff(ll)
    assert ll[-1] > ll[0]


def test_recovery_on_grid(rng):
    """Rotations from the EM's own grid, SNR 100, Method 2, L=7, lmax=4, from an initial guess
    with FSC 0.5 near half the band: FSC 0.5 at the last shell and < 5% error after alignment."""
    from numbaem.analysis.align import align
    L, lmax, K = 7, 4, 100
    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M) * np.repeat(np.exp(-0.3 * np.arange(lmax + 1)),
                                                     [(2 * l + 1) * s for l, s in enumerate(basis.S)])
    rots = rotation_grid(K)
    mic, s2 = make_micrograph(rng, theta, basis, rots, 280, 160, snr=100.0)
    truth = synthesize(theta, basis)
    # perturb each coefficient in proportion to its radial frequency u_{l,s}: a guess good at
    # low resolution and wrong at high resolution
    u = np.zeros(basis.M)
    for (l, s_), ul in zip(basis.ls_pairs, basis.u):
        for q in range(2 * l + 1):
            u[basis.index(l, q, s_)] = ul
    th0 = theta + 3.0 * (u / u.max()) ** 3 * np.abs(theta).mean() * rng.standard_normal(basis.M)
    f, c = fsc(synthesize(th0, basis), truth)
    r0 = resolution(f, c)
    assert 0.12 < r0 < 0.32, r0  # FSC 0.5 at about half the band (the last shell is 3/7)
    st = em.reconstruct(PatchSource([mic], L), synthesize(th0, basis), sigma2=s2,
                        schedule=[schedule.Stage(lmax, 18, 1.0, K)], rng=rng, progress=False)
    res = align(st.theta, theta, basis, n_coarse=500)
    est = synthesize(res.theta_aligned, basis)
    f, c = fsc(est, truth)
    assert resolution(f, c) >= f[-1] - 1e-12
    assert relative_error(est, truth) < 0.05


def test_stochastic_minibatch_seeded(rng):
    L, lmax, K = 5, 2, 20
    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M)
    mic, s2 = make_micrograph(rng, theta, basis, rotation_grid(K), 100, 12, snr=5.0)
    src = PatchSource([mic], L)
    runs = []
    for seed in (3, 3, 4):
        st = em.reconstruct(src, synthesize(theta, basis), sigma2=s2, schedule=[schedule.Stage(lmax, 2, 0.3, K)],
                            rng=np.random.default_rng(seed), progress=False)
        runs.append(st.theta)
        assert all(r["patches"] == math.ceil(0.3 * src.n_patches) for r in st.history)
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


def test_frequency_marching_copies_coefficients(rng):
    L = 7
    b2, b4 = FBBasis(L, 2), FBBasis(L, 4)
    th = rng.standard_normal(b2.M)
    from numbaem.model.basis import resize_theta
    big = resize_theta(th, b2, b4)
    assert np.array_equal(big[:b2.M], th) and np.all(big[b2.M:] == 0)
    # the volume is unchanged by the copy (the new coefficients are zero)
    np.testing.assert_allclose(synthesize(big, b4), synthesize(th, b2), atol=1e-13)


def test_schedule_parsing():
    st = schedule.parse_schedule("lmax=2,iters=5,frac=0.1,rotations=300;lmax=4,iters=5,frac=0.05,rotations=600")
    assert st == [schedule.Stage(2, 5, 0.1, 300), schedule.Stage(4, 5, 0.05, 600)]
    for bad, match in [("lmax=2,iters=5,colour=red", "unknown key"), ("lmax=2", "iters"),
                       ("lmax=2,iters=0", "iters"), ("lmax=2,iters=3,frac=1.5", "frac"),
                       ("lmax=2,iters=3,rotations=0", "rotations"), ("lmax=x,iters=3", "number"),
                       ("", "empty"), ("lmax 2", "key=value")]:
        with pytest.raises(NumbaemError, match=match):
            schedule.parse_schedule(bad)
    with pytest.raises(NumbaemError, match="lmax <= 5"):
        schedule.validate_schedule([schedule.Stage(9, 1)], 7)


def test_schedule_toml(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("[[stage]]\nlmax = 2\niters = 3\nfrac = 0.5\nrotations = 50\n[[stage]]\nlmax = 3\niters = 1\n")
    assert schedule.load_schedule(p) == [schedule.Stage(2, 3, 0.5, 50), schedule.Stage(3, 1, 1.0, 300)]
    p.write_text("not toml [")
    with pytest.raises(NumbaemError, match="TOML"):
        schedule.load_schedule(p)


def test_default_schedule_ends_in_a_search_except_on_boxes_and_with_the_junk_class():
    """No schedule given: the default's last stage is a search, but boxes around picks and the
    junk class, which a search does not run on, take the exhaustive variant; a schedule given
    is kept."""
    assert schedule.schedule_or_default(None, 7)[-1].is_search
    for kw in (dict(boxes=True), dict(junk_class=True)):
        assert not any(st.is_search for st in schedule.schedule_or_default(None, 7, **kw))
    given = schedule.parse_schedule("lmax=2,iters=1,fine=15")
    assert schedule.schedule_or_default(given, 7, boxes=True) is given


def test_default_schedule_is_valid():
    for L in (7, 11, 15):
        s = schedule.default_schedule(L)
        schedule.validate_schedule(s, L)
        assert [x.lmax for x in s] == sorted(x.lmax for x in s) and s[-1].lmax == FBBasis.max_lmax(L)


@pytest.mark.parametrize("arrays_mib, whole_operator, groups", [(8, True, False), (1.5, False, False),
                                                                (8, True, True)])
def test_memory_budget_is_honoured(rng, arrays_mib, whole_operator, groups):
    """Every array of an iteration counts against the budget: the traced peak (operator and
    its M-step copy included, built inside the traced region) stays within the budget
    less the interpreter's allowance. With 1.5 MiB of room the operator is kept only as
    blocks of rotations rebuilt on demand. With CTF groups (theory section 11: filters,
    per-group statistics, each group's spectra made between its chunks) likewise."""
    from numbaem.em.plan import INTERPRETER_BYTES
    from numbaem.runtime import fft
    L, lmax, K = 7, 3, 60
    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M)
    mic, s2 = make_micrograph(rng, theta, basis, rotation_grid(K), 350, 40, snr=5.0)
    if groups:
        from numbaem.model.ctf import CTFParams, ImageFilter
        flt = [ImageFilter(8.0, CTFParams(15000 + 5000 * g, 15000 + 5000 * g)) for g in range(3)]
        src = PatchSource([mic[:, :175], mic[:, 175:]], L, groups=np.array([0, 2]), filters=flt)
    else:
        src = PatchSource([mic], L)
    room = int(arrays_mib * 2 ** 20)
    budget = INTERPRETER_BYTES + room
    stage = schedule.Stage(lmax, 1, 1.0, K)
    fft.clear_cache()
    tracemalloc.start()
    tracemalloc.reset_peak()
    plan = em.stage_plan(budget, basis, K, src.n_patches, 3 if groups else None)
    op = em.Operator(basis, rotation_grid(K), plan.parts["operator"])
    state = em.EMState(theta=theta, lmax=lmax, upsilon=0.5, sigma2=s2, rng=rng)
    rec = em.em_iteration(state, src, op, stage, budget=budget)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rec["chunk"] < src.n_patches  # the data really were streamed in chunks
    assert (op.A is not None) == whole_operator
    assert plan.peak <= room
    assert peak <= room, (peak, room)
    with pytest.raises(NumbaemError, match="too small"):
        em.plan_chunk(INTERPRETER_BYTES + (1 << 20), 5000, 11, 219, 100)


def test_fft_cache_is_bounded_in_bytes():
    """The plan cache drops least recently used workspaces beyond its byte bound."""
    from numbaem.runtime import fft
    fft.clear_cache()
    limit = 3_500_000
    old = fft.set_cache_limit(limit)
    try:
        a = fft.workspace((300, 22, 22))     # 300 * (484 * 8 + 264 * 16) = 2.43 MB
        assert fft.cache_bytes() == a.nbytes
        b = fft.workspace((100, 22, 22))     # 0.81 MB: both fit in 3.5 MB
        assert fft.cache_bytes() == a.nbytes + b.nbytes
        c = fft.workspace((200, 22, 22))     # 1.62 MB: the least recently used (a) goes
        assert fft.cache_bytes() == b.nbytes + c.nbytes <= limit
        assert fft.workspace((100, 22, 22)) is b
    finally:
        fft.set_cache_limit(old)
        fft.clear_cache()


def test_threads_give_identical_statistics(rng):
    """Thread-private work split by rotation/patch, never by thread: 1 and 2 threads agree bit for bit."""
    L, lmax, K = 7, 3, 30
    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M)
    rots = rotation_grid(K)
    patches = rng.standard_normal((40, L, L))
    out = []
    for t in (1, 2):
        with use_threads(t):
            st = SufficientStats.zeros(K, L)
            e_step_chunk(patches, projection_spectra(project(theta, basis, rots)), 0.3, 1.0, st)
            out.append(st)
    assert np.array_equal(out[0].W, out[1].W) and np.array_equal(out[0].G, out[1].G)
    assert out[0].loglik == out[1].loglik


def test_reconstruct_rejects_bad_input(rng):
    src = PatchSource([rng.standard_normal((50, 50))], 7)
    with pytest.raises(NumbaemError, match="noise variance"):
        em.reconstruct(src, "random", sigma2=-1.0, progress=False)
    with pytest.raises(NumbaemError, match="downsample"):
        em.reconstruct(src, np.zeros((9, 9, 9)), sigma2=1.0, schedule=[schedule.Stage(2, 1, 1.0, 10)], progress=False)
    with pytest.raises(NumbaemError, match="NaN"):
        bad = rng.standard_normal((50, 50))
        bad[3, 4] = np.nan
        em.reconstruct(PatchSource([bad], 7), "random", sigma2=1.0, schedule=[schedule.Stage(2, 1, 1.0, 10)],
                       progress=False)


def test_without_ctf_or_whitening_the_iteration_is_that_of_sections_5_and_6_to_the_bit(rng):
    """No CTF and no whitening (theory section 11 not asked for): the iteration is exactly the
    composition of the section 5-6 primitives as before the CTF groups existed (same bits), and
    a source with groups through the grouped path, with identity filters, agrees to round-off."""
    from numbaem.em.estep import stream_stats
    from numbaem.em.mstep import normal_equations, solve, update_upsilon
    from numbaem.model.ctf import ImageFilter
    L, lmax, K = 7, 3, 40
    basis = FBBasis(L, lmax)
    theta = rng.standard_normal(basis.M)
    mic, s2 = make_micrograph(rng, theta, basis, rotation_grid(K), 140, 12, snr=2.0)
    stage = schedule.Stage(lmax, 1, 1.0, K)
    op = em.Operator(basis, rotation_grid(K), 1 << 30)
    start = perturbed(rng, theta, 0.3)

    state = em.EMState(theta=start.copy(), lmax=lmax, upsilon=0.5, sigma2=s2, rng=np.random.default_rng(0))
    rec = em.em_iteration(state, PatchSource([mic], L), op, stage, budget=1 << 30)
    src = PatchSource([mic], L)
    idx = np.arange(src.n_patches)
    stats = stream_stats(src, idx, projection_spectra(op.project(start), sigma2=s2), 0.5, s2, rec["chunk"])
    H, b = normal_equations(op.blocks(), stats.W, stats.G, L, basis.M,
                            max_block_bytes=em.stage_plan(1 << 30, basis, K, len(idx)).mstep_block_bytes)
    assert np.array_equal(state.theta, solve(H, b).theta)
    assert state.upsilon == update_upsilon(stats) and rec["loglik"] == stats.loglik

    grouped = PatchSource([mic], L, groups=np.array([0]), filters=[ImageFilter()])
    state_g = em.EMState(theta=start.copy(), lmax=lmax, upsilon=0.5, sigma2=s2, rng=np.random.default_rng(0))
    em.em_iteration(state_g, grouped, op, stage, budget=1 << 30)
    assert not np.array_equal(state_g.theta, state.theta)            # another route ...
    np.testing.assert_allclose(state_g.theta, state.theta, rtol=1e-9, atol=1e-9 * np.abs(state.theta).max())
