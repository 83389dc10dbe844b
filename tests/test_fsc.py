"""FSC, resolution, relative error (theory section 9), and the numbaem fsc command."""
import json
import math

import numpy as np
import pytest

from numbaem.data.io import read_volume
from numbaem.runtime.errors import NumbaemError
from numbaem.analysis.fsc import fsc, relative_error, resolution, resolution_angstrom, shell_indices

# float64 FFTs of O(1) volumes at these sizes: round-off ~1e-15 relative per shell.
TOL = 1e-12


def _fsc_by_definition(v1, v2):
    """FSC straight from the DFT sum and loops over voxels (no fftshift, no bincount)."""
    L = v1.shape[0]
    R = L // 2
    t = np.arange(L) - R
    E = np.exp(-2j * np.pi * np.outer(t, t) / L)  # E[k, n]: frequency k - R, position n - R
    F1 = np.einsum("ai,bj,ck,ijk->abc", E, E, E, v1)
    F2 = np.einsum("ai,bj,ck,ijk->abc", E, E, E, v2)
    num = np.zeros(R + 1)
    e1 = np.zeros(R + 1)
    e2 = np.zeros(R + 1)
    for a in range(L):
        for b in range(L):
            for c in range(L):
                i = int(round(math.sqrt(t[a] ** 2 + t[b] ** 2 + t[c] ** 2)))
                if i <= R:
                    num[i] += (F1[a, b, c] * np.conj(F2[a, b, c])).real
                    e1[i] += abs(F1[a, b, c]) ** 2
                    e2[i] += abs(F2[a, b, c]) ** 2
    return num / np.sqrt(e1 * e2)


def test_shell_indices_counts():
    s = shell_indices(7)
    assert s.shape == (7, 7, 7)
    assert s[3, 3, 3] == 0
    counts = np.bincount(s.ravel())
    # shell 1: |n| in {1, sqrt2}: 6 + 12 voxels; shell 2: {sqrt3, 2, sqrt5, sqrt6}: 8 + 6 + 24 + 24.
    assert counts[0] == 1 and counts[1] == 18 and counts[2] == 62
    assert counts.sum() == 7 ** 3


