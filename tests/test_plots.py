"""The figures: what they draw (axes, labels, lines at the right places), their PNG size, atomic writes."""
import matplotlib.image
import numpy as np
import pytest

from numbaem.analysis.fsc import fsc
from numbaem.analysis.plots import plot_convergence, plot_fsc, plot_micrograph_crop, plot_slices
from numbaem.runtime.errors import NumbaemError


def _png_shape(path):
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] == 4
    assert img[..., :3].std() > 0.05  # something was drawn
    return img.shape[:2]


def _by_gid(fig, gid):
    """Artists of ``fig`` (any axes, or the figure itself) with this gid."""
    return [a for a in fig.findobj() if a.get_gid() == gid]


def _texts(fig):
    return " | ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


# --------------------------------------------------------------------------- FSC


def test_plot_fsc_band_limit_note_and_angstrom_axis(rng, tmp_path):
    v = rng.standard_normal((11, 11, 11))
    noisy = fsc(v, v + 2 * rng.standard_normal(v.shape))  # falls below 0.5 inside the band
    same = fsc(v, v)                                         # 1 in every shell: saturates
    assert np.any(noisy[1] < 0.5) and np.all(same[1] == pytest.approx(1.0))

    # only the curve that falls below: no note, no band-limit line, no top axis
    fig = plot_fsc({"noisy": noisy}, tmp_path / "a.png")
    assert _png_shape(tmp_path / "a.png") == (430, 600)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "spatial frequency (cycles/pixel)" and ax.get_ylabel() == "FSC"
    assert not _by_gid(fig, "band-limit") and not _by_gid(fig, "band-limit-note")
    assert [ln.get_ydata()[0] for ln in _by_gid(fig, "threshold")] == [0.5]
    assert "1/\u00c5" not in _texts(fig)
    assert "noisy (0." in _texts(fig) and "\u2265" not in _texts(fig)

    # with the saturating curve: the note, a line at the last shell 5/11, "at least" in the legend;
    # with the pixel size a second axis in 1/Angstrom that maps f -> f / pixel_size
    fig = plot_fsc({"noisy": noisy, "itself": same}, tmp_path / "b.png", pixel_size=2.0, title="t", note="n")
    assert _png_shape(tmp_path / "b.png") == (490, 600)  # two lines of title and note
    (line,) = _by_gid(fig, "band-limit")
    assert line.get_xdata()[0] == pytest.approx(5 / 11)
    (note,) = _by_gid(fig, "band-limit-note")
    assert "last shell" in note.get_text() and "band limit" in note.get_text()
    texts = _texts(fig)
    assert "itself (\u2264 4.40 \u00c5)" in texts  # 2.0 A / (5/11) = 4.4 A, a bound
    (ax,) = [a for a in fig.axes if a.get_xlabel() == "spatial frequency (cycles/pixel)"]
    top = [a for a in ax.child_axes if "1/\u00c5" in a.get_xlabel()]
    assert len(top) == 1 and "pixel 2 \u00c5" in top[0].get_xlabel()
    assert top[0]._functions[0](0.25) == pytest.approx(0.125)


