"""Centred discrete Fourier transforms, frequency grids and Fourier-crop downsampling.

Centring convention (theory section 2), used everywhere in numbaem
---------------------------------------------------------------------
On an axis of length ``L`` with ``R = L // 2``, sample index ``n`` sits at position
``n - R`` (pixels) and frequency index ``n`` at ``(n - R) / L`` (cycles per pixel),
for odd and even ``L`` alike. The centred DFT is::

    X = fftshift(fftn(ifftshift(x)))          # X[k] = sum_n x[n] e^{-2 pi i (k-R)(n-R)/L}
    x = fftshift(ifftn(ifftshift(X)))         # numpy's 1/L^d in the inverse

so the zero frequency and the origin both sit at index ``R``. For odd ``L`` the
frequencies are symmetric, ``-R .. R``; for even ``L`` they run ``-L/2 .. L/2 - 1``:
the Nyquist frequency ``-1/2`` has no positive twin.

These helpers use :mod:`numpy.fft`; they are not on a hot path (the plan-cached pyFFTW
transforms of the E-step live in ``numbaem.runtime.fft``).

Downsampling by Fourier cropping
--------------------------------
:func:`downsample` and :func:`downsample_image` keep the central frequencies of the
centred DFT and invert on the smaller grid, scaled by ``prod(M_i / N_i)`` so that
values are preserved (a constant stays the same constant, and a band-limited signal
sampled on the fine grid becomes the same signal sampled on the coarse grid). The
origin stays at index ``R`` of each axis, so the coarse pixel ``m`` sits at fine
position ``(m - R_M) N / M``. Per axis of length ``N`` cropped to ``M``:

- ``M`` odd: keep frequencies ``-(M-1)/2 .. (M-1)/2`` (index ``N//2 - M//2`` onwards);
  the Nyquist bin of an even ``N`` is dropped. Real input gives real output.
- ``M`` even and ``M < N``: keep ``-M/2 .. M/2 - 1`` and add the ``+M/2`` bin into the
  ``-M/2`` one (on the coarse grid the two are the same frequency). This is exact
  sampling of the trigonometric interpolant band-limited to ``|k| <= M/2`` and keeps
  real input real; keeping ``-M/2`` alone would not.
- ``M == N``: identity.
"""
import logging
import numbers

import numpy as np
import scipy.fft

from .errors import NumbaemError
from .validate import whole_number

logger = logging.getLogger(__name__)

__all__ = [
    "centered_fft",
    "centered_ifft",
    "frequency_grid",
    "downsample",
    "downsample_image",
]

# Relative size of the imaginary part above which a real-input crop is a bug.
_IMAG_TOL = 1e-8


def _normalize_axes(x, axes):
    """Return ``axes`` as a tuple of non-negative ints, validated against ``x``."""
    if axes is None:
        return tuple(range(x.ndim))
    if isinstance(axes, numbers.Integral):
        axes = (axes,)
    try:
        out = tuple(int(a) for a in axes)
    except (TypeError, ValueError):
        raise NumbaemError(
            f"axes={axes!r} is not a sequence of integers; pass e.g. axes=(0, 1)"
        ) from None
    for a in out:
        if not -x.ndim <= a < x.ndim:
            raise NumbaemError(
                f"axes={axes!r} names an axis outside an array of {x.ndim} dimensions; "
                f"use axes between {-x.ndim} and {x.ndim - 1}"
            )
    out = tuple(a % x.ndim for a in out)
    if len(set(out)) != len(out):
        raise NumbaemError(f"axes={axes!r} repeats an axis; name each axis once")
    return out


def _as_numeric(name, x):
    arr = np.asarray(x)
    if not (
        np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.timedelta64)
    ):
        raise NumbaemError(f"{name} has dtype {arr.dtype}; pass a numeric array")
    return arr


def centered_fft(x, axes=None):
    """Centred DFT, ``fftshift(fftn(ifftshift(x)))`` over ``axes``.

    Parameters
    ----------
    x : array_like
        The samples; index ``n`` of an axis of length ``L`` at position ``n - L//2``.
    axes : int or sequence of int, optional
        The axes to transform; all by default.

    Returns
    -------
    X : ndarray, complex
        The transform, frequency index ``k`` at ``(k - L//2) / L``.
    """
    x = _as_numeric("x", x)
    ax = _normalize_axes(x, axes)
    if not ax:
        return x.astype(np.result_type(x.dtype, np.complex64))
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=ax), axes=ax), axes=ax)