def test_fsc_matches_definition(rng):
    for L in (5, 6):
        v1 = rng.standard_normal((L, L, L))
        v2 = v1 + rng.standard_normal((L, L, L))
        freq, curve = fsc(v1, v2)
        np.testing.assert_allclose(freq, np.arange(L // 2 + 1) / L)
        np.testing.assert_allclose(curve, _fsc_by_definition(v1, v2), atol=TOL)


def test_fsc_with_itself_and_scaled_copy_is_one(rng):
    v = rng.standard_normal((11, 11, 11))
    freq, curve = fsc(v, v)
    assert freq.shape == curve.shape == (6,)
    np.testing.assert_allclose(curve, 1.0, atol=TOL)
    np.testing.assert_allclose(fsc(v, 2.5 * v)[1], 1.0, atol=TOL)
    np.testing.assert_allclose(fsc(-v, v)[1], -1.0, atol=TOL)
    # scale invariance against a different volume too
    w = rng.standard_normal((11, 11, 11))
    np.testing.assert_allclose(fsc(v, 3.0 * w)[1], fsc(0.1 * v, w)[1], atol=TOL)


def test_fsc_of_independent_noise_is_near_zero(rng):
    # For independent white noise each shell's FSC has mean 0 and standard deviation
    # 1/sqrt(n_i) (n_i voxels; Hermitian symmetry pairs them, each pair contributes a
    # product of variance 2 over an energy of 2 n_i). Allow 4 standard deviations per shell.
    L = 31
    v1 = rng.standard_normal((L, L, L))
    v2 = rng.standard_normal((L, L, L))
    _, curve = fsc(v1, v2)
    n = np.bincount(shell_indices(L).ravel())[: L // 2 + 1]
    assert np.all(np.abs(curve[1:]) < 4 / np.sqrt(n[1:]))
    # and pooled over shells 1..R the normalised squares average to about 1
    chi = np.mean(n[1:] * curve[1:] ** 2)
    assert 0.4 < chi < 2.0


def test_fsc_zero_shells_are_nan(rng):
    v = rng.standard_normal((7, 7, 7))
    _, curve = fsc(v, np.zeros_like(v))
    assert np.all(np.isnan(curve))
    with pytest.raises(NumbaemError, match="NaN in every shell"):
        resolution(np.arange(4) / 7, curve)


def test_fsc_bad_input(rng):
    v = rng.standard_normal((7, 7, 7))
    with pytest.raises(NumbaemError, match="vol2 has shape"):
        fsc(v, v[:5, :5, :5])
    with pytest.raises(NumbaemError, match="vol1 has shape"):
        fsc(v[0], v)
    bad = v.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(NumbaemError, match="vol2 has NaN"):
        fsc(v, bad)
    with pytest.raises(NumbaemError, match="complex"):
        fsc(v + 0j, v)


def test_resolution_on_hand_made_curves():
    freq = np.arange(6) / 11
    # first crossing between shell 2 (0.7) and shell 3 (0.3): halfway
    assert resolution(freq, [1, 0.9, 0.7, 0.3, 0.2, 0.6]) == pytest.approx(2.5 / 11, abs=1e-15)
    # never below: the last shell
    assert resolution(freq, [1, 0.9, 0.8, 0.7, 0.6, 0.55]) == pytest.approx(5 / 11)
    # below at the first shell: its frequency
    assert resolution(freq, [0.2, 0.9, 0.8, 0.7, 0.6, 0.55]) == 0.0
    # exactly at the threshold is not below
    assert resolution(freq, [1, 0.5, 0.3, 0.3, 0.2, 0.1]) == pytest.approx(1 / 11)
    # another threshold
    assert resolution(freq, [1, 0.9, 0.7, 0.3, 0.2, 0.1], threshold=0.143) == pytest.approx(
        (4 + (0.2 - 0.143) / 0.1) / 11)
    # NaN shells carry no information and are skipped
    assert resolution(freq, [np.nan, 1, 0.8, np.nan, 0.2, 0.1]) == pytest.approx(3 / 11)
    with pytest.raises(NumbaemError, match="curve has shape"):
        resolution(freq, [1, 0.5])
    with pytest.raises(NumbaemError, match="threshold"):
        resolution(freq, np.ones(6), threshold="half")


def test_resolution_angstrom():
    assert resolution_angstrom(0.25, 2.0) == pytest.approx(8.0)
    assert resolution_angstrom(0.0, 2.0) == math.inf
    with pytest.raises(NumbaemError, match="pixel_size"):
        resolution_angstrom(0.25, 0.0)
    with pytest.raises(NumbaemError, match="freq_res"):
        resolution_angstrom(-0.1, 1.0)


def test_relative_error(rng):
    t = rng.standard_normal((7, 7, 7))
    assert relative_error(t, t) == 0.0
    assert relative_error(1.1 * t, t) == pytest.approx(0.1)
    assert relative_error(np.zeros_like(t), t) == pytest.approx(1.0)
    with pytest.raises(NumbaemError, match="truth is zero"):
        relative_error(t, np.zeros_like(t))
    with pytest.raises(NumbaemError, match="shape"):
        relative_error(t, t[0])


# --------------------------------------------------------------------------- numbaem fsc


def _run(argv, capsys):
    from numbaem.cli.main import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def maps(tmp_path, rng):
    """A synthetic molecule at L = 11 (header 2.5 A/pixel), and a copy point-reflected and
    rotated exactly in the comparison basis (same header)."""
    from numbaem.analysis.align import comparison_basis, reflect_coefficients, rotate_coefficients
    from numbaem.data.io import write_volume
    from numbaem.model.basis import expand, synthesize
    from numbaem.model.rotations import random_rotations
    from numbaem.runtime.fourier import downsample
    from numbaem.sim.molecule import synthetic_molecule

    vol = downsample(synthetic_molecule(41, rng=5), 11)
    basis = comparison_basis(11)
    copy = synthesize(rotate_coefficients(reflect_coefficients(expand(vol, basis), basis), basis,
                                          random_rotations(1, rng)[0]), basis)
    a, b = tmp_path / "a.mrc", tmp_path / "b.mrc"
    write_volume(a, vol, voxel_size=2.5)
    write_volume(b, copy, voxel_size=2.5)
    return a, b


def test_cli_fsc_align_compares_like_with_like(maps, tmp_path, capsys):
    # Defect 3 of issue 9: a map against itself, aligned, gave a relative error of 0.3-0.8.
    # The maps are float32 on disk, but the same file is read twice: round-off only (1e-11).
    a, b = maps
    code, out, err = _run(["fsc", str(a), str(a), "--align", "--json", "-q"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["aligned"] and not res["reflected"] and res["relative_error"] < 1e-11
    assert res["rotation_degrees"] < 1e-6
    np.testing.assert_allclose(res["fsc"], 1.0, atol=1e-12)  # the FSC of the same pair
    assert res["resolution_is_lower_bound"] and res["resolution_per_pixel"] == pytest.approx(5 / 11)
    assert res["band_limit_per_pixel"] == pytest.approx(5 / 11)
    assert res["resolution_angstrom"] == pytest.approx(2.5 * 11 / 5, rel=1e-6)  # header pixel size
    assert "Fourier-Bessel basis L=11, lmax=10" in res["compared"] and "|k| <= 0.5" in res["compared"]
    assert 0.9 < res["held_a"] == res["held_b"] <= 1.0
    assert res["pixel_size_source"] == "MRC header"
    # against its reflected, rotated copy: the rotation alone, exact in the basis (float32 files: 1e-6)
    code, out, err = _run(["fsc", str(a), str(b), "--align", "--json", "-q"], capsys)
    res = json.loads(out)
    assert res["reflected"] and res["relative_error"] < 1e-6 and res["correlation"] > 1 - 1e-10


def test_cli_fsc_text_plot_size_and_pixel_size(maps, tmp_path, capsys):
    a, b = maps
    plot = tmp_path / "fsc.png"
    code, out, err = _run(["fsc", str(a), str(b), "--align", "--plot", str(plot), "--pixel-size", "2.0", "-q"],
                          capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].endswith("11^3, 2 A/pixel (--pixel-size)")
    assert lines[1].startswith("aligned: A point-reflected and rotated by ")
    assert lines[2].startswith("compared: both maps expanded in the Fourier-Bessel basis") and "% of A's norm" in lines[2]
    assert lines[3].startswith("relative error ||A - B|| / ||B||: ")
    assert "not reached" in lines[4] and "band limit 0.4545 cycles/pixel (4.40 A)" in lines[4]
    import matplotlib.image
    assert matplotlib.image.imread(plot).shape[1] == 600
    # not aligned: the maps as given
    code, out, err = _run(["fsc", str(a), str(b), "--json", "-q"], capsys)
    res = json.loads(out)
    assert res["compared"] == "the maps as given, voxel by voxel" and "reflected" not in res
    va, _ = read_volume(a)
    vb, _ = read_volume(b)
    assert res["relative_error"] == pytest.approx(np.linalg.norm(va - vb) / np.linalg.norm(vb), rel=1e-12)
    # --size: both Fourier-cropped; the pixel size grows by 11/7
    code, out, err = _run(["fsc", str(a), str(a), "--size", "7", "--json", "-q"], capsys)
    res = json.loads(out)
    assert res["L"] == 7 and res["pixel_size"] == pytest.approx(2.5 * 11 / 7) and len(res["fsc"]) == 4


def test_cli_fsc_bad_input_one_sentence(maps, tmp_path, capsys):
    from numbaem.data.io import write_volume

    a, b = maps
    other = tmp_path / "other.mrc"
    write_volume(other, read_volume(a)[0], voxel_size=3.0)
    for argv, match in [([str(a), str(other)], "2.5 A/pixel but"),
                        ([str(a), str(b), "--size", "13"], "larger than the maps"),
                        ([str(a), str(b), "--size", "8"], "even"),
                        ([str(a), str(b), "--threshold", "2"], "not an FSC level"),
                        ([str(a), str(b), "--align", "--lmax", "11"], "lmax_search=11 is above")]:
        code, out, err = _run(["fsc", *argv], capsys)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 2 and "Traceback" not in err and len(lines) == 1 and match in lines[0], (argv, err)
    big = tmp_path / "big.mrc"
    write_volume(big, np.ones((27, 27, 27)))
    code, out, err = _run(["fsc", str(big), str(big), "--align"], capsys)
    assert code == 2 and "--size 25" in err
