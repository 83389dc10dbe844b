"""Micrograph simulation (theory section 1): placement, SNR, scale and axes of both methods."""
import json
import re

import numpy as np
import pytest
from scipy import ndimage

import numbaem.sim.simulate as simulate_module
from numbaem.data import io as nio
from numbaem.model.basis import FBBasis
from numbaem.runtime.errors import NumbaemError
from numbaem.model.projection import project
from numbaem.model.rotations import random_rotations
from numbaem.sim.placement import place_positions
from numbaem.sim.projectors import project_real_space
from numbaem.sim.simulate import Simulation, simulate_micrographs, write_simulation

L0, L = 21, 7


def _blobs(n):
    """A smooth, asymmetric map of side ``n``: five Gaussian blobs at fixed positions.

    Positions and widths scale with ``n / 21`` so every size samples one continuous
    map; width 2.2 voxels at ``n = 21`` keeps it close to band-limited at ``L = 7``.
    """
    c = np.arange(n) - n // 2
    X, Y, Z = np.meshgrid(c, c, c, indexing="ij")
    s = n / 21
    vol = np.zeros((n, n, n))
    for a, b, d, amp in [(4, 1, 0, 1.0), (-2, 3, 1, 0.7), (0, -3, -2, 0.5), (1, 0, 3, 0.8), (-3, -2, 2, 0.6)]:
        vol += amp * np.exp(-((X - a * s) ** 2 + (Y - b * s) ** 2 + (Z - d * s) ** 2) / (2 * (2.2 * s) ** 2))
    return vol


@pytest.fixture(scope="module")
def vol():
    return _blobs(L0)


def _chebyshev_min(pos):
    diff = np.abs(pos[:, None, :] - pos[None, :, :]).max(axis=2)
    np.fill_diagonal(diff, np.iinfo(np.int64).max)
    return diff.min()


# --------------------------------------------------------------------------- placement


@pytest.mark.parametrize("spacing, d", [("separated", 2 * L - 1), ("arbitrary", L)])
@pytest.mark.parametrize("N", [100, (120, 70)])
def test_place_positions_separation_and_bounds(rng, spacing, d, N):
    N0, N1 = (N, N) if isinstance(N, int) else N
    n = 25 if spacing == "separated" else 80
    pos = place_positions(n, N, L, spacing, rng)
    assert pos.shape == (n, 2) and pos.dtype == np.int64
    assert pos[:, 0].min() >= 0 and pos[:, 0].max() <= N0 - L
    assert pos[:, 1].min() >= 0 and pos[:, 1].max() <= N1 - L
    # Every pair, not only neighbours.
    assert _chebyshev_min(pos) >= d


def test_place_positions_jams_at_the_random_sequential_limit(rng):
    # Asking for far too many stops at the jammed state; random sequential addition
    # of d x d squares covers about 0.56 of the area (0.51-0.61 measured at this
    # size, boundary effects included).
    for spacing, d in (("separated", 2 * L - 1), ("arbitrary", L)):
        with pytest.raises(NumbaemError, match="highest density reachable") as info:
            place_positions(10_000, 100, L, spacing, rng)
        placed = int(re.search(r"only (\d+) of 10000", str(info.value)).group(1))
        coverage = placed * d * d / (100 - L + d) ** 2
        assert 0.45 < coverage < 0.7
        reached = float(re.search(r"about ([0-9.]+)", str(info.value)).group(1))
        assert reached == pytest.approx(placed * L * L / 100**2, rel=1e-2)


def test_place_positions_is_reproducible_and_fast_enough():
    a = place_positions(1000, 1100, 11, "separated", np.random.default_rng(3))
    b = place_positions(1000, 1100, 11, "separated", np.random.default_rng(3))
    c = place_positions(1000, 1100, 11, "separated", np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert _chebyshev_min(a) >= 21


def test_place_positions_max_tries_and_zero(rng):
    assert place_positions(0, 50, L, "separated", rng).shape == (0, 2)
    with pytest.raises(NumbaemError, match="max_tries=3"):
        place_positions(30, 100, L, "separated", rng, max_tries=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_target=-1), "n_target"),
    (dict(n_target=2.5), "n_target"),
    (dict(N=(50,)), "N="),
    (dict(N=5), "does not fit"),
    (dict(L=0), "L=0"),
    (dict(spacing="loose"), "spacing='loose'"),
    (dict(rng=-1), "numpy.random.Generator"),
    (dict(max_tries=0), "max_tries"),
])
def test_place_positions_bad_input(rng, kwargs, match):
    args = dict(n_target=3, N=50, L=L, spacing="separated", rng=rng)
    args.update(kwargs)
    with pytest.raises(NumbaemError, match=match):
        place_positions(**args)