def centered_ifft(X, axes=None):
    """Inverse centred DFT, ``fftshift(ifftn(ifftshift(X)))`` over ``axes``.

    Parameters
    ----------
    X : array_like
        The centred transform.
    axes : int or sequence of int, optional
        The axes to transform; all by default.

    Returns
    -------
    x : ndarray, complex
        The samples, with numpy's ``1/L^d`` normalisation; take ``.real`` for a
        real signal.
    """
    X = _as_numeric("X", X)
    ax = _normalize_axes(X, axes)
    if not ax:
        return X.astype(np.result_type(X.dtype, np.complex64))
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(X, axes=ax), axes=ax), axes=ax)


def frequency_grid(L, ndim, sparse=False):
    """Frequencies of the centred DFT on an ``L``-per-side grid, per axis.

    Parameters
    ----------
    L : int
        Side of the grid (odd or even).
    ndim : int
        Number of dimensions.
    sparse : bool, optional
        If true, return open grids that broadcast (shape ``(L, 1, ..)``,
        ``(1, L, ..)``, ...) instead of full arrays.

    Returns
    -------
    k : tuple of ndarray
        ``ndim`` arrays, each of shape ``(L,) * ndim`` (or broadcastable, if
        ``sparse``); ``k[a][..., n, ...]`` (index ``n`` on axis ``a``) is
        ``(n - L//2) / L`` cycles per pixel.
    """
    L = whole_number("L", L)
    ndim = whole_number("ndim", ndim)
    k1 = (np.arange(L) - L // 2) / L
    return tuple(np.meshgrid(*([k1] * ndim), indexing="ij", sparse=bool(sparse)))


def _crop_axis(X, axis, M):
    """Crop the centred spectrum ``X`` on ``axis`` from ``N`` to ``M`` frequencies."""
    N = X.shape[axis]
    if M == N:
        return X
    c = N // 2
    index = [slice(None)] * X.ndim
    if M % 2 == 1:
        index[axis] = slice(c - M // 2, c + M // 2 + 1)
        return X[tuple(index)]
    # Even M < N: frequencies -M/2 .. M/2 exist in X; fold +M/2 onto -M/2.
    index[axis] = slice(c - M // 2, c + M // 2 + 1)
    Y = np.array(X[tuple(index)], copy=True)
    first = [slice(None)] * X.ndim
    last = [slice(None)] * X.ndim
    first[axis] = 0
    last[axis] = M
    Y[tuple(first)] += Y[tuple(last)]
    keep = [slice(None)] * X.ndim
    keep[axis] = slice(0, M)
    return Y[tuple(keep)]


def _fourier_crop(x, shape_new):
    """Fourier-crop real or complex ``x`` to ``shape_new`` on all axes, values preserved."""
    X = centered_fft(x)
    for axis, M in enumerate(shape_new):
        X = _crop_axis(X, axis, M)
    scale = float(np.prod(shape_new, dtype=np.float64) / np.prod(x.shape, dtype=np.float64))
    y = centered_ifft(X) * scale
    if np.iscomplexobj(x):
        return y
    imag = float(np.max(np.abs(y.imag)))
    ref = float(np.max(np.abs(x)))
    if imag > _IMAG_TOL * max(ref, np.finfo(np.float64).tiny):
        raise RuntimeError(
            f"Fourier crop of a real array left an imaginary part {imag:.3g} against "
            f"{ref:.3g}; this is a bug in numbaem.runtime.fourier"
        )
    return np.ascontiguousarray(y.real)


def downsample(x, L_new):
    """Downsample a square image or a cubic volume by Fourier cropping, values preserved.

    Parameters
    ----------
    x : ndarray, shape (n, n) or (n, n, n)
        The image or volume, real or complex; ``n`` odd or even.
    L_new : int
        The new side, ``1 <= L_new <= n``.

    Returns
    -------
    y : ndarray, shape (L_new, L_new) or (L_new, L_new, L_new)
        The central ``L_new`` frequencies per axis of the centred DFT of ``x``,
        inverted on the coarse grid and scaled by ``(L_new / n)^ndim``, so that the
        mean pixel value is preserved (see the module docstring for even sizes);
        float64 for real input, complex128 for complex input.

    Raises
    ------
    NumbaemError
        If ``x`` is not a square image or cubic volume, or ``L_new`` is not an
        integer in ``1 .. n``.
    """
    x = _as_numeric("x", x)
    if x.ndim not in (2, 3) or len(set(x.shape)) != 1 or x.size == 0:
        raise NumbaemError(
            f"x has shape {x.shape}; pass a square image (n, n) or a cubic volume "
            "(n, n, n), or use downsample_image for non-square images"
        )
    n = x.shape[0]
    L_new = whole_number("L_new", L_new)
    if L_new > n:
        raise NumbaemError(
            f"L_new={L_new} is larger than the input side {n}; Fourier cropping only "
            f"shrinks, pass L_new <= {n}"
        )
    if not np.all(np.isfinite(x)):
        raise NumbaemError("x holds NaN or inf; clean the input before downsampling")
    x = x.astype(np.complex128 if np.iscomplexobj(x) else np.float64, copy=False)
    return _fourier_crop(x, (L_new,) * x.ndim)


def _crop_real_image(img, shape_new, workers=None):
    """Fourier-crop a real micrograph to ``shape_new``, values preserved.

    The real-input path of :func:`downsample_image`: the same result as the generic
    :func:`_fourier_crop` (to round-off; the tests check it) at a fraction of the cost
    and memory for a large real image (3.6x faster on 6500^2): a
    real FFT along axis 1, the crop of axis 1, a complex FFT of the cropped array
    along axis 0, the crop of axis 0, and the inverses on the small grid, with
    ``scipy.fft`` threads. The centring (``ifftshift`` of the input) is applied as a
    phase ``e^{2 pi i k (N//2) / N}`` on the kept frequencies instead of a copy of
    the input; an even target size folds the ``+M/2`` bin onto ``-M/2`` as
    :mod:`numbaem.runtime.fourier` does (for real rows ``X[-M/2] + X[M/2] = 2 Re X[M/2]``).
    """
    N0, N1 = img.shape
    M0, M1 = shape_new
    if workers is None:
        from .threads import resolve_threads
        workers = resolve_threads()
    h1 = M1 // 2 + 1
    X = scipy.fft.rfft(img, axis=1, workers=workers)
    X = np.ascontiguousarray(X[:, :h1])
    X *= np.exp(2j * np.pi * np.arange(h1) * (N1 // 2) / N1)
    if M1 % 2 == 0 and M1 < N1:
        X[:, -1] = 2.0 * X[:, -1].real
    X = scipy.fft.fft(X, axis=0, workers=workers, overwrite_x=True)
    k0 = np.arange(N0)
    f0 = np.where(k0 < (N0 + 1) // 2, k0, k0 - N0)
    X *= np.exp(2j * np.pi * f0 * (N0 // 2) / N0)[:, None]
    if M0 < N0:
        Y = np.concatenate([X[:(M0 + 1) // 2], X[N0 - M0 // 2:]])
        if M0 % 2 == 0:
            Y[M0 // 2] += X[M0 // 2]
        X = Y
    X = scipy.fft.ifft(X, axis=0, workers=workers, overwrite_x=True)
    y = scipy.fft.irfft(X, n=M1, axis=1, workers=workers)
    y *= (M0 * M1) / (N0 * N1)
    return np.ascontiguousarray(np.roll(y, (M0 // 2, M1 // 2), axis=(0, 1)))


def downsample_image(img, shape_new):
    """Downsample a (possibly non-square) image by Fourier cropping, values preserved.

    Parameters
    ----------
    img : ndarray, shape (N0, N1)
        The image (a micrograph), real or complex.
    shape_new : tuple of int
        ``(M0, M1)`` with ``1 <= M0 <= N0`` and ``1 <= M1 <= N1``.

    Returns
    -------
    out : ndarray, shape (M0, M1)
        The central frequencies per axis of the centred DFT of ``img``, inverted on
        the coarse grid and scaled by ``M0 M1 / (N0 N1)``; float64 for real input.

    Raises
    ------
    NumbaemError
        If ``img`` is not 2-D or ``shape_new`` is not two integers within its shape.
    """
    img = _as_numeric("img", img)
    if img.ndim != 2 or img.size == 0:
        raise NumbaemError(f"img has shape {img.shape}; pass a non-empty 2-D image")
    try:
        shape_new = tuple(shape_new)
    except TypeError:
        shape_new = (shape_new,)
    if len(shape_new) != 2:
        raise NumbaemError(
            f"shape_new={shape_new!r} does not have two entries; pass (M0, M1)"
        )
    M = tuple(whole_number(f"shape_new[{i}]", m) for i, m in enumerate(shape_new))
    if M[0] > img.shape[0] or M[1] > img.shape[1]:
        raise NumbaemError(
            f"shape_new={M} is larger than the image shape {img.shape} on some axis; "
            f"Fourier cropping only shrinks, pass a shape no larger than {img.shape}"
        )
    if not np.all(np.isfinite(img)):
        raise NumbaemError("img holds NaN or inf; clean the input before downsampling")
    if np.iscomplexobj(img):
        return _fourier_crop(img.astype(np.complex128, copy=False), M)
    return _crop_real_image(img.astype(np.float64, copy=False), M)
