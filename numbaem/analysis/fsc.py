"""Measures of a reconstruction (theory section 9): FSC, resolution, relative error, the FSC plot.

Fourier shell correlation
-------------------------
Between two ``L^3`` volumes, over spherical shells of their centred DFTs
(``fftshift(fftn(ifftshift(vol)))``, theory section 2). Frequency index ``n`` (a vector of
three indices ``0 .. L-1``) lies in shell ``round(|n - R|)``, ``R = L // 2``, measured in
index units; shells ``0 .. R`` are kept (the corners of the cube, beyond ``R``, are
dropped), and shell ``i`` has frequency ``i / L`` cycles per pixel (shell ``R`` is
Nyquist for odd ``L``). No rounding tie can occur: ``|n - R|^2`` is an integer, so
``|n - R|`` is never a half-integer. Per shell::

    FSC_i = Re sum_{n in shell i} F1[n] conj(F2[n]) / sqrt( sum |F1[n]|^2  sum |F2[n]|^2 ).

A shell where either volume has no energy has no defined correlation: its value is NaN.

Resolution
----------
:func:`resolution` reads the frequency where the curve first falls below the threshold
(0.5 by default), interpolating linearly between the last shell at or above the
threshold and the first shell below it (see its docstring for the edge cases).
"""
import logging
import math
import numbers
import textwrap

import numpy as np

from ..runtime.errors import NumbaemError
from ..runtime.fourier import centered_fft
from ..runtime.validate import cubic_volume, pixel_size as check_pixel_size

logger = logging.getLogger(__name__)

__all__ = ["shell_indices", "fsc", "resolution", "resolution_angstrom", "relative_error", "plot_fsc"]


