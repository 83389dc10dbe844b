"""Micrographs as a microscope gives them, made into what the model expects (theory section 11).

The model of sections 4-6 expects zero-mean noise (the empty state is ``N(y; 0, sigma^2)``),
one noise level, particles of positive density bright (or, with a CTF, as the CTF makes
them) and particles whose box is the ``L x L`` patch. :func:`prepare_micrographs` makes
raw micrographs so, one micrograph in memory at a time, into memory-mapped working files
(float32 MRC in a work directory; a stack of 4k x 4k float16 micrographs never sits in
memory whole):

1. **Contrast** (``invert_contrast``): multiply by -1. Convention: without a CTF the model
   expects positive density bright (positive); with a CTF, ``Psi_g`` carries CTFFIND's sign
   (``CTF(0) = -Q``), so raw micrographs, where particles are dark, need no inversion. Data
   whose particles are bright where the model expects dark (or the reverse) need
   ``invert_contrast``; :func:`contrast_check` warns when the data look inverted.
2. **Background**: the mean and a smooth background (ice gradient) are removed by a robust
   fit of a polynomial surface of degree ``background_degree`` (default 2; 1 is a ramp) to
   the means of blocks the size of a particle box, by iteratively reweighted least squares
   with Tukey's biweight (``c = 4.685`` MADs of the residuals). The particles' own mean is
   part of the signal (theory section 11): blocks holding a particle are outliers of the
   fit and are down-weighted, so the fitted level is that of the empty ice. The fit is
   equivariant: adding a constant or any polynomial of degree ``<= background_degree`` to a
   micrograph adds it to the fit (least squares are linear and the weights depend only on
   the residuals), so offsets and ramps leave the prepared micrograph unchanged to
   round-off.
3. **Working pixel size** (``particle_diameter``): the working pixel size is
   ``diameter / L``, so the particle's box is the patch, and each micrograph is
   Fourier-cropped to it (:func:`numbaem.runtime.fourier.downsample_image`) and multiplied
   by ``a_raw / a_work``: a pixel value is a line integral in units of the pixel (the
   simulator's scale, theory section 1: Method 1 multiplies its crop by ``L / L0`` alike),
   and a pixel ``a_work / a_raw`` times longer integrates that much more, so micrographs
   simulated at 4x the pixel count and cropped here give the scale of those simulated at
   the working size. The cropped side is the odd size nearest ``N a_raw / a_work``: an even
   size folds the Nyquist bin and colours white noise (:mod:`numbaem.runtime.fourier`).
   The actual working pixel size, ``a_raw N / N_crop`` (within ``1/N_crop`` relative of the
   target; the mean over the axes), is the one reported and written to the headers.
   Without ``particle_diameter`` nothing is resampled.
4. **Noise scale and spectrum**: each micrograph's noise power spectrum ``S_m`` is estimated
   robustly (:func:`numbaem.model.noise.estimate_noise_spectrum`, tiles of side ``L``), and
   its noise variance is ``sigma_m^2 = mean S_m``. Micrographs are brought to a common
   noise scale, the median of the ``sigma_m`` (so one micrograph keeps its own units
   exactly, and a noise variance given in the data's units keeps its meaning).
5. **Whitening** (``noise='coloured'``): per group of micrographs (the CTF groups; one
   group without a CTF), the mean of the members' scaled spectra ``S_g`` gives the filter
   ``w_g = sqrt(S_bar_g / S_g)``; every micrograph of the group is filtered by it whole
   (before patches are cut, so patch edges do not matter) and ``w_g`` joins ``Psi_g``
   (:class:`numbaem.model.ctf.ImageFilter`). Why whitening rather than a per-frequency
   ``sigma^2`` in the M-step (RELION's way): the patch likelihood of section 4 is
   evaluated in real space over shifts with FFTs of the ``2L x 2L`` padded patch; a
   per-frequency noise model would make the residual norm a quadratic form that is not
   diagonal in pixels and not shift-invariant after the crop ``C``, and the E-step's
   correlation identity (section 5) would not hold. Whitening keeps every identity of
   sections 5 and 6 as it is, at the price of an estimate made before the EM.
"""
import dataclasses
import logging
import math
import os
from pathlib import Path

