"""Figures a user looks at: FSC curves, convergence, slices of volumes, a micrograph crop.

(:func:`plot_fsc` is defined beside the FSC in :mod:`numbaem.analysis.fsc` and re-exported
here.) Every function builds a :class:`matplotlib.figure.Figure` with the object API and the Agg
canvas (no display needed, the global pyplot backend untouched), writes it as PNG
atomically (:func:`numbaem.data.io.atomic_path`: a temporary name, then a rename; an
existing file only with ``force``), and returns the figure so that a caller (or a test)
can inspect what was drawn. Artists that carry meaning have a ``gid``: ``"stage-boundary"``,
``"band-limit"``, ``"band-limit-note"``, ``"threshold"``, ``"particle-box"``.

Grid conventions (theory section 2): array axes 0, 1, 2 are x, y, z; images are shown with
x to the right and y up (``origin="lower"``), for volumes and micrographs alike.
"""
import logging
import math
import textwrap

import numpy as np

from ..runtime.errors import NumbaemError
from ..runtime.validate import cubic_volume, is_int, pixel_size as check_pixel_size, positive_number, whole_number
from ._figure import check_force, new_figure, save_png
from .fsc import plot_fsc

logger = logging.getLogger(__name__)

__all__ = ["plot_fsc", "plot_convergence", "plot_slices", "plot_micrograph_crop", "plot_noise_spectra"]


# --------------------------------------------------------------------------- convergence


def _stage_starts(history):
    """``(iteration, record)`` of the first record of every stage after the first."""
    return [(r1["iteration"], r1) for r0, r1 in zip(history, history[1:]) if r1["stage"] != r0["stage"]]


def _stage_label(rec):
    tag = f"stage {rec['stage']}"
    if "lmax" in rec:
        tag += f"\nlmax {rec['lmax']}"
    if "K" in rec:
        tag += f", K {rec['K']}"
    return tag


