"""The contrast transfer function and the patch model's filter ``Psi_g`` (theory section 11).

Convention (RELION's and CTFFIND's, as ``../shared/data/ctf_reference.json`` states it)::

    CTF(k) = -(sqrt(1 - Q^2) sin chi + Q cos chi),
    chi    = pi lambda df(theta) s^2 - (pi/2) Cs lambda^3 s^4 + phase_shift,
    df(theta) = (U + V)/2 + (U - V)/2 cos(2 (theta - theta_ast)),

with ``s = |k|`` in cycles per Angstrom, ``U, V`` the defocus (Angstrom, underfocus
positive), ``theta_ast`` the astigmatism angle, ``Cs`` in Angstrom, ``Q`` the amplitude
contrast and ``lambda`` the relativistic electron wavelength. ``CTF(0) = -Q``: in a raw
micrograph (underfocus) positive density is dark. That is CTFFIND's sign; RELION's
internal CTF is its negative and is applied to contrast-inverted particles.

Axes. ``theta`` is the angle of ``k`` from the micrograph's fast axis (MRC columns,
RELION's X) towards its slow axis (RELION's Y). numbaem holds a micrograph with the
fast axis on array axis 0 (``numbaem.data.io`` transposes what ``mrcfile`` returns), so
here ``theta = atan2(k1, k0)`` with ``k0`` the frequency along array axis 0.

The filter of the patch model. For a projection ``p`` (``L x L``) of a micrograph of
group ``g``::

    Psi_g p = crop_LxL( IDFT_P( t_g * DFT_P( pad_P p ) ) ),

``pad_P`` puts ``p`` in the top-left corner of a ``P x P`` array of zeros and ``crop_LxL``
keeps the top-left ``L x L``; ``t_g = c_g w_g`` is the group's CTF times its whitening
filter (:mod:`numbaem.model.noise`), sampled at the DFT frequencies of the ``P x P`` grid
at the working pixel size. This is the linear convolution of ``p`` with the filter's
point-spread function ``psf = IDFT_P(t_g)`` as long as the PSF does not wrap around the
``P``-periodic grid onto the box, so ``P`` (:func:`padded_size`) is odd (every frequency
has its mirror: a real even filter keeps images real, with no Nyquist bin to fold) and at
least ``max(8L + 1, L + 8 r + 1)``, ``r`` the PSF's radius in pixels (the largest
displacement ``|lambda df s - Cs lambda^3 s^3| / a`` of a wave packet below the
corner frequency ``s = sqrt(2) / (2a)``). theory section 11 asks for ``P >= 2L``; more
is better and costs nothing in the iterations (``Psi_g`` is built once, as a matrix):
the microscope filters the whole micrograph, and the ``P``-grid sampling of ``t_g``
approaches that filter like ``P^-2`` (at L = 11, 26 A/px, 2.5 um: 2.7e-3, 6.2e-4,
1.5e-4 relative in ``Psi`` at P = 23, 45, 89; ``tests/test_ctf.py``). What the filter moves out of the ``L x L``
box is dropped: the patch model keeps each particle inside its box (theory section 4),
and the part that leaves it is the model's error, small while ``r`` is a pixel or two.
Since ``psf`` is even, ``Psi_g`` is symmetric.

``Psi_g`` is held as the dense ``L^2 x L^2`` matrix ``Psi[q, r] = psf[(q - r) mod P]``
(pixels flattened ``p0 L + p1``): the E-step filters all ``K`` projections of a group
with one matrix product and the M-step forms ``Psi_g^T diag(h) Psi_g`` with BLAS.
"""
import dataclasses
import math

import numpy as np

from ..runtime.errors import NumbaemError
from ..runtime.validate import check_L, positive_number
from .noise import RadialProfile

#: h c in eV Angstrom and the electron rest energy m0 c^2 in eV (CODATA 2018).
_HC_EV_A = 12398.419843320026
_MC2_EV = 510998.95000

__all__ = ["CTFParams", "ImageFilter", "electron_wavelength", "evaluate_ctf", "ctf_on_grid",
           "padded_size", "filter_matrix", "filter_matrices", "apply_filter", "group_by_defocus",
           "DEFAULT_PHASE_TOLERANCE"]