def shell_indices(L):
    """Shell of every frequency of the centred ``L^3`` DFT.

    Parameters
    ----------
    L : int
        Side of the volume (odd or even).

    Returns
    -------
    shells : ndarray, int, shape (L, L, L)
        ``round(|n - R|)`` for frequency index ``n``, ``R = L // 2``; values above ``R``
        lie outside the shells that :func:`fsc` reports.
    """
    if isinstance(L, (bool, np.bool_)) or not isinstance(L, numbers.Integral) or L < 1:
        raise NumbaemError(f"L={L!r} is not a positive whole number; pass the side of the volume")
    L = int(L)
    t = (np.arange(L) - L // 2) ** 2
    r2 = t[:, None, None] + t[None, :, None] + t[None, None, :]
    return np.rint(np.sqrt(r2)).astype(np.int64)


def fsc(vol1, vol2):
    """Fourier shell correlation of two volumes (theory section 9).

    Parameters
    ----------
    vol1, vol2 : ndarray, shape (L, L, L)
        Real volumes on the same grid.

    Returns
    -------
    freq : ndarray, shape (R + 1,)
        Shell frequencies ``i / L``, ``i = 0 .. R``, in cycles per pixel.
    curve : ndarray, shape (R + 1,)
        The correlation per shell, in ``[-1, 1]``; NaN for a shell where either volume
        has no energy. It is invariant to positive scaling of either volume.
    """
    vol1 = cubic_volume("vol1", vol1, "compare")
    vol2 = cubic_volume("vol2", vol2, "compare")
    if vol1.shape != vol2.shape:
        raise NumbaemError(
            f"vol1 has shape {vol1.shape} but vol2 has shape {vol2.shape}; resample them to the same grid")
    L = vol1.shape[0]
    R = L // 2
    shells = shell_indices(L).ravel()
    keep = shells <= R
    shells = shells[keep]
    F1 = centered_fft(vol1).ravel()[keep]
    F2 = centered_fft(vol2).ravel()[keep]
    num = np.bincount(shells, weights=(F1 * np.conj(F2)).real, minlength=R + 1)
    e1 = np.bincount(shells, weights=np.abs(F1) ** 2, minlength=R + 1)
    e2 = np.bincount(shells, weights=np.abs(F2) ** 2, minlength=R + 1)
    den = np.sqrt(e1 * e2)
    curve = np.full(R + 1, np.nan)
    ok = den > 0
    curve[ok] = np.clip(num[ok] / den[ok], -1.0, 1.0)
    if not ok.all():
        logger.debug("FSC: shells %s have no energy in one volume; their value is NaN", np.nonzero(~ok)[0])
    return np.arange(R + 1) / L, curve


def _check_curve(freq, curve):
    freq = np.asarray(freq, dtype=np.float64)
    curve = np.asarray(curve, dtype=np.float64)
    if freq.ndim != 1 or freq.size == 0:
        raise NumbaemError(f"freq has shape {freq.shape}; pass the 1-D shell frequencies that fsc returns")
    if curve.shape != freq.shape:
        raise NumbaemError(
            f"curve has shape {curve.shape} but freq has shape {freq.shape}; pass the pair that fsc returns")
    if not np.all(np.isfinite(freq)):
        raise NumbaemError("freq has NaN or infinite entries; pass the shell frequencies that fsc returns")
    if np.any(np.isinf(curve)):
        raise NumbaemError("curve has infinite entries; an FSC lies in [-1, 1] (NaN marks an empty shell)")
    return freq, curve


def resolution(freq, curve, threshold=0.5):
    """Frequency at which an FSC curve first falls below ``threshold`` (theory section 9).

    Let ``i`` be the first shell with ``curve[i] < threshold``, NaN shells (no energy)
    skipped. The result is the linear interpolation between the last valid shell
    ``j < i`` (where ``curve[j] >= threshold``) and shell ``i``::

        freq[j] + (curve[j] - threshold) / (curve[j] - curve[i]) * (freq[i] - freq[j])

    so it lies in ``(freq[j], freq[i]]``. Edge cases: if the curve never falls below the
    threshold the result is the frequency of the last valid shell (the resolution is at
    least that); if the first valid shell is already below it, that shell's frequency
    (0.0 for the usual curve starting at shell 0).

    Parameters
    ----------
    freq : ndarray, shape (n_shells,)
        Shell frequencies, cycles per pixel, increasing.
    curve : ndarray, shape (n_shells,)
    threshold : float, optional

    Returns
    -------
    freq_res : float
        Cycles per pixel.
    """
    freq, curve = _check_curve(freq, curve)
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real) \
            or not math.isfinite(threshold):
        raise NumbaemError(f"threshold={threshold!r} is not a finite number; use e.g. 0.5 or 0.143")
    valid = np.nonzero(~np.isnan(curve))[0]
    if valid.size == 0:
        raise NumbaemError("curve is NaN in every shell (a volume is zero); pass volumes that carry signal")
    f, c = freq[valid], curve[valid]
    below = np.nonzero(c < threshold)[0]
    if below.size == 0:
        return float(f[-1])
    i = below[0]
    if i == 0:
        return float(f[0])
    t = (c[i - 1] - threshold) / (c[i - 1] - c[i])
    return float(f[i - 1] + t * (f[i] - f[i - 1]))


def resolution_angstrom(freq_res, pixel_size):
    """Resolution in Angstrom: ``pixel_size / freq_res``.

    Parameters
    ----------
    freq_res : float
        Resolution in cycles per pixel (from :func:`resolution`); 0 gives ``inf``.
    pixel_size : float
        Angstrom per pixel.

    Returns
    -------
    float
    """
    pixel_size = check_pixel_size("pixel_size", pixel_size, allow_none=False)
    if isinstance(freq_res, (bool, np.bool_)) or not isinstance(freq_res, numbers.Real) \
            or not math.isfinite(freq_res) or freq_res < 0:
        raise NumbaemError(f"freq_res={freq_res!r} is not a frequency >= 0; pass the value resolution returns")
    return math.inf if freq_res == 0 else pixel_size / float(freq_res)


def relative_error(est, truth):
    """``||est - truth|| / ||truth||`` (Frobenius norms over all entries).

    Parameters
    ----------
    est, truth : ndarray, same shape
        Volumes (aligned first, see :func:`numbaem.analysis.align.align_volumes`) or coefficients.

    Returns
    -------
    float
    """
    est = np.asarray(est)
    truth = np.asarray(truth)
    if est.shape != truth.shape:
        raise NumbaemError(f"est has shape {est.shape} but truth has shape {truth.shape}; compare arrays of one shape")
    norm = np.linalg.norm(truth)
    if not np.isfinite(norm) or not np.all(np.isfinite(est)):
        raise NumbaemError("est or truth has NaN or infinite entries; replace them before comparing")
    if norm == 0:
        raise NumbaemError("truth is zero, so a relative error is undefined; compare against a non-zero reference")
    return float(np.linalg.norm(est - truth) / norm)


