"""Preprocessing of raw micrographs (theory section 11): background, contrast, crop, scale, whitening."""
import mrcfile
import numpy as np
import pytest

from numbaem.data.io import read_image, write_image
from numbaem.data.preprocess import contrast_check, fit_background, prepare_micrographs, working_shape
from numbaem.model.ctf import CTFParams
from numbaem.runtime.errors import NumbaemError
from numbaem.runtime.fourier import downsample_image


def _blobs(rng, n=220, L=11, density=0.1, height=3.0):
    """Positive Gaussian blobs of side about L on a grid, a fraction ``density`` of the area."""
    img = np.zeros((n, n))
    x = np.arange(L) - L // 2
    blob = height * np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * (L / 5) ** 2))
    for _ in range(int(density * n * n / L ** 2)):
        a, b = rng.integers(0, n - L, 2)
        img[a:a + L, b:b + L] += blob
    return img


def _surface(shape, c, r0, r1, q):
    x = np.arange(shape[0])[:, None] - shape[0] / 3
    y = np.arange(shape[1])[None, :]
    return c + r0 * x + r1 * y + q * x * y


def test_background_fit_is_equivariant(rng):
    """Adding a constant, a ramp or any degree-2 surface adds it to the fit (to round-off)."""
    img = _blobs(rng) + rng.standard_normal((220, 220))
    bg = fit_background(img, 2, 11)
    add = _surface(img.shape, 100.0, 0.05, -0.03, 1e-4)
    np.testing.assert_allclose(fit_background(img + add, 2, 11), bg + add, rtol=0, atol=1e-9 * np.abs(add).max())


def test_background_fit_does_not_follow_particles(rng):
    """Particles are part of the signal: the fitted level is the empty ice's (measured 0.005 off),
    where the plain mean would subtract the particles' own mean (0.073) from every pixel."""
    img = _blobs(rng) + 0.3 * rng.standard_normal((220, 220)) + 5.0
    bg = fit_background(img, 1, 11)
    assert abs(bg.mean() - 5.0) < 0.015
    assert img.mean() - 5.0 > 0.06


def _write(path, img, px=None):
    write_image(path, img, pixel_size=px)
    return str(path)


def _prepared(tmp_path, name, img, **kw):
    src = _write(tmp_path / f"{name}.mrc", img, kw.pop("px", 5.0))
    work = tmp_path / f"work_{name}"
    work.mkdir()
    pr = prepare_micrographs([src], 11, str(work), **kw)
    return pr, read_image(pr.paths[0])[0]


@pytest.mark.parametrize("noise", ["white", "coloured"])
def test_offset_ramp_and_inversion_leave_the_prepared_micrograph_unchanged(tmp_path, rng, noise):
    """A constant of 100 noise standard deviations, a linear ramp, and inverted contrast with
    --invert-contrast: the same prepared micrograph to float32 round-off of the shifted data
    (the offset is 100 x the noise; float32 keeps 2^-24 of it: 6e-6 of the noise)."""
    img = _blobs(rng) + rng.standard_normal((220, 220))
    _, ref = _prepared(tmp_path, "ref", img, noise=noise)
    for name, data, inv in (("offset", img + 100.0, False),
                            ("ramp", img + 100.0 + _surface(img.shape, 0, 0.02, -0.01, 0), False),
                            ("inverted", -img, True)):
        _, got = _prepared(tmp_path, name, data, noise=noise, invert_contrast=inv)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-5, name
    # and the prepared micrograph has zero mean where the particles are not
    assert abs(np.median(ref)) < 0.1