def electron_wavelength(voltage_kv):
    """The relativistic electron wavelength in Angstrom at an accelerating voltage in kV.

    ``lambda = h c / sqrt(e V (2 m0 c^2 + e V))`` with CODATA constants: 0.0196876 A at
    300 kV; RELION's ``12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` is 6.4e-6
    relative. (ASPIRE's rounded constants ``12.2639 / sqrt(V + 0.97845e-6 V^2)`` are
    3.3e-5 lower; a CTF whose defocus was fitted with either differs from the other by a
    defocus error of that relative size, 0.8 A at 2.5 um.)
    """
    v = positive_number("voltage", voltage_kv, 300.0, " (kV)") * 1e3
    return _HC_EV_A / math.sqrt(v * (2.0 * _MC2_EV + v))


@dataclasses.dataclass(frozen=True)
class CTFParams:
    """One micrograph's CTF, in the units of a RELION 3.1 STAR file.

    Attributes
    ----------
    defocus_u, defocus_v : float
        Defocus in Angstrom along the astigmatism axes, underfocus positive.
    defocus_angle : float
        ``theta_ast`` in degrees, from the fast axis towards the slow axis.
    voltage : float
        Accelerating voltage in kV.
    cs : float
        Spherical aberration in mm.
    amplitude_contrast : float
        ``Q``, a fraction in [0, 1).
    phase_shift : float
        Additional phase in degrees (phase plates); 0 otherwise.
    wavelength : float or None
        Electron wavelength in Angstrom; None: :func:`electron_wavelength` of ``voltage``.
    """

    defocus_u: float
    defocus_v: float
    defocus_angle: float = 0.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    phase_shift: float = 0.0
    wavelength: float = None

    def __post_init__(self):
        for name in ("defocus_u", "defocus_v"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v) and v >= 0):
                raise NumbaemError(f"{name}={v!r} is not a finite defocus >= 0 in Angstrom (underfocus positive); "
                                   "check the micrograph's CTF estimate")
        for name in ("defocus_angle", "phase_shift", "cs"):
            v = getattr(self, name)
            if not math.isfinite(float(v)):
                raise NumbaemError(f"{name}={v!r} is not a finite number; check the CTF parameters")
        positive_number("voltage", self.voltage, 300.0, " (kV)")
        if self.cs < 0:
            raise NumbaemError(f"cs={self.cs!r} is negative; give the spherical aberration in mm (e.g. 2.7)")
        q = float(self.amplitude_contrast)
        if not (0.0 <= q < 1.0):
            raise NumbaemError(f"amplitude_contrast={self.amplitude_contrast!r} must lie in [0, 1); e.g. 0.1")
        if self.wavelength is not None:
            positive_number("wavelength", self.wavelength, 0.0197, " (Angstrom)")

    @property
    def lam(self):
        """Electron wavelength in Angstrom."""
        return float(self.wavelength) if self.wavelength is not None else electron_wavelength(self.voltage)

    @property
    def defocus_mean(self):
        return 0.5 * (self.defocus_u + self.defocus_v)

    def astigmatism_vector(self):
        """``((U - V)/2 cos 2 theta_ast, (U - V)/2 sin 2 theta_ast)``: the astigmatic part of ``df(theta)``."""
        a = math.radians(self.defocus_angle)
        h = 0.5 * (self.defocus_u - self.defocus_v)
        return h * math.cos(2 * a), h * math.sin(2 * a)


def evaluate_ctf(params, k0, k1):
    """The CTF at spatial frequencies ``(k0, k1)`` in cycles per Angstrom (module doc).

    Parameters
    ----------
    params : CTFParams
    k0, k1 : array_like, broadcastable
        Frequency along array axis 0 (the fast axis, RELION's X) and axis 1.

    Returns
    -------
    ndarray
        ``-(sqrt(1 - Q^2) sin chi + Q cos chi)``; ``-Q`` at ``k = 0``.
    """
    k0 = np.asarray(k0, dtype=np.float64)
    k1 = np.asarray(k1, dtype=np.float64)
    lam = params.lam
    s2 = k0 * k0 + k1 * k1
    theta = np.arctan2(k1, k0)
    a = math.radians(params.defocus_angle)
    df = 0.5 * (params.defocus_u + params.defocus_v) + 0.5 * (params.defocus_u - params.defocus_v) * \
        np.cos(2.0 * (theta - a))
    cs = params.cs * 1e7
    chi = math.pi * lam * df * s2 - 0.5 * math.pi * cs * lam ** 3 * s2 * s2 + math.radians(params.phase_shift)
    q = float(params.amplitude_contrast)
    return -(math.sqrt(1.0 - q * q) * np.sin(chi) + q * np.cos(chi))