def plot_fsc(curves, path, pixel_size=None, threshold=0.5, force=False, title=None, note=None):
    """Plot FSC curves (:func:`numbaem.analysis.fsc.fsc`) to a PNG file.

    The bottom axis is in cycles per pixel; when ``pixel_size`` is known a top axis gives
    the same frequencies in 1/Angstrom. The legend gives each curve's resolution at
    ``threshold`` (:func:`numbaem.analysis.fsc.resolution`). When a curve never falls
    below the threshold its resolution is only a bound: the last shell is the band limit
    of the grid (``(L // 2) / L``), so the legend says "at least", a dotted line marks
    the last shell and a note on the plot says so.

    Parameters
    ----------
    curves : dict
        ``label -> (freq, curve)`` as :func:`~numbaem.analysis.fsc.fsc` returns them.
    path : str or os.PathLike
        Output PNG file, 600 pixels wide, ``430 + 30 n`` high for ``n`` lines of title
        and note.
    pixel_size : float, optional
        Angstrom per pixel: adds the 1/Angstrom axis and resolutions in Angstrom.
    threshold : float, optional
        The horizontal line drawn and the level the legend's resolution uses.
    force : bool, optional
        Whether an existing file may be overwritten.
    title : str, optional
    note : str, optional
        Small text under the title, wrapped at 90 characters (e.g. what was compared).

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    from ._figure import check_force, new_figure, save_png

    if not isinstance(curves, dict) or not curves:
        raise NumbaemError(f"curves is {type(curves).__name__} {curves!r:.60}; pass a non-empty dict label -> (freq, curve)")
    if pixel_size is not None:
        pixel_size = check_pixel_size("pixel_size", pixel_size, allow_none=False)
    force = check_force(force)
    checked = {}
    for label, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise NumbaemError(f"curves[{label!r}] is not a (freq, curve) pair; pass the tuple that fsc returns")
        checked[label] = _check_curve(*pair)

    head = [str(title)] if title else []
    if note:
        head += textwrap.wrap(str(note), 90)
    fig = new_figure(6.0, 4.0 + 0.3 * (len(head) + 1))
    ax = fig.add_subplot(1, 1, 1)
    saturated = []
    for label, (freq, curve) in checked.items():
        res = resolution(freq, curve, threshold)
        valid = freq[~np.isnan(curve)]
        at_limit = not np.any(curve[~np.isnan(curve)] < threshold)
        if at_limit:
            saturated.append(float(valid[-1]))
        if pixel_size is None:  # a bound when the curve stays above the threshold
            tag = ("\u2265 " if at_limit else "") + f"{res:.3f} 1/px"
        else:
            tag = ("\u2264 " if at_limit else "") + f"{resolution_angstrom(res, pixel_size):.2f} \u00c5"
        ax.plot(freq, curve, marker="o", markersize=3, label=f"{label} ({tag})")
    ax.axhline(threshold, color="0.4", linestyle="--", linewidth=1, label=f"FSC = {threshold:g}", gid="threshold")
    ax.axhline(0.0, color="0.8", linewidth=0.8)
    if saturated:
        edge = max(saturated)
        ax.axvline(edge, color="tab:red", linestyle=":", linewidth=1.2, gid="band-limit",
                   label=f"last shell = band limit ({edge:.3f} 1/px)")
        fig.text(0.5, 0.01, f"FSC \u2265 {threshold:g} up to the last shell ({edge:.3f} cycles/pixel, the band limit "
                 "of the grid): the resolution is at least that, and the FSC cannot show more.",
                 ha="center", va="bottom", fontsize="x-small", color="tab:red", wrap=True, gid="band-limit-note")
    ax.set_xlabel("spatial frequency (cycles/pixel)")
    if pixel_size is not None:
        top = ax.secondary_xaxis("top", functions=(lambda f: f / pixel_size, lambda g: g * pixel_size))
        top.set_xlabel(f"spatial frequency (1/\u00c5; pixel {pixel_size:.4g} \u00c5)", fontsize="small")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.2, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize="x-small")
    if head:
        fig.suptitle("\n".join(head), fontsize="small")
    fig.tight_layout(rect=(0, 0.05 if saturated else 0, 1, 1))
    return save_png(fig, path, force, "FSC plot")
