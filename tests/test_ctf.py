"""The CTF (theory section 11) against independent reference values, and the patch model's filter Psi."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from numbaem.model.ctf import (CTFParams, ImageFilter, apply_filter, ctf_on_grid, default_defocus_tolerance,
                               electron_wavelength, evaluate_ctf, filter_matrix, group_by_defocus, padded_size)
from numbaem.model.noise import RadialProfile
from numbaem.runtime.errors import NumbaemError

import naive

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ctf_reference.json"


def _reference():
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is not present (CI has it at ../shared/data)")
    return json.loads(REFERENCE.read_text())


def _params(s, wavelength):
    return CTFParams(defocus_u=s["defocus_u_A"], defocus_v=s["defocus_v_A"], defocus_angle=s["defocus_angle_deg"],
                     voltage=s["voltage_kV"], cs=s["cs_mm"], amplitude_contrast=s["amplitude_contrast"],
                     wavelength=wavelength)


def test_ctf_equals_reference_values():
    """The file's grids: values[i][j] at ky = f[i] (file rows, MRC y) and kx = f[j] (MRC x, the
    fast axis). numbaem's axis 0 is the fast axis, so k0 = kx. The file computes lambda with
    ASPIRE's constants (it records that lambda); the formula is what is under test here."""
    ref = _reference()
    worst = 0.0
    for s in ref["sets"]:
        p = _params(s, s["wavelength_A_aspire"])
        for g in s["grids"].values():
            f = np.array(g["freq_1_per_A"])
            got = evaluate_ctf(p, f[None, :], f[:, None])     # [i, j]: k0 = kx = f[j], k1 = ky = f[i]
            worst = max(worst, float(np.max(np.abs(got - np.array(g["values"])))))
        for pt in s["points"]:
            worst = max(worst, abs(float(evaluate_ctf(p, pt["kx"], pt["ky"])) - pt["ctf"]))
    assert worst < 1e-10, worst


def test_ctf_axis_convention_would_be_caught():
    """Measuring theta from the other axis fails the reference for the astigmatic sets."""
    ref = _reference()
    s = ref["sets"][1]
    p = _params(s, s["wavelength_A_aspire"])
    g = s["grids"]["16x16"]
    f = np.array(g["freq_1_per_A"])
    swapped = evaluate_ctf(p, f[:, None], f[None, :])
    assert np.max(np.abs(swapped - np.array(g["values"]))) > 0.1


def test_wavelength_matches_relion_and_aspire():
    ref = _reference()
    for s in ref["sets"]:
        lam = electron_wavelength(s["voltage_kV"])
        assert abs(lam / s["wavelength_A_relion"] - 1) < 1e-5   # RELION 12.2643247 is CODATA + 5e-6
        assert abs(lam / s["wavelength_A_aspire"] - 1) < 4e-5
    assert CTFParams(1e4, 1e4, voltage=300).lam == electron_wavelength(300)


def test_ctf_at_zero_and_sign():
    p = CTFParams(15000, 14000, 30, 300, 2.7, 0.07)
    assert evaluate_ctf(p, 0.0, 0.0) == pytest.approx(-0.07, abs=1e-15)
    # a phase shift of 90 degrees turns the zero-frequency value into -sqrt(1 - Q^2)
    q = CTFParams(15000, 14000, 30, 300, 2.7, 0.07, phase_shift=90.0)
    assert evaluate_ctf(q, 0.0, 0.0) == pytest.approx(-math.sqrt(1 - 0.07 ** 2), abs=1e-15)


def test_ctf_grid_layout():
    p = CTFParams(20000, 18000, 40, 300, 2.7, 0.1)
    g = ctf_on_grid(p, (9, 12), 3.0)
    f0, f1 = np.fft.fftfreq(9, 3.0), np.fft.fftfreq(12, 3.0)
    assert g[2, 5] == evaluate_ctf(p, f0[2], f1[5])