def ctf_on_grid(params, shape, pixel_size):
    """The CTF on the DFT frequencies of an image (``numpy.fft.fftfreq`` layout per axis).

    Parameters
    ----------
    params : CTFParams
    shape : tuple of int
        ``(n0, n1)``.
    pixel_size : float
        Angstrom per pixel.

    Returns
    -------
    ndarray, shape (n0, n1)
    """
    a = positive_number("pixel_size", pixel_size, 1.06, " (Angstrom per pixel)")
    f0 = np.fft.fftfreq(int(shape[0]), d=a)[:, None]
    f1 = np.fft.fftfreq(int(shape[1]), d=a)[None, :]
    return evaluate_ctf(params, f0, f1)


@dataclasses.dataclass(frozen=True)
class ImageFilter:
    """The filter ``t_g = c_g w_g`` of a group at the working pixel size (module doc).

    Attributes
    ----------
    pixel_size : float
        Working pixel size in Angstrom (needed with a CTF).
    ctf : CTFParams or None
        The group's CTF (None: no CTF, ``c_g = 1``).
    whitening : RadialProfile or None
        ``w_g(|k|)``, ``|k|`` in cycles per pixel (None: no whitening, ``w_g = 1``).
    """

    pixel_size: float = None
    ctf: CTFParams = None
    whitening: RadialProfile = None

    def __post_init__(self):
        if self.ctf is not None and self.pixel_size is None:
            raise NumbaemError("a CTF needs the working pixel size; give the micrographs' pixel size "
                               "(--pixel-size, or in the MRC header)")

    def transfer(self, shape):
        """``t_g`` on the DFT frequencies of an image of ``shape`` (``fftfreq`` layout), real, even."""
        n0, n1 = int(shape[0]), int(shape[1])
        out = np.ones((n0, n1))
        if self.ctf is not None:
            out *= ctf_on_grid(self.ctf, (n0, n1), self.pixel_size)
        if self.whitening is not None:
            f0 = np.fft.fftfreq(n0)[:, None]
            f1 = np.fft.fftfreq(n1)[None, :]
            out *= self.whitening(np.hypot(f0, f1))
        return out

    def psf_radius(self):
        """``r`` of the module doc in pixels (0 without a CTF)."""
        if self.ctf is None:
            return 0.0
        c, a = self.ctf, self.pixel_size
        lam, cs = c.lam, c.cs * 1e7
        s = np.linspace(0.0, math.sqrt(2.0) / (2.0 * a), 257)
        df = max(c.defocus_u, c.defocus_v)
        return float(np.max(np.abs(lam * df * s - cs * lam ** 3 * s ** 3)) / a)


def padded_size(L, flt=None):
    """``P`` of the module doc: odd, at least ``max(8L + 1, L + 8 ceil(r) + 1)``."""
    L = check_L(L)
    r = 0.0 if flt is None else flt.psf_radius()
    P = max(8 * L + 1, L + 8 * int(math.ceil(r)) + 1)
    return P + 1 - P % 2


def filter_matrix(flt, L):
    """``Psi_g`` as a dense matrix (module doc).

    Parameters
    ----------
    flt : ImageFilter
    L : int

    Returns
    -------
    ndarray, shape (L^2, L^2)
        ``(Psi @ p.ravel()).reshape(L, L)`` is ``Psi_g p`` for an ``L x L`` image ``p``.
    """
    L = check_L(L)
    P = padded_size(L, flt)
    psf = np.fft.ifft2(flt.transfer((P, P)))
    if np.max(np.abs(psf.imag)) > 1e-12 * max(np.max(np.abs(psf.real)), 1e-300):
        raise RuntimeError("the filter's point-spread function is not real; this is a bug in numbaem.model.ctf")
    psf = psf.real
    i = np.arange(L)
    q0, q1 = np.meshgrid(i, i, indexing="ij")
    q0, q1 = q0.ravel(), q1.ravel()
    return np.ascontiguousarray(psf[(q0[:, None] - q0[None, :]) % P, (q1[:, None] - q1[None, :]) % P])


def filter_matrices(filters, L):
    """``Psi_g`` of every group, stacked: ndarray, shape (G, L^2, L^2)."""
    return np.stack([filter_matrix(f, L) for f in filters])