def plot_convergence(history, path, force=False, start=None, L=None):
    """Plot a run's per-iteration records (:func:`numbaem.em.run.reconstruct`) to a PNG file.

    Panels: log-likelihood per patch, the empty-patch weight ``upsilon``, and, when the
    records carry a comparison with the truth, the aligned relative error and the
    aligned FSC 0.5 resolution (:func:`numbaem.analysis.compare.compare_to_truth`).
    Stage boundaries (a new ``lmax`` / ``K``) are dotted vertical lines half-way between
    iterations in every panel, labelled with the new stage's ``lmax`` and ``K``;
    ``start``, measured on the initial guess, is drawn at iteration 0. With ``L`` the
    resolution panel also shows the band limit (the last shell, ``(L // 2) / L``): a
    curve flat on that line has reached what the grid can show, and the relative error
    is the figure that still moves.

    Parameters
    ----------
    history : list of dict
        Records with at least ``iteration``, ``stage``, ``loglik_per_patch`` and
        ``upsilon``; ``lmax``, ``K``, ``relative_error``, ``fsc_resolution`` are used
        when present.
    path : str or os.PathLike
        Output PNG file (1000 x 700 pixels).
    force : bool, optional
        Whether an existing file may be overwritten.
    start : dict, optional
        The same keys measured on the initial guess (e.g. ``relative_error``,
        ``fsc_resolution``, ``upsilon``), drawn at iteration 0.
    L : int, optional
        Side of the patches, for the band-limit line.

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    if not isinstance(history, (list, tuple)) or not history or not all(isinstance(r, dict) for r in history):
        raise NumbaemError("history is not a non-empty list of iteration records (dicts); pass state.history "
                           "or the records of a run's --log file")
    for key in ("iteration", "stage", "loglik_per_patch", "upsilon"):
        missing = [i for i, r in enumerate(history) if key not in r]
        if missing:
            raise NumbaemError(f"history record {missing[0]} has no {key!r}; pass the records reconstruct writes")
    if start is not None and not isinstance(start, dict):
        raise NumbaemError(f"start is a {type(start).__name__}; pass a dict such as "
                           "{'relative_error': 0.6, 'fsc_resolution': 0.2} measured on the initial guess")
    start = start or {}
    force = check_force(force)
    if L is not None:
        L = whole_number("L", L, minimum=3)

    it = np.array([r["iteration"] for r in history], dtype=float)
    panels = [("loglik_per_patch", "log-likelihood per patch", "convergence"),
              ("upsilon", "upsilon (weight of an empty patch)", "empty-patch weight")]
    if any("relative_error" in r for r in history):
        panels.append(("relative_error", "relative error after alignment", "error against the truth"))
    if any("fsc_resolution" in r for r in history):
        panels.append(("fsc_resolution", "FSC 0.5 after alignment (cycles/pixel)", "resolution against the truth"))
    fig = new_figure(10.0, 7.0)
    stages = [(history[0]["iteration"], history[0])] + _stage_starts(history)
    handles = {}
    for i, (key, ylabel, title) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        y = np.array([r.get(key, np.nan) for r in history], dtype=float)
        x0, y0 = it, y
        if key in start:
            x0, y0 = np.concatenate([[0.0], it]), np.concatenate([[float(start[key])], y])
            ax.plot([0.0], [float(start[key])], marker="s", color="tab:orange", linestyle="none",
                    label="start (iteration 0)", gid="start")
        ax.plot(x0, y0, "-", color="tab:blue", linewidth=1)
        ax.plot(it, y, "o", color="tab:blue", markersize=3, label="after iteration")
        if key == "fsc_resolution" and L is not None:
            edge = (L // 2) / L
            ax.axhline(edge, color="tab:red", linestyle=":", linewidth=1.2, gid="band-limit",
                       label=f"band limit (last shell {edge:.3f})")
            top = max(edge, float(np.nanmax(y0))) if np.any(np.isfinite(y0)) else edge
            ax.set_ylim(0.0, top * 1.05)
        if key == "relative_error":
            ax.set_ylim(bottom=0.0)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.18 * (hi - lo))  # a band at the top for the stage labels
        for x, rec in stages:
            if rec is not history[0]:
                ax.axvline(x - 0.5, color="0.5", linestyle=":", linewidth=1, gid="stage-boundary")
            ax.annotate(_stage_label(rec), (x - 0.5, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                        textcoords="offset points", ha="left", va="top", fontsize="x-small", color="0.35")
        ax.set_xlim(-0.5 if start else it[0] - 0.5, it[-1] + 0.5)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize="medium")
        ax.grid(True, alpha=0.3)
        if key == "fsc_resolution" and L is not None and np.all(y[np.isfinite(y)] >= edge - 1e-12):
            ax.text(0.98, 0.35, "at the band limit in every iteration:\nfollow the relative error",
                    transform=ax.transAxes, ha="right", va="center", fontsize="x-small", color="tab:red",
                    gid="band-limit-note")
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", ncol=len(handles),
               fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return save_png(fig, path, force, "convergence plot")


# --------------------------------------------------------------------------- volumes


_VIEWS = (("xy slice (z = 0)", ("x", "y")), ("xz slice (y = 0)", ("x", "z")), ("yz slice (x = 0)", ("y", "z")),
          ("projection along z", ("x", "y")))


def _views(vol):
    """The central slices and the projection along z, each as (horizontal, vertical) arrays."""
    R = vol.shape[0] // 2
    return [vol[:, :, R], vol[:, R, :], vol[R, :, :], vol.sum(axis=2)]


def plot_slices(volumes, path, shared_scale=False, force=False, title=None):
    """Central slices and the projection along z of several volumes, side by side, to a PNG file.

    One row per volume (e.g. truth, start, estimate, aligned first), four columns: the
    slices through the centre voxel normal to z, y and x, and the sum along z. Axes as
    theory section 2 (horizontal the first named axis, vertical the second, origin at
    the centre voxel ``L // 2``).

    Colour scale: by default each volume has its own, shared by its three slices (a
    colour bar per row for the slices, one for the projection), so structure shows
    even where amplitudes differ (a random start, an unscaled map). With
    ``shared_scale`` every row uses the same limits (the slices' over all volumes, the
    projections' over all volumes): amplitudes are then comparable across rows. The
    figure's title says which.

    Parameters
    ----------
    volumes : dict
        ``label -> ndarray, shape (L, L, L)``, all of one ``L``, drawn top to bottom.
    path : str or os.PathLike
        Output PNG file (width 1100 pixels, height 250 per row + 60).
    shared_scale : bool, optional
    force : bool, optional
    title : str, optional

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    if not isinstance(volumes, dict) or not volumes:
        raise NumbaemError(f"volumes is {type(volumes).__name__}; pass a non-empty dict label -> (L, L, L) array")
    vols = {label: cubic_volume(f"volumes[{label!r}]", v, "plot") for label, v in volumes.items()}
    shapes = {v.shape for v in vols.values()}
    if len(shapes) != 1:
        raise NumbaemError(f"the volumes have shapes {sorted(shapes)}; Fourier-crop them to one size before plotting")
    force = check_force(force)
    L = next(iter(vols.values())).shape[0]
    R = L // 2
    views = {label: _views(v) for label, v in vols.items()}
    if shared_scale:
        s_lim = (min(min(x.min() for x in w[:3]) for w in views.values()),
                 max(max(x.max() for x in w[:3]) for w in views.values()))
        p_lim = (min(w[3].min() for w in views.values()), max(w[3].max() for w in views.values()))

    n = len(vols)
    fig = new_figure(11.0, 2.5 * n + 0.6, layout="constrained")
    extent = (-R - 0.5, L - R - 0.5, -R - 0.5, L - R - 0.5)
    grid = fig.add_gridspec(n, 4)
    for row, (label, w) in enumerate(views.items()):
        if not shared_scale:
            s_lim = (min(x.min() for x in w[:3]), max(x.max() for x in w[:3]))
            p_lim = (w[3].min(), w[3].max())
        axes = [fig.add_subplot(grid[row, j]) for j in range(4)]
        for j, (ax, img, (name, (h, v))) in enumerate(zip(axes, w, _VIEWS)):
            lim = p_lim if j == 3 else s_lim
            im = ax.imshow(img.T, origin="lower", cmap="gray", vmin=lim[0], vmax=lim[1], extent=extent,
                           interpolation="nearest")
            ax.set_xlabel(f"{h} (voxels)", fontsize="small")
            ax.set_ylabel(f"{label}\n{v} (voxels)" if j == 0 else f"{v} (voxels)", fontsize="small")
            ax.set_xticks([-R, 0, R])
            ax.set_yticks([-R, 0, R])
            ax.tick_params(labelsize="x-small")
            if row == 0:
                ax.set_title(name, fontsize="small")
            if j >= 2:
                fig.colorbar(im, ax=axes[:3] if j == 2 else ax, shrink=0.9).ax.tick_params(labelsize="x-small")
    scale = ("one colour scale for all rows (slices; projections their own, also shared)" if shared_scale
             else "colour scale per row (each volume its own; the projection its own)")
    fig.suptitle((f"{title}\n" if title else "") + f"L = {L}; {scale}", fontsize="medium")
    return save_png(fig, path, force, "slice plot")


# --------------------------------------------------------------------------- micrograph


def plot_micrograph_crop(image, path, L=None, positions=None, size=None, corner=None, lowpass=None,
                         pixel_size=None, force=False, title=None):
    """A square crop of a micrograph, optionally low-passed, with particle boxes outlined, to PNG.

    Parameters
    ----------
    image : ndarray, shape (N0, N1)
        The micrograph (axes x, y).
    path : str or os.PathLike
        Output PNG file (600 x 600 pixels).
    L : int, optional
        Side of a particle box in pixels (the patch size); needed with ``positions``.
    positions : ndarray of int, shape (T, 2), optional
        Top-left pixels ``(x, y)`` of the true particle boxes (``Simulation.positions``
        of one micrograph); those that overlap the crop are outlined.
    size : int, optional
        Side of the crop in pixels (clipped to the micrograph); default ``16 L`` when
        ``L`` is given (particles stay visible, a few dozen boxes at most), else 256.
    corner : (int, int), optional
        Lowest ``(x, y)`` pixel of the crop; default: the crop is centred.
    lowpass : float, optional
        Frequency in cycles/pixel at which a Gaussian low-pass keeps ``e^(-1/2)`` of the
        amplitude (``sigma = 1 / (2 pi lowpass)`` pixels); None shows the raw pixels.
    pixel_size : float, optional
        Angstrom per pixel, named in the title.
    force : bool, optional
    title : str, optional

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    from matplotlib.patches import Rectangle
    from scipy import ndimage

    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0 or np.iscomplexobj(img):
        raise NumbaemError(f"image has shape {img.shape} and dtype {img.dtype}; pass one real micrograph (N0, N1)")
    img = img.astype(np.float64, copy=False)
    if not np.all(np.isfinite(img)):
        raise NumbaemError("image has NaN or infinite pixels; replace them before plotting")
    if L is not None:
        L = whole_number("L", L)
    size = whole_number("size", (16 * L if L is not None else 256) if size is None else size)
    force = check_force(force)
    pixel_size = check_pixel_size("pixel_size", pixel_size)
    N0, N1 = img.shape
    s0, s1 = min(size, N0), min(size, N1)
    if corner is None:
        c0, c1 = (N0 - s0) // 2, (N1 - s1) // 2
    else:
        if not isinstance(corner, (tuple, list)) or len(corner) != 2 or not all(is_int(c) and c >= 0 for c in corner):
            raise NumbaemError(f"corner={corner!r} is not a pair of pixel indices >= 0; pass e.g. corner=(0, 0)")
        c0, c1 = int(corner[0]), int(corner[1])
        if c0 + s0 > N0 or c1 + s1 > N1:
            raise NumbaemError(f"corner={tuple(corner)} with size {size} runs past the micrograph ({N0} x {N1}); "
                               f"pass a corner with x <= {N0 - s0} and y <= {N1 - s1}")
    if positions is not None:
        if L is None:
            raise NumbaemError("positions were given without L; pass L, the side of a particle box in pixels")
        pos = np.asarray(positions)
        if pos.ndim != 2 or pos.shape[1] != 2 or not np.issubdtype(pos.dtype, np.number):
            raise NumbaemError(f"positions has shape {pos.shape}; pass the (T, 2) top-left pixels of the boxes")
    shown = img
    if lowpass is not None:
        lowpass = positive_number("lowpass", lowpass, example=0.1, unit=" (cycles/pixel)")
        shown = ndimage.gaussian_filter(img, 1.0 / (2.0 * math.pi * lowpass), mode="reflect")
    crop = shown[c0:c0 + s0, c1:c1 + s1]

    fig = new_figure(6.0, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = np.percentile(crop, [0.5, 99.5])
    ax.imshow(crop.T, origin="lower", cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
              extent=(c0 - 0.5, c0 + s0 - 0.5, c1 - 0.5, c1 + s1 - 0.5), interpolation="nearest")
    n_boxes = 0
    if positions is not None:
        for p0, p1 in pos:
            if p0 + L > c0 and p0 < c0 + s0 and p1 + L > c1 and p1 < c1 + s1:
                ax.add_patch(Rectangle((p0 - 0.5, p1 - 0.5), L, L, fill=False, edgecolor="tab:orange",
                                       linewidth=1.0, gid="particle-box"))
                n_boxes += 1
    ax.set_xlim(c0 - 0.5, c0 + s0 - 0.5)
    ax.set_ylim(c1 - 0.5, c1 + s1 - 0.5)
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    parts = [f"crop {s0} x {s1} at ({c0}, {c1}) of {N0} x {N1}"]
    if pixel_size is not None:
        parts.append(f"{pixel_size:g} \u00c5/pixel")
    if lowpass is not None:
        parts.append(f"Gaussian low-pass {lowpass:g} cycles/pixel")
    if positions is not None:
        parts.append(f"{n_boxes} true particle boxes ({L} x {L})")
    ax.set_title("\n".join(([str(title)] if title else []) + textwrap.wrap("; ".join(parts), 75)), fontsize="small")
    fig.tight_layout()
    return save_png(fig, path, force, "micrograph crop")


# --------------------------------------------------------------------------- noise spectra


def plot_noise_spectra(group_spectra, path, micrographs=None, scale=None, pixel_size=None, force=False):
    """Estimated noise power spectra against the radial frequency, to PNG (theory section 11).

    Parameters
    ----------
    group_spectra : list of numbaem.model.noise.RadialProfile
        ``S_g`` of each group (the micrographs are whitened by ``1 / sqrt(S_g)``), drawn
        thick, ``gid`` ``"group-spectrum"``.
    path : str or os.PathLike
    micrographs : list of RadialProfile, optional
        Each micrograph's own estimate, drawn thin (``gid`` ``"micrograph-spectrum"``).
    scale : array_like, optional
        The factor each micrograph was multiplied by (its spectrum is drawn times its square).
    pixel_size : float, optional
        Angstrom per pixel: a second axis in 1/Angstrom.
    force : bool

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    force = check_force(force)
    pixel_size = check_pixel_size("pixel_size", pixel_size)
    if not group_spectra:
        raise NumbaemError("no noise spectra to plot; estimate them first (--noise coloured)")
    fig = new_figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for i, s in enumerate(micrographs or []):
        f = 1.0 if scale is None else float(scale[i]) ** 2
        ax.semilogy(s.radius, s.values * f, color="0.7", lw=0.7, gid="micrograph-spectrum",
                    label="micrographs (common scale)" if i == 0 else None)
    for g, s in enumerate(group_spectra):
        ax.semilogy(s.radius, s.values, lw=1.8, marker="o", ms=3, gid="group-spectrum", label=f"group {g}")
    ax.axvline(0.5, color="grey", lw=0.6, ls=":", gid="band-limit")
    ax.set_xlabel("radial frequency |k| (cycles/pixel)")
    ax.set_ylabel("noise power per pixel")
    if pixel_size is not None:
        top = ax.secondary_xaxis("top", functions=(lambda k: k / pixel_size, lambda q: q * pixel_size))
        top.set_xlabel("1/\u00c5 (pixel %.3g \u00c5)" % pixel_size)
    ax.set_title("estimated noise power spectra; micrographs whitened by 1/sqrt(S_g)", fontsize="small")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_png(fig, path, force, "noise spectra")


def plot_view_distribution(weights, path, truth=None, force=False, title=None):
    """The distribution of viewing directions on the sphere, as a Mollweide map, to a PNG file.

    Each HEALPix cell (:mod:`numbaem.model.viewprior`) is drawn at its density relative
    to the uniform distribution (1 = uniform; cells have equal areas), longitude
    ``atan2(v_y, v_x)`` across, latitude ``asin(v_z)`` up (``+z`` at the top).

    Parameters
    ----------
    weights : ndarray, shape (12 nside^2,)
        Cell weights ``q_b`` (any positive scale).
    path : str or os.PathLike
    truth : ndarray, shape (12 nside^2,), optional
        The true cells' probabilities: drawn as a second map beside the estimate.
    force : bool, optional
    title : str, optional

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    from ..model import viewprior
    q = np.asarray(weights, dtype=np.float64)
    B = len(q)
    nside = viewprior.nside_of(q)
    if q.ndim != 1 or 12 * nside * nside != B or not np.all(np.isfinite(q)) or not np.all(q >= 0) or q.sum() <= 0:
        raise NumbaemError(f"weights of shape {q.shape} are not non-negative weights of 12 nside^2 HEALPix cells")
    force = check_force(force)
    maps = [("estimate", viewprior.distribution(q) * B)]
    if truth is not None:
        maps.append(("truth", viewprior.distribution(truth) * B))
    lon = np.linspace(-np.pi, np.pi, 361)
    lat = np.linspace(-np.pi / 2, np.pi / 2, 181)
    LON, LAT = np.meshgrid(lon, lat)
    v = np.stack([np.cos(LAT) * np.cos(LON), np.cos(LAT) * np.sin(LON), np.sin(LAT)], axis=-1)
    cell = viewprior.bins_of_directions(v.reshape(-1, 3), nside).reshape(LON.shape)
    vmax = max(float(m.max()) for _, m in maps)
    fig = new_figure(6.0 * len(maps), 3.6, layout="constrained")
    for i, (label, dens) in enumerate(maps):
        ax = fig.add_subplot(1, len(maps), i + 1, projection="mollweide")
        im = ax.pcolormesh(LON, LAT, dens[cell], cmap="viridis", vmin=0.0, vmax=vmax, shading="auto")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.set_xticklabels([])
        fig.colorbar(im, ax=ax, orientation="horizontal", shrink=0.7, label="density / uniform")
    fig.suptitle(title or "viewing directions")
    return save_png(fig, path, force, "view distribution plot")


def plot_junk_spectrum(lam, sigma2, path, varsigma=None, force=False):
    """The junk field's variance per radial shell against the noise's (theory section 14.4), to a PNG.

    Parameters
    ----------
    lam : ndarray, shape (n_shells,)
        Shell variances ``lambda_s`` (:mod:`numbaem.model.junkfield`), shell ``s`` at ``s / L``
        cycles per pixel.
    sigma2 : float
        The noise variance (the empty patch's ``lambda``).
    path : str or os.PathLike
    varsigma : float, optional
        The junk class's prior probability, for the title.
    force : bool, optional
    """
    lam = np.asarray(lam, dtype=np.float64)
    if lam.ndim != 1 or not len(lam) or not np.all(np.isfinite(lam)) or not np.all(lam > 0):
        raise NumbaemError(f"junk spectrum of shape {lam.shape} is not positive variances per shell")
    force = check_force(force)
    fig = new_figure(5.0, 3.4, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    s = np.arange(len(lam))
    ax.semilogy(s, lam, "o-", label="junk field")
    ax.axhline(sigma2, color="k", ls=":", label="noise sigma^2")
    ax.set_xlabel("shell |k| (frequency index on the patch)")
    ax.set_ylabel("variance per frequency")
    ax.legend(fontsize=8)
    ax.set_title("junk class" + (f" (prior {varsigma:.3f})" if varsigma is not None else ""))
    return save_png(fig, path, force, "junk spectrum plot")