@pytest.mark.parametrize("L", [5, 7])
def test_filter_matrix_is_pad_filter_crop(rng, L):
    """Psi (the Toeplitz gather of the PSF) against the definition: pad to P x P, multiply the
    DFT by t on the P-grid frequencies, invert, crop (tests/naive.py, column by column)."""
    prof = RadialProfile(np.array([0.0, 0.2, 0.5, 0.8]), np.array([2.0, 1.0, 0.7, 0.6]))
    for flt in (ImageFilter(4.0, CTFParams(22000, 19000, 63, 300, 2.7, 0.1)),
                ImageFilter(4.0, CTFParams(9000, 9000, 0, 200, 2.0, 0.07), prof),
                ImageFilter(None, None, prof)):
        psi = filter_matrix(flt, L)
        ref = naive.filter_matrix(flt, L, padded_size(L, flt))
        np.testing.assert_allclose(psi, ref, rtol=0, atol=1e-14 * np.abs(ref).max())
        np.testing.assert_allclose(psi, psi.T, atol=1e-15)   # the PSF is even
        imgs = rng.standard_normal((3, L, L))
        np.testing.assert_allclose(apply_filter(psi, imgs),
                                   [naive.apply_filter(flt, im, padded_size(L, flt)) for im in imgs], atol=1e-13)


def test_identity_filter_is_identity():
    np.testing.assert_allclose(filter_matrix(ImageFilter(), 5), np.eye(25), atol=1e-15)


def test_padding_covers_the_psf():
    """P grows with the PSF's radius, and the filter is then within 3e-3 (relative, Frobenius)
    of the micrograph-size filter (the limit of large P; the error falls like P^-2: 4.8e-2 at
    P = 23 = 2L + 1 for this PSF of radius 8.7 px, 2.4e-3 at the chosen P = 89)."""
    L = 11
    assert padded_size(L) == 89
    wide = ImageFilter(8.0, CTFParams(40000, 40000, 0, 300, 2.7, 0.1))
    r = wide.psf_radius()
    P = padded_size(L, wide)
    assert P % 2 == 1 and P >= L + 8 * r + 1 and r > 6
    big = naive.filter_matrix(wide, L, 271)
    err = lambda m: np.linalg.norm(m - big) / np.linalg.norm(big)
    assert err(filter_matrix(wide, L)) < 3e-3
    assert err(naive.filter_matrix(wide, L, 2 * L + 1)) > 3e-2     # the minimal padding is visibly worse


def test_group_by_defocus():
    mk = lambda u, v=None, a=0.0, **kw: CTFParams(u, u if v is None else v, a, **kw)
    ps = [mk(10000), mk(10100), mk(20000), mk(10050), mk(20040, 19960, 45), mk(10000, cs=2.0)]
    g, reps = group_by_defocus(ps, 100.0)
    assert g.tolist() == [0, 0, 1, 0, 1, 2]
    assert reps[0].defocus_mean == pytest.approx(10050)
    # the representative of group 1: mean of df(theta) = 20000 + (40/2)... astigmatism halves
    assert reps[1].defocus_mean == pytest.approx(20000)
    assert reps[1].defocus_u - reps[1].defocus_v == pytest.approx(40.0)
    assert reps[1].defocus_angle == pytest.approx(45.0)
    # every member within the tolerance of its representative: max_theta |df_m - df_g|
    th = np.linspace(0, np.pi, 181)
    for p, gi in zip(ps, g):
        r = reps[gi]
        df = lambda c: c.defocus_mean + (c.defocus_u - c.defocus_v) / 2 * np.cos(2 * (th - np.radians(c.defocus_angle)))
        assert np.max(np.abs(df(p) - df(r))) <= 100.0 + 1e-9
    g0, _ = group_by_defocus(ps, 0.0)
    assert len(set(g0.tolist())) == 6
    assert len(set(group_by_defocus(ps[:5], 1e5)[0].tolist())) == 1


def test_default_tolerance_is_a_phase_bound():
    a = 5.0
    tol = default_defocus_tolerance(a, 300)
    lam = electron_wavelength(300)
    assert math.pi * lam * tol / (2 * a) ** 2 == pytest.approx(0.1)
    # so the CTFs of two micrographs that far apart differ by at most 0.1 inside the band
    s = np.linspace(0, 1 / (2 * a), 200)
    c1 = evaluate_ctf(CTFParams(1e4, 1e4), s, 0 * s)
    c2 = evaluate_ctf(CTFParams(1e4 + tol, 1e4 + tol), s, 0 * s)
    assert 0.05 < np.max(np.abs(c1 - c2)) <= 0.1 + 1e-12


@pytest.mark.parametrize("kw,match", [(dict(defocus_u=-1.0), "defocus_u"), (dict(defocus_v=float("nan")), "defocus_v"),
                                      (dict(amplitude_contrast=1.0), "amplitude_contrast"),
                                      (dict(voltage=0.0), "voltage")])
def test_bad_ctf_parameters(kw, match):
    args = dict(defocus_u=1e4, defocus_v=1e4)
    args.update(kw)
    with pytest.raises(NumbaemError, match=match):
        CTFParams(**args)