def test_plot_fsc_writes_atomically_and_checks_input(rng, tmp_path):
    v = rng.standard_normal((7, 7, 7))
    curves = {"self": fsc(v, v)}
    path = tmp_path / "fsc.png"
    plot_fsc(curves, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsc.png"]  # no temporary left behind
    with pytest.raises(NumbaemError, match="exists"):
        plot_fsc(curves, path)
    plot_fsc(curves, path, force=True)
    with pytest.raises(NumbaemError, match="curves"):
        plot_fsc({}, tmp_path / "empty.png")
    with pytest.raises(NumbaemError, match="pair"):
        plot_fsc({"a": np.ones(3)}, tmp_path / "bad.png")
    with pytest.raises(NumbaemError, match="pixel_size"):
        plot_fsc(curves, tmp_path / "bad.png", pixel_size=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsc.png"]


# --------------------------------------------------------------------------- convergence


def _history(truth=True):
    """Three stages (iterations 1-2, 3-5, 6), as reconstruct records them."""
    recs = []
    for i, (stage, lmax, K) in enumerate([(1, 2, 30), (1, 2, 30), (2, 4, 100), (2, 4, 100), (2, 4, 100),
                                          (3, 5, 300)], start=1):
        r = dict(iteration=i, stage=stage, lmax=lmax, K=K, loglik_per_patch=-100.0 + 10 * i,
                 upsilon=0.5 + 0.01 * i)
        if truth:
            r.update(relative_error=0.6 / i, fsc_resolution=3 / 7)
        recs.append(r)
    return recs


def test_plot_convergence_panels_stages_and_start(tmp_path):
    start = dict(relative_error=0.9, fsc_resolution=0.2, upsilon=0.5)
    fig = plot_convergence(_history(), tmp_path / "c.png", start=start, L=7)
    assert _png_shape(tmp_path / "c.png") == (700, 1000)
    ylabels = [ax.get_ylabel() for ax in fig.axes]
    assert ylabels == ["log-likelihood per patch", "upsilon (weight of an empty patch)",
                       "relative error after alignment", "FSC 0.5 after alignment (cycles/pixel)"]
    for ax in fig.axes:
        # stage boundaries half-way between the last iteration of a stage and the first of the next
        xs = sorted(ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_gid() == "stage-boundary")
        assert xs == [2.5, 5.5]
        labels = [t.get_text() for t in ax.texts]
        assert "stage 2\nlmax 4, K 100" in labels and "stage 1\nlmax 2, K 30" in labels
    # iteration 0: the start, where given (not for the log-likelihood, which it lacks)
    starts = {ax.get_ylabel(): [ln for ln in ax.get_lines() if ln.get_gid() == "start"] for ax in fig.axes}
    assert not starts["log-likelihood per patch"]
    (s,) = starts["relative error after alignment"]
    assert list(s.get_xdata()) == [0.0] and list(s.get_ydata()) == [0.9]
    assert list(starts["upsilon (weight of an empty patch)"][0].get_ydata()) == [0.5]
    # the band limit of L = 7 (last shell 3/7) on the resolution panel, where every iteration sits
    res_ax = fig.axes[3]
    (edge,) = [ln for ln in res_ax.get_lines() if ln.get_gid() == "band-limit"]
    assert edge.get_ydata()[0] == pytest.approx(3 / 7)
    assert [t for t in res_ax.texts if t.get_gid() == "band-limit-note"]
    # the error curve plotted is the records' (plus the start)
    err = [ln for ln in fig.axes[2].get_lines() if ln.get_gid() is None and len(ln.get_xdata()) == 7]
    np.testing.assert_allclose(err[0].get_ydata(), [0.9] + [0.6 / i for i in range(1, 7)])


def test_plot_convergence_without_truth(tmp_path):
    fig = plot_convergence(_history(truth=False), tmp_path / "c.png")
    assert len(fig.axes) == 2 and not _by_gid(fig, "start") and not _by_gid(fig, "band-limit")
    assert sorted({ln.get_xdata()[0] for ln in _by_gid(fig, "stage-boundary")}) == [2.5, 5.5]
    with pytest.raises(NumbaemError, match="upsilon"):
        plot_convergence([dict(iteration=1, stage=1, loglik_per_patch=0.0)], tmp_path / "d.png")
    with pytest.raises(NumbaemError, match="history"):
        plot_convergence([], tmp_path / "d.png")
    with pytest.raises(NumbaemError, match="start"):
        plot_convergence(_history(), tmp_path / "d.png", start=[0.5])
    assert not (tmp_path / "d.png").exists()


# --------------------------------------------------------------------------- slices


def test_plot_slices_views_and_scales(rng, tmp_path):
    L = 9
    truth = np.zeros((L, L, L))
    truth[6, 4, 4] = 1.0  # one voxel at x = +2 (centre 4): seen in the xy and xz slices, not yz
    est = 3.0 * truth + 0.01 * rng.standard_normal(truth.shape)
    fig = plot_slices({"truth": truth, "estimate": est}, tmp_path / "s.png")
    assert _png_shape(tmp_path / "s.png") == (560, 1100)
    images = [ax for ax in fig.axes if ax.get_images()]
    assert len(images) == 8  # 2 rows x (3 slices + projection)
    assert [ax.get_title() for ax in images[:4]] == ["xy slice (z = 0)", "xz slice (y = 0)", "yz slice (x = 0)",
                                                     "projection along z"]
    assert images[0].get_ylabel() == "truth\ny (voxels)" and images[4].get_ylabel() == "estimate\ny (voxels)"
    # the xy slice is shown with x to the right, y up: the voxel at x = +2 is at column 6 of the
    # displayed (transposed) array, row 4
    shown = images[0].get_images()[0].get_array()
    assert shown[4, 6] == 1.0 and shown.sum() == 1.0
    assert images[2].get_images()[0].get_array().max() == 0.0  # x = 0 slice misses it
    # own scale per row: the estimate's limits are about 3x the truth's
    assert images[0].get_images()[0].get_clim()[1] == 1.0
    assert images[4].get_images()[0].get_clim()[1] == pytest.approx(3.0, abs=0.1)
    assert "colour scale per row" in fig._suptitle.get_text()
    # shared: the same limits in every row
    fig = plot_slices({"truth": truth, "estimate": est}, tmp_path / "s2.png", shared_scale=True)
    images = [ax for ax in fig.axes if ax.get_images()]
    assert images[0].get_images()[0].get_clim() == images[4].get_images()[0].get_clim()
    assert "one colour scale for all rows" in fig._suptitle.get_text()
    with pytest.raises(NumbaemError, match="shapes"):
        plot_slices({"a": truth, "b": truth[:7, :7, :7]}, tmp_path / "s3.png")
    with pytest.raises(NumbaemError, match="volumes"):
        plot_slices([truth], tmp_path / "s3.png")


# --------------------------------------------------------------------------- micrograph


def test_plot_micrograph_crop_boxes(rng, tmp_path):
    img = rng.standard_normal((200, 150))
    pos = np.array([[10, 10], [60, 40], [100, 70], [190, 140]])  # top-left (x, y) of 7 x 7 boxes
    fig = plot_micrograph_crop(img, tmp_path / "m.png", L=7, positions=pos, size=64, corner=(50, 30),
                               lowpass=0.1, pixel_size=3.0)
    assert _png_shape(tmp_path / "m.png") == (600, 600)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "x (pixels)" and ax.get_ylabel() == "y (pixels)"
    assert ax.get_xlim() == (49.5, 113.5) and ax.get_ylim() == (29.5, 93.5)
    boxes = sorted((b.get_x(), b.get_y(), b.get_width()) for b in _by_gid(fig, "particle-box"))
    assert boxes == [(59.5, 39.5, 7), (99.5, 69.5, 7)]  # the two inside the crop
    title = ax.get_title()
    assert "2 true particle boxes (7 x 7)" in title and "3 \u00c5/pixel" in title and "low-pass 0.1" in title
    # the crop shown is the low-passed image's window, transposed for x to the right
    from scipy import ndimage
    ref = ndimage.gaussian_filter(img, 1 / (2 * np.pi * 0.1), mode="reflect")[50:114, 30:94]
    np.testing.assert_allclose(ax.get_images()[0].get_array(), ref.T)
    # centred crop by default, no boxes without positions; 16 L wide by default
    fig = plot_micrograph_crop(img, tmp_path / "m2.png", size=100)
    assert fig.axes[0].get_xlim() == (49.5, 149.5) and not _by_gid(fig, "particle-box")
    fig = plot_micrograph_crop(img, tmp_path / "m4.png", L=5, positions=pos)
    assert fig.axes[0].get_xlim() == (59.5, 139.5) and fig.axes[0].get_ylim() == (34.5, 114.5)
    with pytest.raises(NumbaemError, match="without L"):
        plot_micrograph_crop(img, tmp_path / "m3.png", positions=pos)
    with pytest.raises(NumbaemError, match="runs past"):
        plot_micrograph_crop(img, tmp_path / "m3.png", size=64, corner=(190, 0))
    with pytest.raises(NumbaemError, match="image has shape"):
        plot_micrograph_crop(np.zeros((4, 4, 4)), tmp_path / "m3.png")
    assert not (tmp_path / "m3.png").exists()


def test_plot_noise_spectra(tmp_path):
    from numbaem.analysis.plots import plot_noise_spectra
    from numbaem.model.noise import RadialProfile
    r = np.arange(8) / 11
    groups = [RadialProfile(r, 1 / (r + 0.05)), RadialProfile(r, 2 / (r + 0.05))]
    mics = [RadialProfile(r, 1.1 / (r + 0.05))] * 3
    fig = plot_noise_spectra(groups, tmp_path / "n.png", micrographs=mics, scale=[1, 2, 1], pixel_size=4.0)
    ax = fig.axes[0]
    lines = {ln.get_gid(): ln for ln in ax.get_lines()}
    assert sum(ln.get_gid() == "group-spectrum" for ln in ax.get_lines()) == 2
    assert sum(ln.get_gid() == "micrograph-spectrum" for ln in ax.get_lines()) == 3
    mid = [ln for ln in ax.get_lines() if ln.get_gid() == "micrograph-spectrum"][1]
    np.testing.assert_allclose(mid.get_ydata(), 4 * 1.1 / (r + 0.05))         # drawn at the common scale
    assert "band-limit" in lines and (tmp_path / "n.png").stat().st_size > 1000
    with pytest.raises(NumbaemError, match="exists"):
        plot_noise_spectra(groups, tmp_path / "n.png")