# --------------------------------------------------------------------------- projection, crop


def test_default_lmax_is_the_highest_order_below_nyquist():
    for n in (7, 11):
        top = FBBasis.max_lmax(n)
        assert FBBasis(n, top).S[-1] > 0
        with pytest.raises(NumbaemError):
            FBBasis(n, top + 1)


def test_project_real_space_matches_map_coordinates(rng):
    # The numba kernel against its slow twin: scipy.ndimage.map_coordinates, order 3,
    # mode 'constant', about the centre voxel; float64 round-off (1e-12 relative).
    for n in (9, 10):
        v = rng.standard_normal((n, n, n))
        rots = random_rotations(3, rng)
        c = np.arange(n) - n // 2
        for os_ in (1, 2):
            z = -(n // 2) + (np.arange(n * os_) + 0.5) / os_ - 0.5
            grid = np.stack(np.meshgrid(c, c, z, indexing="ij")).reshape(3, -1)
            got = project_real_space(v, rots, oversample=os_)
            for w, img in zip(rots, got):
                vals = ndimage.map_coordinates(v, w.T @ grid + n // 2, order=3, mode="constant")
                ref = vals.reshape(n, n, n * os_).sum(axis=2) / os_
                np.testing.assert_allclose(img, ref, atol=1e-12 * np.abs(ref).max())


def test_project_real_space_axes():
    # R_w f(r) = f(w^T r), image axis 0 = x: a blob at x = +4 turned by +90 degrees
    # about z lands at y = +4, i.e. image pixel (R, R + 4).
    n = 15
    v = np.zeros((n, n, n))
    v[7 + 4, 7, 7] = 1.0
    rz = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    img = project_real_space(v, rz[None])[0]
    assert np.unravel_index(np.argmax(img), img.shape) == (7, 11)
    assert img.sum() == pytest.approx(1.0)


# --------------------------------------------------------------------------- simulation


def test_method2_snr_is_exactly_the_definition(vol):
    sim = simulate_micrographs(vol, L, micrograph_size=(120, 101), method=2, density=0.12,
                               snr=0.7, count=2, rng=np.random.default_rng(11))
    basis = FBBasis(L, sim.lmax)
    energy = [np.sum(project(sim.truth_theta, basis, r) ** 2, axis=(1, 2)) for r in sim.rotations]
    sigma2 = np.mean(np.concatenate(energy)) / (L**2 * 0.7)
    assert sim.sigma2 == pytest.approx(sigma2, rel=1e-12)
    assert sim.sigma2_gen == sim.sigma2
    # Projections do not overlap, so the measured SNR is the requested one.
    assert sim.snr_downsampled == pytest.approx(0.7, rel=1e-12)
    # The noise really has that variance: 2 x 12120 samples, standard error of the
    # variance sqrt(2 / n) = 0.9 %; 5 % is over five standard errors.
    noise = np.concatenate([(m - c).ravel() for m, c in zip(sim.micrographs, sim.clean_micrographs)])
    assert noise.var() == pytest.approx(sim.sigma2, rel=0.05)


def test_method2_projections_sit_at_the_recorded_positions(vol):
    sim = simulate_micrographs(vol, L, micrograph_size=110, method=2, density=0.2,
                               spacing="arbitrary", rng=np.random.default_rng(5))
    basis = FBBasis(L, sim.lmax)
    clean = sim.clean_micrographs[0]
    proj = project(sim.truth_theta, basis, sim.rotations[0])
    rest = clean.copy()
    for (s0, s1), p in zip(sim.positions[0], proj):
        np.testing.assert_allclose(clean[s0:s0 + L, s1:s1 + L], p, rtol=0, atol=1e-14 * np.abs(p).max())
        rest[s0:s0 + L, s1:s1 + L] = 0.0
    assert np.all(rest == 0.0)
    assert _chebyshev_min(sim.positions[0]) >= L


def test_truth_is_the_band_limited_downsampled_volume(vol):
    from numbaem.model.basis import expand, synthesize
    from numbaem.runtime.fourier import downsample

    for method in (1, 2):
        sim = simulate_micrographs(vol, L, micrograph_size=40, method=method, density=0.05,
                                   rng=np.random.default_rng(0), lmax=4)
        basis = FBBasis(L, 4)
        theta = expand(downsample(vol, L), basis)
        np.testing.assert_allclose(sim.truth_theta, theta, rtol=1e-12)
        np.testing.assert_allclose(sim.truth_volume, synthesize(theta, basis), atol=1e-12)
        assert sim.truth_volume.shape == (L, L, L) and sim.lmax == 4 and sim.L0 == L0


def test_method1_noise_variance_matches_the_derivation(vol):
    # (151, 150) -> full size (453, 450): one odd and one even axis.
    N = (151, 150)
    sim = simulate_micrographs(vol, L, micrograph_size=N, method=1, density=0.1, snr=0.5,
                               rng=np.random.default_rng(2))
    Nf = (453, 450)
    gain = (151 / 453) * (150 / 450)   # M / Nf per axis: the noise is white at the final size
    assert sim.sigma2 == pytest.approx(sim.sigma2_gen * gain * (L / L0) ** 2, rel=1e-12)
    # sigma2_gen from the full-size projections, L0^2 in the denominator.
    full = project_real_space(vol, sim.rotations[0])
    assert sim.sigma2_gen == pytest.approx(np.mean(np.sum(full**2, axis=(1, 2))) / (L0**2 * 0.5), rel=1e-10)
    # Measured: 22650 samples, standard error of the variance about sqrt(2 / n) = 0.94 %;
    # 5 % is over five standard errors.
    noise = sim.micrographs[0] - sim.clean_micrographs[0]
    assert noise.var() == pytest.approx(sim.sigma2, rel=0.05)
    assert abs(noise.mean()) < 5 * np.sqrt(sim.sigma2 / noise.size) * 2
    # Downsampling averages noise: the SNR grows by about (L0 / L)^2.
    assert sim.snr_downsampled == pytest.approx(0.5 * (L0 / L) ** 2, rel=0.25)
    assert sim.micrographs[0].shape == N and Nf == tuple(round(n * L0 / L) for n in N)


@pytest.mark.parametrize("N", [(200, 200), (201, 201)])
def test_method1_noise_is_white_also_at_even_sizes(vol, N):
    """Issue 9, defect 6: a Fourier crop to an even size folds the +N/2 bin onto -N/2 and
    doubles the noise power at Nyquist. The noise of a Method 1 micrograph must be white:
    the mean periodogram on the Nyquist row and column (400 values, each exponential, so
    a standard error of 5 %) equals the mean over all frequencies within 25 % (5 standard
    errors; the fold gives 100 %), and so does the lowest-frequency ring."""
    sim = simulate_micrographs(vol, L, micrograph_size=N, method=1, density=0.05, snr=1.0,
                               rng=np.random.default_rng(5))
    noise = sim.micrographs[0] - sim.clean_micrographs[0]
    P = np.abs(np.fft.fft2(noise)) ** 2 / noise.size
    mean = P.mean()
    assert mean == pytest.approx(sim.sigma2, rel=0.05)
    edge = np.concatenate([P[N[0] // 2, :], P[:, N[1] // 2]])
    assert edge.mean() / mean == pytest.approx(1.0, abs=0.25)
    f0, f1 = np.meshgrid(np.fft.fftfreq(N[0]), np.fft.fftfreq(N[1]), indexing="ij")
    low = P[(np.hypot(f0, f1) < 0.08) & (np.hypot(f0, f1) > 0)]
    assert low.mean() / mean == pytest.approx(1.0, abs=5 / np.sqrt(low.size))


def test_method1_and_method2_agree_which_pins_scale_and_axes(vol):
    # Same seed: same positions and rotations. Measured relative difference of the
    # clean micrographs: 0.06 (the band-limited Method 2 model against cubic
    # interpolation at L0 = 21 and a global Fourier crop). With the map transposed
    # in x and y, or mirrored in x, for Method 1 only it is about 0.3.
    kw = dict(micrograph_size=(150, 131), density=0.1, snr=1.0)
    m2 = simulate_micrographs(vol, L, method=2, rng=np.random.default_rng(0), **kw)
    ref = m2.clean_micrographs[0]

    def rel(v):
        m1 = simulate_micrographs(v, L, method=1, rng=np.random.default_rng(0), **kw)
        np.testing.assert_array_equal(m1.positions[0], m2.positions[0])
        return np.linalg.norm(m1.clean_micrographs[0] - ref) / np.linalg.norm(ref)

    err = rel(vol)
    assert err < 0.12
    assert rel(vol.transpose(1, 0, 2)) > 3 * err
    assert rel(vol[::-1]) > 3 * err


def test_density_count_and_positions(vol):
    N = (130, 90)
    sim = simulate_micrographs(vol, L, micrograph_size=N, method=1, density=0.08, count=3,
                               rng=np.random.default_rng(9))
    T = round(0.08 * 130 * 90 / L**2)
    assert sim.count == 3 and sim.shape == N
    assert sim.density_achieved == pytest.approx(T * L**2 / (130 * 90))
    for pos, rots, m in zip(sim.positions, sim.rotations, sim.micrographs):
        assert pos.shape == (T, 2) and rots.shape == (T, 3, 3) and m.shape == N
        assert _chebyshev_min(pos) >= 2 * L - 1
        assert pos[:, 0].max() <= N[0] - L and pos[:, 1].max() <= N[1] - L
    assert not np.array_equal(sim.positions[0], sim.positions[1])


def test_reproducible_with_the_same_seed_and_not_with_another(vol):
    kw = dict(micrograph_size=60, method=1, density=0.1, snr=2.0)
    a = simulate_micrographs(vol, L, rng=7, **kw)
    b = simulate_micrographs(vol, L, rng=np.random.default_rng(7), **kw)
    c = simulate_micrographs(vol, L, rng=8, **kw)
    np.testing.assert_array_equal(a.micrographs[0], b.micrographs[0])
    np.testing.assert_array_equal(a.rotations[0], b.rotations[0])
    assert a.seed == 7 and b.seed is None
    assert not np.allclose(a.micrographs[0], c.micrographs[0])


@pytest.mark.parametrize("change, match", [
    (dict(volume=np.zeros((21, 21, 20))), r"shape \(21, 21, 20\)"),
    (dict(volume=np.zeros((21, 21))), r"shape \(21, 21\)"),
    (dict(volume=np.full((21, 21, 21), np.nan)), "NaN"),
    (dict(volume=np.zeros((21, 21, 21))), "projects to zero images"),
    (dict(L=8), "L=8 is even"),
    (dict(L=1), "L=1 is too small"),
    (dict(L=23), "L=23 is larger than the volume's side L0=21"),
    (dict(method=3), "method=3"),
    (dict(density=0.0), "density=0.0"),
    (dict(density=float("nan")), "density=nan"),
    (dict(density=1e-6), "gives no projection"),
    (dict(density=0.5), r"only \d+ of \d+ projections .* highest density reachable is about"),
    (dict(snr=0), "snr=0"),
    (dict(snr=float("inf")), "snr=inf"),
    (dict(count=0), "count=0"),
    (dict(micrograph_size=13), r"smaller than 2 L = 14"),
    (dict(micrograph_size=(40, 10)), r"smaller than 2 L = 14"),
    (dict(micrograph_size=(40, 40, 40)), "micrograph_size"),
    (dict(spacing="tight"), "spacing='tight'"),
    (dict(lmax=9), r"lmax=9 is not a whole number in 0 \.\. 5"),
    (dict(rng="seed"), "numpy.random.Generator"),
    (dict(oversample=0), "oversample=0"),
])
def test_simulate_bad_input(vol, change, match):
    args = dict(volume=vol, L=L, micrograph_size=40, method=2, density=0.1, snr=1.0,
                rng=np.random.default_rng(0))
    args.update(change)
    with pytest.raises(NumbaemError, match=match):
        simulate_micrographs(**args)


# --------------------------------------------------------------------------- output


@pytest.fixture(scope="module")
def small_sim():
    return simulate_micrographs(_blobs(L0), L, micrograph_size=(50, 44), method=1, density=0.1,
                                snr=3.0, count=2, rng=4)


def test_write_simulation_files_and_numbers(tmp_path, small_sim):
    sim = small_sim
    paths = write_simulation(sim, tmp_path / "mic.mrc", command="numbaem simulate x", pixel_size=2.0)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["mic.json", "mic.truth.mrc", "mic_000.mrc", "mic_001.mrc"]
    assert [p.name for p in paths] == ["mic_000.mrc", "mic_001.mrc", "mic.json", "mic.truth.mrc"]
    for i in range(2):
        img, px = nio.read_image(tmp_path / f"mic_{i:03d}.mrc")
        np.testing.assert_allclose(img, sim.micrographs[i], rtol=1e-6, atol=1e-6 * np.abs(sim.micrographs[i]).max())
        assert px == pytest.approx(2.0 * L0 / L, rel=1e-6)
    truth, px = nio.read_volume(tmp_path / "mic.truth.mrc")
    np.testing.assert_allclose(truth, sim.truth_volume, atol=1e-6 * np.abs(sim.truth_volume).max())
    meta = json.loads((tmp_path / "mic.json").read_text())
    assert meta["micrographs"] == ["mic_000.mrc", "mic_001.mrc"]
    assert meta["truth_volume"] == "mic.truth.mrc"
    assert meta["sigma2"] == sim.sigma2 and meta["snr"] == 3.0
    assert meta["snr_downsampled"] == sim.snr_downsampled
    assert (meta["L"], meta["L0"], meta["method"], meta["lmax"]) == (L, L0, 1, sim.lmax)
    assert meta["seed"] == 4 and meta["command"] == "numbaem simulate x"
    assert meta["density"] == 0.1 and meta["spacing"] == "separated"
    assert meta["pixel_size"] == pytest.approx(2.0 * L0 / L)
    for i in range(2):
        np.testing.assert_array_equal(np.array(meta["positions"][i]), sim.positions[i])
        np.testing.assert_array_equal(np.array(meta["rotations"][i]), sim.rotations[i])


def test_write_simulation_single_micrograph_name(tmp_path, small_sim):
    one = Simulation(**{**small_sim.__dict__, "micrographs": small_sim.micrographs[:1],
                        "clean_micrographs": small_sim.clean_micrographs[:1],
                        "positions": small_sim.positions[:1], "rotations": small_sim.rotations[:1]})
    write_simulation(one, tmp_path / "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.mrc", "one.truth.mrc"]
    assert json.loads((tmp_path / "one.json").read_text())["pixel_size"] is None


def test_write_simulation_refuses_existing_outputs_and_writes_nothing(tmp_path, small_sim):
    (tmp_path / "mic.truth.mrc").write_text("keep")
    with pytest.raises(NumbaemError, match="mic.truth.mrc' exists; pass force=True"):
        write_simulation(small_sim, tmp_path / "mic.mrc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mic.truth.mrc"]
    assert (tmp_path / "mic.truth.mrc").read_text() == "keep"
    write_simulation(small_sim, tmp_path / "mic.mrc", force=True)
    assert nio.read_volume(tmp_path / "mic.truth.mrc")[0].shape == (L, L, L)


def test_write_simulation_removes_its_files_when_a_later_write_fails(tmp_path, small_sim, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(simulate_module.nio, "write_volume", fail)
    with pytest.raises(OSError, match="disk full"):
        write_simulation(small_sim, tmp_path / "mic.mrc")
    assert list(tmp_path.iterdir()) == []


def test_write_simulation_bad_input(tmp_path, small_sim):
    with pytest.raises(NumbaemError, match="not a Simulation"):
        write_simulation({"a": 1}, tmp_path / "x.mrc")
    with pytest.raises(NumbaemError, match="pixel_size=-1"):
        write_simulation(small_sim, tmp_path / "x.mrc", pixel_size=-1)
    with pytest.raises(NumbaemError, match="does not exist"):
        write_simulation(small_sim, tmp_path / "missing" / "x.mrc")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CTF and coloured noise (theory section 11)


def test_ctf_filters_the_whole_clean_micrograph_and_keeps_particles_and_noise(vol):
    """Method 2 with a CTF: the clean micrograph is the CTF-filtered one of the same run without
    (same seed: same positions, rotations and noise draws), filtered whole, so a particle's image
    spreads beyond its box; the noise is unchanged."""
    from numbaem.model.ctf import CTFParams, evaluate_ctf
    px = 6.0
    ctf = [CTFParams(30000, 28000, 40)]
    kw = dict(micrograph_size=(84, 70), method=2, density=0.02, snr=2.0, rng=5)
    plain = simulate_micrographs(vol, L, **kw)
    with_ctf = simulate_micrographs(vol, L, ctf=ctf, pixel_size=px, **kw)
    assert [np.array_equal(a, b) for a, b in zip(plain.positions, with_ctf.positions)] == [True]
    np.testing.assert_allclose(with_ctf.micrographs[0] - with_ctf.clean_micrographs[0],
                               plain.micrographs[0] - plain.clean_micrographs[0], atol=1e-12)
    a = px * L0 / L
    f0, f1 = np.fft.fftfreq(84, a)[:, None], np.fft.fftfreq(70, a)[None, :]
    ref = np.fft.ifft2(np.fft.fft2(plain.clean_micrographs[0]) * evaluate_ctf(ctf[0], f0, f1)).real
    np.testing.assert_allclose(with_ctf.clean_micrographs[0], ref, atol=1e-12 * np.abs(ref).max())
    outside = np.ones((84, 70), bool)
    for s0, s1 in plain.positions[0]:
        outside[s0:s0 + L, s1:s1 + L] = False
    assert np.all(plain.clean_micrographs[0][outside] == 0)
    assert np.abs(with_ctf.clean_micrographs[0][outside]).max() > 0.01 * np.abs(ref).max()
    assert with_ctf.snr == plain.snr and with_ctf.sigma2 == plain.sigma2


def test_ctf_needs_a_pixel_size_and_one_ctf_per_micrograph(vol):
    from numbaem.model.ctf import CTFParams
    with pytest.raises(NumbaemError, match="pixel size"):
        simulate_micrographs(vol, L, micrograph_size=40, ctf=[CTFParams(1e4, 1e4)], rng=1)
    with pytest.raises(NumbaemError, match="one CTFParams per micrograph"):
        simulate_micrographs(vol, L, micrograph_size=40, ctf=[CTFParams(1e4, 1e4)], pixel_size=3.0, count=2, rng=1)


def test_pink_noise_has_the_pixel_variance_and_the_shape(vol):
    """--noise pink: the pixel variance is sigma2 (the SNR keeps its meaning) and the periodogram
    of the noise, averaged over annuli, is sigma2 n(|k|) with n = 1/(|k| + 0.05) normalised to mean
    1 on the grid. Tolerance 10%: an annulus holds at least 1800 exponential values (SE 2.4%)."""
    sim = simulate_micrographs(vol, L, micrograph_size=300, method=2, density=0.01, snr=1.0, rng=3,
                               noise_psd="pink")
    noise = sim.micrographs[0] - sim.clean_micrographs[0]
    assert sim.noise == "pink"
    assert noise.var() == pytest.approx(sim.sigma2, rel=0.05)
    per = np.abs(np.fft.fft2(noise)) ** 2 / noise.size
    f = np.fft.fftfreq(300)
    k = np.hypot(f[:, None], f[None, :])
    n = 1 / (k + 0.05)
    n /= n.mean()
    for lo, hi in ((0.03, 0.07), (0.1, 0.14), (0.4, 0.45)):
        ring = (k >= lo) & (k < hi)
        assert per[ring].mean() == pytest.approx(sim.sigma2 * n[ring].mean(), rel=0.10), (lo, hi)


def test_write_simulation_with_ctf_writes_the_star_file(tmp_path, vol):
    from numbaem.data.star import read_micrographs_star
    from numbaem.sim.simulate import random_ctf
    ctf = random_ctf((1.0, 2.5), 2, seed=4, astigmatism=300.0)
    sim = simulate_micrographs(vol, L, micrograph_size=42, method=2, count=2, rng=4, ctf=ctf, pixel_size=2.0)
    paths = write_simulation(sim, tmp_path / "m.mrc")
    star = tmp_path / "m_ctf.star"
    assert paths[-1] == star
    got = read_micrographs_star(star, [str(p) for p in paths[:2]])
    assert got.pixel_size == pytest.approx(2.0 * L0 / L, rel=1e-6)
    for a, b in zip(got.params, ctf):
        assert a.defocus_u == pytest.approx(b.defocus_u, abs=1e-5) and a.defocus_angle == pytest.approx(b.defocus_angle)
        assert 1e4 <= a.defocus_mean <= 2.5e4 and a.defocus_u - a.defocus_v == pytest.approx(300.0, abs=1e-5)
    rec = json.loads((tmp_path / "m.json").read_text())
    assert rec["ctf_star"] == "m_ctf.star" and rec["noise"] == "white" and len(rec["ctf"]) == 2
