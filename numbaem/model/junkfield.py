"""The junk class as a stationary Gaussian field (theory section 14.4).

A patch of the junk class holds a contaminant (an ice crystal, an aggregate, debris)
whose shape, size, position and brightness we do not model one by one: the whole patch,
noise included, is a zero-mean stationary Gaussian field whose covariance is circulant on
the ``L x L`` patch with eigenvalues ``lambda_s`` constant on the radial shells ``s`` of
the discrete frequencies (``s = round(|k|)``, ``k`` the integer frequency of
``numpy.fft.fft2``). For a real patch ``y`` with ``Y = fft2(y)``,

    log N(y; 0, C) = -1/2 sum_s [ p_s / lambda_s + n_s log(2 pi lambda_s) ],
    p_s = sum_{k in s} |Y_k|^2 / L^2,

``n_s`` the shell's number of frequencies (``sum_s p_s = ||y||^2``). Against the empty
patch (white noise, ``lambda_s = sigma^2``) its log-likelihood ratio is
:func:`log_ratio`; the M-step's ``lambda_s`` is the junk-weighted mean power per frequency
of the shell (:func:`update_spectrum`), an exact EM step.
"""
import functools

import numpy as np

#: No shell's variance falls below this fraction of sigma^2 (a shell no patch informs).
SPECTRUM_FLOOR = 1e-3


@functools.lru_cache(maxsize=16)
def shells(L):
    """Shell index ``s = round(|k|)`` (L, L) of each frequency of ``fft2`` on ``L x L``, and the counts ``n_s``."""
    k = np.fft.fftfreq(L) * L
    s = np.rint(np.hypot(k[:, None], k[None, :])).astype(np.int64)
    s.setflags(write=False)
    n = np.bincount(s.ravel()).astype(np.float64)
    n.setflags(write=False)
    return s, n


def shell_powers(patches):
    """``p_js = sum_{k in s} |fft2(y_j)_k|^2 / L^2`` (n, n_shells) for patches (n, L, L)."""
    patches = np.asarray(patches, dtype=np.float64)
    n, L, _ = patches.shape
    s, ns = shells(L)
    P = np.abs(np.fft.fft2(patches)) ** 2 / (L * L)
    return P.reshape(n, L * L) @ _indicator(L)


@functools.lru_cache(maxsize=16)
def _indicator(L):
    """(L^2, n_shells): 1 where a frequency lies in a shell."""
    s, ns = shells(L)
    M = np.zeros((L * L, len(ns)))
    M[np.arange(L * L), s.ravel()] = 1.0
    M.setflags(write=False)
    return M


def log_ratio(p, lam, sigma2, L):
    """``log N(y; 0, C_lambda) - log N(y; 0, sigma^2 I)`` per patch from its shell powers ``p`` (n, n_shells)."""
    _, ns = shells(L)
    lam = np.asarray(lam, dtype=np.float64)
    return 0.5 * (p @ (1.0 / sigma2 - 1.0 / lam) - float(ns @ np.log(lam / sigma2)))


def update_spectrum(power, mass, sigma2, L):
    """M-step: ``lambda_s = sum_j r_j p_js / (n_s sum_j r_j)`` from ``power = sum_j r_j p_j``
    and ``mass = sum_j r_j`` (``r_j`` the junk posteriors), at least ``SPECTRUM_FLOOR sigma^2``."""
    _, ns = shells(L)
    lam = np.asarray(power, dtype=np.float64) / (ns * mass)
    return np.maximum(lam, SPECTRUM_FLOOR * sigma2)


def start_spectrum(patches, sigma2, top=0.1):
    """A start for ``lambda``: the mean power per frequency of each shell over the fraction
    ``top`` of ``patches`` with most energy (where contaminants, brighter than particles,
    would be), at least ``sigma^2``."""
    p = shell_powers(patches)
    keep = np.argsort(p.sum(axis=1))[::-1][:max(1, int(round(top * len(p))))]
    _, ns = shells(np.asarray(patches).shape[1])
    return np.maximum(p[keep].mean(axis=0) / ns, sigma2)