def apply_filter(psi, images):
    """``Psi p`` for a stack of images.

    Parameters
    ----------
    psi : ndarray, shape (L^2, L^2)
    images : ndarray, shape (n, L, L)

    Returns
    -------
    ndarray, shape (n, L, L)
    """
    images = np.asarray(images, dtype=np.float64)
    n, L, _ = images.shape
    return (images.reshape(n, L * L) @ psi.T).reshape(n, L, L)


#: Default grouping tolerance: the phase error ``pi lambda |d df| s^2`` at the working
#: Nyquist frequency ``s = 1/(2a)`` (the band limit of the volume, theory section 2) that two
#: micrographs of one group may differ by. Since ``|d CTF / d chi| <= 1``, the CTFs of a group
#: then differ by at most 0.1 (their range is [-1, 1]) at every frequency of the band. (A
#: bound on the phase alone, like pi/10, is loose where ``chi`` is small: at 26.6 A pixels
#: the CTF at the band edge is -0.29 at 1 um and -0.55 at 2.5 um, 0.33 rad apart.)
DEFAULT_PHASE_TOLERANCE = 0.1


def default_defocus_tolerance(pixel_size, voltage=300.0):
    """The defocus tolerance (Angstrom) of :data:`DEFAULT_PHASE_TOLERANCE`: ``4 a^2 0.1 / (pi lambda)``.

    4,580 A at 26.6 A pixels and 300 kV; 320 A at 7 A pixels.
    """
    a = positive_number("pixel_size", pixel_size, 1.06, " (Angstrom per pixel)")
    return 4.0 * a * a * DEFAULT_PHASE_TOLERANCE / (math.pi * electron_wavelength(voltage))


def group_by_defocus(params, tolerance):
    """Defocus groups: micrographs whose defocus functions differ by at most ``tolerance``.

    The distance of two CTFs is ``max_theta |df_1(theta) - df_2(theta)|``
    ``= |mean_1 - mean_2| + |ast_1 - ast_2|`` (``ast`` the vector of
    :meth:`CTFParams.astigmatism_vector`); micrographs with different voltage, Cs,
    amplitude contrast or phase shift never share a group. Greedy in order of mean
    defocus: a micrograph joins the current group if every member stays within
    ``tolerance`` of the group's representative, the CTF whose ``df(theta)`` is the mean
    of the members' (it is again of the form ``(U+V)/2 + (U-V)/2 cos 2(theta - theta_ast)``).

    Parameters
    ----------
    params : list of CTFParams
    tolerance : float
        Angstrom, >= 0 (0: one group per distinct CTF).

    Returns
    -------
    groups : ndarray of int, shape (n,)
        Group of each micrograph, numbered in order of first appearance in ``params``.
    representatives : list of CTFParams
        One per group.
    """
    tol = float(tolerance)
    if not (tol >= 0 and math.isfinite(tol)):
        raise NumbaemError(f"defocus tolerance {tolerance!r} must be a finite number >= 0 (Angstrom)")
    n = len(params)
    if n == 0:
        return np.zeros(0, np.int64), []
    key = [(round(p.voltage, 6), round(p.cs, 6), round(p.amplitude_contrast, 6), round(p.phase_shift, 6),
            round(p.lam, 12)) for p in params]
    coef = np.array([[p.defocus_mean, *p.astigmatism_vector()] for p in params])
    order = sorted(range(n), key=lambda i: (key[i], coef[i, 0], i))
    raw_groups, cur = [], []
    for i in order:
        if cur and key[cur[0]] == key[i]:
            trial = cur + [i]
            c = coef[trial].mean(axis=0)
            d = np.abs(coef[trial, 0] - c[0]) + np.hypot(coef[trial, 1] - c[1], coef[trial, 2] - c[2])
            if np.all(d <= tol * (1 + 1e-12)):
                cur = trial
                continue
        if cur:
            raw_groups.append(cur)
        cur = [i]
    raw_groups.append(cur)
    raw_groups.sort(key=min)
    groups = np.empty(n, np.int64)
    reps = []
    for g, members in enumerate(raw_groups):
        groups[members] = g
        c = coef[members].mean(axis=0)
        half = math.hypot(c[1], c[2])
        angle = 0.5 * math.degrees(math.atan2(c[2], c[1])) if half > 0 else 0.0
        p0 = params[members[0]]
        reps.append(dataclasses.replace(p0, defocus_u=c[0] + half, defocus_v=c[0] - half, defocus_angle=angle))
    return groups, reps