import numpy as np

from ..model.ctf import ImageFilter, default_defocus_tolerance, group_by_defocus
from ..model.noise import (DEFAULT_QUANTILE, RadialProfile, apply_radial_filter, estimate_noise_spectrum,
                           mean_power, whitening_filter)
from ..runtime.errors import NumbaemError
from ..runtime.fourier import downsample_image
from ..runtime.validate import check_L, positive_number
from .io import read_image, write_image

logger = logging.getLogger(__name__)

__all__ = ["Prepared", "prepare_micrographs", "fit_background", "working_shape", "contrast_check",
           "check_offset", "micrograph_pixel_size"]

#: Tukey biweight tuning constant (95% efficiency at the normal).
_TUKEY_C = 4.685
#: |z| of the block-mean skewness above which the contrast is called inverted.
CONTRAST_Z = 4.0


@dataclasses.dataclass
class Prepared:
    """Micrographs made ready for the EM, and what was done to them.

    Attributes
    ----------
    paths : list of str
        The working micrographs (files in ``work_dir``, or the inputs when nothing was changed).
    inputs : list of str
    L : int
    pixel_size, raw_pixel_size : float or None
        Working and input pixel size, Angstrom.
    shapes : list of (int, int)
        Working micrograph shapes.
    scale : ndarray, shape (n,)
        Factor each micrograph was multiplied by (common noise scale; the crop's
        ``a_raw / a_work`` comes on top, see ``crop_gain``).
    noise_variance : ndarray, shape (n,) or None
        ``sigma_m^2`` before scaling (working pixels).
    spectra : list of RadialProfile or None
        Each micrograph's estimated ``S_m`` (before scaling).
    groups : ndarray of int, shape (n,), or None
        Group of each micrograph (None: no filter, the model of sections 4-6).
    filters : list of ImageFilter or None
        ``t_g`` per group.
    group_spectra : list of RadialProfile or None
        ``S_g`` per group (coloured noise).
    contrast : dict
        :func:`contrast_check`'s result.
    work_dir : str or None
    crop_gain : float
        ``a_raw / a_work``, the factor of the Fourier crop (1 without one).
    """

    paths: list
    inputs: list
    L: int
    pixel_size: float
    raw_pixel_size: float
    shapes: list
    scale: np.ndarray
    noise_variance: np.ndarray = None
    spectra: list = None
    groups: np.ndarray = None
    filters: list = None
    group_spectra: list = None
    contrast: dict = None
    work_dir: str = None
    crop_gain: float = 1.0

    def source(self):
        """A :class:`~numbaem.data.patches.PatchSource` of the working micrographs (memory-mapped)."""
        from .patches import PatchSource
        src = PatchSource.from_files(self.paths, self.L, groups=self.groups, filters=self.filters)
        if self.pixel_size is not None:
            src.pixel_size = self.pixel_size
        return src

    def boxes(self, centres, shift_window, raw_shapes):
        """A :class:`~numbaem.data.boxes.BoxSource` of boxes around picks on the working micrographs.

        ``centres`` are in pixels of the micrographs as given (``raw_shapes``); a Fourier crop
        from ``N`` to ``N'`` pixels along an axis maps the pixel coordinate ``c`` to ``c N' / N``.
        """
        from .boxes import BoxSource
        grid = self.source()
        scaled = [np.asarray(c, dtype=np.float64).reshape(-1, 2) * (np.array(w, float) / np.array(r, float))
                  for c, w, r in zip(centres, self.shapes, raw_shapes)]
        return BoxSource(grid.images, self.L, scaled, shift_window, names=grid.names, pixel_size=grid.pixel_size,
                         groups=self.groups, filters=self.filters)

    def summary(self):
        """A JSON-ready record of the preprocessing."""
        out = dict(micrographs=len(self.inputs), pixel_size=self.pixel_size, raw_pixel_size=self.raw_pixel_size,
                   working_shapes=[list(s) for s in self.shapes], scale=self.scale.tolist(),
                   groups=None if self.groups is None else self.groups.tolist(),
                   contrast=self.contrast)
        if self.noise_variance is not None:
            out["noise_variance"] = self.noise_variance.tolist()
        if self.filters is not None:
            out["group_ctf"] = [None if f.ctf is None else dataclasses.asdict(f.ctf) for f in self.filters]
        if self.group_spectra is not None:
            out["group_spectra"] = [s.to_dict() for s in self.group_spectra]
        return out