def test_crop_to_the_particle_diameter(tmp_path, rng):
    """--particle-diameter: working pixel = diameter / L (to the odd size's rounding), the micrograph
    Fourier-cropped to it and multiplied by a_raw / a_work (line integrals in units of the pixel)."""
    img = rng.standard_normal((200, 180))
    raw = _write(tmp_path / "raw.mrc", img, 2.0)
    (tmp_path / "w").mkdir()
    pr = prepare_micrographs([raw], 11, str(tmp_path / "w"), particle_diameter=88.0, noise="white", background=False)
    assert pr.shapes == [working_shape((200, 180), 2.0, 8.0)] == [(49, 45)]
    assert pr.pixel_size == pytest.approx(2.0 * np.mean([200 / 49, 180 / 45]))
    got, px = read_image(pr.paths[0])
    assert px == pytest.approx(pr.pixel_size, rel=1e-6)
    ref = downsample_image(read_image(raw)[0], (49, 45)) * (2.0 / pr.pixel_size)
    assert pr.crop_gain == pytest.approx(2.0 / pr.pixel_size)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_float16_micrographs_stream(tmp_path, rng):
    """A float16 MRC (mode 12) is read memory-mapped and prepared like its float32 twin."""
    img = (rng.standard_normal((150, 150)) + 3.0).astype(np.float16)
    p16 = tmp_path / "m16.mrc"
    with mrcfile.new(p16) as m:
        m.set_data(img.T.copy())
        m.voxel_size = 4.0
    assert read_image(p16, mmap=True)[0].dtype == np.float16
    (tmp_path / "a").mkdir()
    a = prepare_micrographs([str(p16)], 11, str(tmp_path / "a"), noise="white")
    _, b = _prepared(tmp_path, "f32", img.astype(np.float32), px=4.0, noise="white")
    np.testing.assert_allclose(read_image(a.paths[0])[0], b, atol=1e-6)


def test_common_noise_scale(tmp_path, rng):
    """Two micrographs with noise std 1 and 3 both come out at the median, 2."""
    paths = [_write(tmp_path / f"m{s}.mrc", s * rng.standard_normal((220, 220)), 5.0) for s in (1, 3)]
    (tmp_path / "w").mkdir()
    pr = prepare_micrographs(paths, 11, str(tmp_path / "w"), noise="white")
    for p in pr.paths:
        assert read_image(p)[0].std() == pytest.approx(2.0, rel=0.03)
    np.testing.assert_allclose(pr.noise_variance, [1.0, 9.0], rtol=0.06)


def test_nothing_to_do_writes_nothing(tmp_path, rng):
    raw = _write(tmp_path / "raw.mrc", rng.standard_normal((66, 66)), 5.0)
    pr = prepare_micrographs([raw], 11, None, noise="white", background=False,
                             ctf=[CTFParams(15000, 15000)])
    assert pr.paths == [raw] and pr.work_dir is None and pr.groups.tolist() == [0]
    assert pr.filters[0].ctf.defocus_u == 15000 and pr.filters[0].pixel_size == 5.0


def test_contrast_check_sees_inverted_particles(tmp_path, rng, caplog):
    """Bright particles are what the model expects without a CTF; inverted data are flagged."""
    img = _blobs(rng, height=1.5) + rng.standard_normal((220, 220))
    pr, _ = _prepared(tmp_path, "ok", img, noise="white")
    assert pr.contrast["z"] > 4 and not pr.contrast["inverted"]
    with caplog.at_level("WARNING"):
        pr, _ = _prepared(tmp_path, "inv", -img, noise="white")
    assert pr.contrast["inverted"] and "--invert-contrast" in caplog.text
    # symmetric data raise nothing
    assert not contrast_check(rng.standard_normal(400), +1)["inverted"]


@pytest.mark.parametrize("kw,match", [
    (dict(particle_diameter=30.0), "finer than the micrographs' 5 A"),
    (dict(particle_diameter=5000.0), "smaller than one 11 x 11 patch"),
    (dict(particle_diameter=100.0, px=None), "add --pixel-size"),
    (dict(background_degree=9), "background degree"),
])
def test_bad_preparation_requests(tmp_path, rng, kw, match):
    px = kw.pop("px", 5.0)
    raw = _write(tmp_path / "raw.mrc", rng.standard_normal((110, 110)), px)
    (tmp_path / "w").mkdir()
    with pytest.raises(NumbaemError, match=match):
        prepare_micrographs([raw], 11, str(tmp_path / "w"), **kw)
    assert list((tmp_path / "w").iterdir()) == []