def working_shape(shape, raw_pixel, work_pixel):
    """The odd Fourier-crop size nearest ``N raw / work`` per axis (module doc, step 3).

    An axis whose target is its own size (``raw == work``) keeps it, odd or even.
    """
    out = []
    for n in shape:
        m = n * raw_pixel / work_pixel
        if abs(m - n) <= 1e-9 * n:
            out.append(int(n))
            continue
        lo = int(math.floor(m))
        lo = lo if lo % 2 == 1 else lo - 1
        k = lo + 2 if (lo + 2 <= n and (lo + 2 - m) < (m - lo)) else lo
        out.append(max(1, k))
    return tuple(out)


def _monomials(degree):
    return [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]


def fit_background(img, degree, block):
    """The robust polynomial background of an image (module doc, step 2).

    Parameters
    ----------
    img : ndarray, shape (N0, N1)
    degree : int
        Degree of the surface, >= 0.
    block : int
        Side of the blocks whose means are fitted (a particle's box).

    Returns
    -------
    background : ndarray, shape (N0, N1)
    """
    img = np.asarray(img, dtype=np.float64)
    N0, N1 = img.shape
    block = max(1, int(block))
    terms = _monomials(int(degree))
    while True:
        nb0, nb1 = N0 // block, N1 // block
        if nb0 * nb1 >= 4 * len(terms) or block == 1:
            break
        block = max(1, block // 2)
    means = img[:nb0 * block, :nb1 * block].reshape(nb0, block, nb1, block).mean(axis=(1, 3)).ravel()
    u0 = ((np.arange(nb0) * block + (block - 1) / 2) - (N0 - 1) / 2) / (N0 / 2)
    u1 = ((np.arange(nb1) * block + (block - 1) / 2) - (N1 - 1) / 2) / (N1 / 2)
    U0, U1 = np.meshgrid(u0, u1, indexing="ij")
    X = np.stack([(U0 ** i * U1 ** j).ravel() for i, j in terms], axis=1)
    w = np.ones(len(means))
    coef = np.zeros(len(terms))
    for _ in range(50):
        sw = np.sqrt(w)
        new = np.linalg.lstsq(X * sw[:, None], means * sw, rcond=None)[0]
        r = means - X @ new
        mad = 1.4826 * np.median(np.abs(r - np.median(r)))
        done = np.allclose(new, coef, rtol=1e-12, atol=1e-14 * (np.abs(new).max() + 1e-300))
        coef = new
        if not mad > 0 or done:
            break
        z = r / (_TUKEY_C * mad)
        w = np.where(np.abs(z) < 1, (1 - z * z) ** 2, 0.0)
        if np.count_nonzero(w) < len(terms):
            break
    x0 = ((np.arange(N0)) - (N0 - 1) / 2) / (N0 / 2)
    x1 = ((np.arange(N1)) - (N1 - 1) / 2) / (N1 / 2)
    out = np.zeros((N0, N1))
    for c, (i, j) in zip(coef, terms):
        out += c * np.outer(x0 ** i, x1 ** j)
    return out


def _block_means(img, L):
    r, c = img.shape[0] // L, img.shape[1] // L
    return img[:r * L, :c * L].reshape(r, L, c, L).mean(axis=(1, 3)).ravel()


def contrast_check(block_means, expected_sign):
    """Is the particles' contrast the one the model expects?

    The means of the ``L x L`` patches of a prepared micrograph are noise (symmetric about 0)
    for empty patches and shifted by the particle's mean contrast for the others, so their
    skewness has the sign of the particles' contrast. ``z = g1 / sqrt(6/n)`` is the
    skewness in standard errors of a symmetric sample of ``n``.

    Parameters
    ----------
    block_means : ndarray
        Patch means of all micrographs, each micrograph's divided by its robust spread.
    expected_sign : {+1, -1}
        +1 without a CTF (positive density bright), -1 with one (CTFFIND's sign).

    Returns
    -------
    dict
        ``skewness``, ``z``, ``expected_sign`` and ``inverted`` (True when ``z`` has the
        wrong sign beyond :data:`CONTRAST_Z`).
    """
    x = np.asarray(block_means, dtype=np.float64)
    n = len(x)
    if n < 8:
        return dict(skewness=None, z=None, expected_sign=int(expected_sign), inverted=False)
    d = x - x.mean()
    sd = math.sqrt(float(np.mean(d * d)))
    g1 = float(np.mean(d ** 3)) / sd ** 3 if sd > 0 else 0.0
    z = g1 / math.sqrt(6.0 / n)
    return dict(skewness=g1, z=z, expected_sign=int(expected_sign), inverted=bool(z * expected_sign < -CONTRAST_Z))


def check_offset(images, L, sigma2=None):
    """Warn when unprepared micrographs have a mean far from zero (the empty state expects zero).

    Returns the largest ``|mean| / noise std`` over the micrographs (the std from ``sigma2``
    when given, else the pixel standard deviation, which includes the particles).
    """
    worst = 0.0
    for img in images:
        m = float(np.mean(img, dtype=np.float64))
        s = math.sqrt(sigma2) if sigma2 else float(np.std(img, dtype=np.float64))
        worst = max(worst, abs(m) / s if s > 0 else math.inf)
    if worst > 0.1:
        logger.warning("the micrographs' mean is %.3g noise standard deviations from zero without preprocessing; "
                       "the model's empty state expects zero-mean noise: leave preprocessing on", worst)
    return worst


def _raw_headers(paths, pixel_size):
    shapes, sizes = [], []
    for p in paths:
        img, px = read_image(p, mmap=True)
        shapes.append(tuple(img.shape))
        sizes.append(px)
        del img
    if pixel_size is not None:
        return shapes, float(pixel_size), sizes
    known = {round(s, 6) for s in sizes if s}
    if len(known) > 1:
        raise NumbaemError(f"the micrographs have different pixel sizes ({', '.join(f'{s:g}' for s in sorted(known))} A); "
                           "resample them to one pixel size first, or give --pixel-size if the headers are wrong")
    return shapes, (known.pop() if known else None), sizes


def micrograph_pixel_size(paths):
    """The micrographs' common pixel size from their MRC headers (None when unset); refuses several."""
    return _raw_headers([str(p) for p in paths], None)[1]


def prepare_micrographs(paths, L, work_dir=None, *, pixel_size=None, particle_diameter=None, invert_contrast=False,
                        ctf=None, defocus_tolerance=None, noise="coloured", background=True, background_degree=2,
                        quantile=DEFAULT_QUANTILE, refinements=3, progress=None):
    """Prepare raw micrographs for the EM (module doc): contrast, background, size, scale, whitening, groups.

    Parameters
    ----------
    paths : list of str
        Micrograph MRC files.
    L : int
        Patch side.
    work_dir : str, optional
        Where the working micrographs are written (must exist; needed unless nothing is
        changed).
    pixel_size : float, optional
        Input pixel size in Angstrom (default: the MRC headers).
    particle_diameter : float, optional
        Angstrom; the working pixel size becomes ``particle_diameter / L``.
    invert_contrast : bool
    ctf : list of numbaem.model.ctf.CTFParams, optional
        One per micrograph (in the order of ``paths``): CTF groups and filters.
    defocus_tolerance : float, optional
        Angstrom (default :func:`numbaem.model.ctf.default_defocus_tolerance`).
    noise : {'coloured', 'white'}
    background : bool
        Remove the background and bring the micrographs to a common noise scale.
    background_degree : int
    quantile, refinements :
        Of the noise spectrum estimate (:mod:`numbaem.model.noise`).
    progress : callable(int), optional
        Called after each micrograph of each pass.

    Returns
    -------
    Prepared
    """
    L = check_L(L, "--patch-size")
    paths = [str(p) for p in paths]
    if not paths:
        raise NumbaemError("no micrographs were given; pass at least one micrograph file")
    if noise not in ("coloured", "white"):
        raise NumbaemError(f"noise={noise!r} is not 'coloured' or 'white'")
    if int(background_degree) != background_degree or not 0 <= background_degree <= 6:
        raise NumbaemError(f"background degree {background_degree!r} must be a whole number in 0..6 (2 for most data)")
    if pixel_size is not None:
        pixel_size = positive_number("--pixel-size", pixel_size, 1.06, " (Angstrom per pixel)")
    shapes, raw_px, _ = _raw_headers(paths, pixel_size)
    n = len(paths)
    if ctf is not None and len(ctf) != n:
        raise NumbaemError(f"{len(ctf)} CTF(s) for {n} micrograph(s); give one CTF per micrograph")
    work_px, crop = raw_px, [s for s in shapes]
    if particle_diameter is not None:
        d = positive_number("--particle-diameter", particle_diameter, 250.0, " (Angstrom)")
        if raw_px is None:
            raise NumbaemError("--particle-diameter needs the micrographs' pixel size, which their headers do not give; "
                               "add --pixel-size ANGSTROM")
        target = d / L
        if target < raw_px * (1 - 1e-9):
            raise NumbaemError(f"--particle-diameter {d:g} A at --patch-size {L} asks for {target:.4g} A pixels, finer "
                               f"than the micrographs' {raw_px:g} A (numbaem only downsamples); give a diameter of at "
                               f"least {raw_px * L:.4g} A or a smaller --patch-size")
        crop = [working_shape(s, raw_px, target) for s in shapes]
        small = [(p, c) for p, c in zip(paths, crop) if min(c) < L]
        if small:
            raise NumbaemError(f"{small[0][0]} would be {small[0][1][0]} x {small[0][1][1]} pixels at {target:.4g} A, "
                               f"smaller than one {L} x {L} patch: --particle-diameter {d:g} A does not fit in it; "
                               "give the diameter of the particle's box (about 1.5 times the particle)")
        ratios = [s[a] / c[a] for s, c in zip(shapes, crop) for a in (0, 1)]
        work_px = raw_px * float(np.mean(ratios))
    if ctf is not None and work_px is None:
        raise NumbaemError("a CTF needs the micrographs' pixel size, which their headers do not give; "
                           "add --pixel-size ANGSTROM")
    resample = [tuple(c) != tuple(s) for c, s in zip(crop, shapes)]
    coloured = noise == "coloured"
    change = background or invert_contrast or any(resample) or coloured
    ctf_groups = _ctf_groups(ctf, work_px, defocus_tolerance, n)
    if not change:
        return Prepared(paths=paths, inputs=paths, L=L, pixel_size=work_px, raw_pixel_size=raw_px,
                        shapes=shapes, scale=np.ones(n), **_groups(ctf_groups, None, work_px, n),
                        contrast=None, work_dir=None)
    if work_dir is None or not os.path.isdir(work_dir):
        raise NumbaemError(f"the work directory {work_dir!r} does not exist; create it or give another")
    box_raw = max(1, int(round(L * (work_px / raw_px)))) if (raw_px and work_px) else L
    out_paths = [str(Path(work_dir) / f"{i:05d}_{Path(p).stem}.mrc") for i, p in enumerate(paths)]

    # pass 1: contrast, background, crop; the noise spectrum of each micrograph
    spectra, var = [], np.ones(n)
    for i, p in enumerate(paths):
        raw, _ = read_image(p, mmap=True)
        img = np.array(raw, dtype=np.float64)
        del raw
        if invert_contrast:
            np.negative(img, out=img)
        if background:
            img -= fit_background(img, background_degree, box_raw)
        if resample[i]:
            img = downsample_image(img, crop[i])
            img *= raw_px / work_px
        if background or coloured:
            prof = estimate_noise_spectrum(img, L, quantile, refinements if coloured else 0)
            spectra.append(prof)
            var[i] = mean_power(prof)
        write_image(out_paths[i], img, pixel_size=work_px, force=True)
        del img
        if progress is not None:
            progress(1)

    scale = np.ones(n)
    if background:
        sd = np.sqrt(var)
        scale = float(np.median(sd)) / sd
    groups_info = _groups(ctf_groups, None, work_px, n)
    groups = groups_info["groups"]
    group_spectra = None
    if coloured:
        gid = groups if groups is not None else np.zeros(n, np.int64)
        n_g = int(gid.max()) + 1
        group_spectra = []
        for g in range(n_g):
            members = np.nonzero(gid == g)[0]
            vals = np.mean([spectra[m].values * scale[m] ** 2 for m in members], axis=0)
            group_spectra.append(RadialProfile(spectra[members[0]].radius, vals))
        whiten = [whitening_filter(s) for s in group_spectra]
        groups_info = _groups(ctf_groups, whiten, work_px, n)
        groups = groups_info["groups"]

    # pass 2: common scale and whitening; the contrast check on what the EM will see
    means = []
    for i in range(n):
        needs = scale[i] != 1.0 or coloured
        if needs:
            img, _ = read_image(out_paths[i])
            img *= scale[i]
            if coloured:
                img = apply_radial_filter(img, groups_info["filters"][groups[i]].whitening)
            write_image(out_paths[i], img, pixel_size=work_px, force=True)
        else:
            img, _ = read_image(out_paths[i])
        bm = _block_means(img, L)
        spread = 1.4826 * float(np.median(np.abs(bm - np.median(bm)))) or float(np.std(bm)) or 1.0
        means.append(bm / spread)
        del img
        if progress is not None:
            progress(1)
    contrast = contrast_check(np.concatenate(means), -1 if ctf is not None else +1)
    if contrast["inverted"]:
        logger.warning("the particles look %s (patch-mean skewness %.2g, %.1f standard errors) where the model "
                       "expects them %s%s; the contrast is probably inverted: rerun %s --invert-contrast",
                       "dark" if contrast["z"] < 0 else "bright", contrast["skewness"], contrast["z"],
                       "dark" if ctf is not None else "bright",
                       " (with --ctf the raw micrographs' contrast, particles dark)" if ctf is not None else "",
                       "without" if invert_contrast else "with")
    logger.info("prepared %d micrograph(s) in %s: working pixel size %s, noise %s, %s", n, work_dir,
                f"{work_px:.4g} A" if work_px else "unknown", noise,
                f"{len(groups_info['filters'])} filter group(s)" if groups_info["filters"] else "no filter")
    return Prepared(paths=out_paths, inputs=paths, L=L, pixel_size=work_px, raw_pixel_size=raw_px, shapes=crop,
                    scale=scale, noise_variance=var if spectra else None, spectra=spectra or None,
                    group_spectra=group_spectra, contrast=contrast, work_dir=str(work_dir),
                    crop_gain=float(raw_px / work_px) if any(resample) else 1.0, **groups_info)


def _ctf_groups(ctf, work_px, tolerance, n):
    """``(groups, representatives)`` of the defocus groups, or None without a CTF."""
    if ctf is None:
        return None
    if tolerance is None:
        tolerance = default_defocus_tolerance(work_px, ctf[0].voltage)
    groups, reps = group_by_defocus(ctf, tolerance)
    logger.info("%d micrograph(s) in %d defocus group(s) (tolerance %.4g A)", n, len(reps), tolerance)
    return groups, reps


def _groups(ctf_groups, whiten, work_px, n):
    """Groups and filters: CTF groups (with their whitening), one whitening group, or none."""
    if ctf_groups is None and whiten is None:
        return dict(groups=None, filters=None)
    if ctf_groups is None:
        return dict(groups=np.zeros(n, np.int64), filters=[ImageFilter(work_px, None, whiten[0])])
    groups, reps = ctf_groups
    filters = [ImageFilter(work_px, rep, None if whiten is None else whiten[g]) for g, rep in enumerate(reps)]
    return dict(groups=groups, filters=filters)
