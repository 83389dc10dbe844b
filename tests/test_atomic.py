"""Density maps from atomic models (gemmi) against an independent direct sum, and the shipped entries."""
import gemmi
import numpy as np
import pytest

from numbaem.runtime.errors import NumbaemError
from numbaem.sim.atomic import SHIPPED_MODELS, model_atoms, model_density, model_path, read_model

import naive


@pytest.fixture(scope="module")
def hivpr():
    return read_model("1hvr")


def test_shipped_models_are_installed_files():
    for name in SHIPPED_MODELS:
        p = model_path(name)
        assert p.is_file() and p.stat().st_size < 300_000
        assert read_model(name)[0].count_atom_sites() > 1000
    assert (model_path("1hvr").parent / "README.md").is_file()


def test_density_matches_the_direct_sum_of_atomic_gaussians(hivpr):
    """gemmi's calculator (fine grid, blur, crop, unblur) against the Fourier series of the
    atoms' Gaussians evaluated directly (tests/naive.py: gemmi's coefficient table only).
    Reached: 9e-7 relative at L = 11, 7 A (gemmi's cutoff and the fine grid's aliasing,
    below exp(-11) per atom before the unblur factor <= 3.4); asserted below 1e-5."""
    L, a = 11, 7.0
    vol = model_density(hivpr, L, a)
    at = model_atoms(hivpr)
    ref = naive.atomic_density(at["pos"], at["occ"], at["b_iso"], at["a"], at["b"], L, a)
    assert np.linalg.norm(vol - ref) / np.linalg.norm(ref) < 1e-5
    # the mean of the band-limited density is F(0) / V: the integral is sum occ f(0) exactly
    f0 = np.sum(at["occ"] * at["a"].sum(axis=1))
    assert vol.sum() * a ** 3 == pytest.approx(f0, rel=1e-5)


def test_density_is_centred_at_the_centre_of_mass(hivpr):
    """A translated model gives the same map (it is centred); the map's centroid is the box centre."""
    L, a = 11, 7.0
    moved = hivpr.clone()
    for cra in moved[0].all():
        cra.atom.pos = cra.atom.pos + gemmi.Position(13.3, -7.1, 2.9)
    v0, v1 = model_density(hivpr, L, a), model_density(moved, L, a)
    assert np.linalg.norm(v1 - v0) / np.linalg.norm(v0) < 1e-5
    pos = np.indices((L, L, L)) - L // 2                      # (3, L, L, L): voxel positions
    w = np.clip(v0, 0, None)
    centroid = np.sum(pos * w, axis=(1, 2, 3)) / w.sum()
    assert np.max(np.abs(centroid)) < 0.3      # pixels; mass and scattering weights differ a little


def test_unreadable_model_is_one_sentence(tmp_path):
    bad = tmp_path / "bad.cif"
    bad.write_text("this is not mmCIF\n")
    with pytest.raises(NumbaemError, match="gemmi cannot read the atomic model"):
        read_model(bad)
    with pytest.raises(NumbaemError, match="does not exist"):
        read_model(tmp_path / "missing.pdb")
    empty = tmp_path / "empty.pdb"
    empty.write_text("HEADER    NOTHING\nEND\n")
    with pytest.raises(NumbaemError, match="holds no atoms"):
        read_model(empty)
    with pytest.raises(NumbaemError, match="oversample=2 is even"):
        model_density("1hvr", 11, 7.0, oversample=2)


def test_shipped_models_are_package_data():
    """Every file beside the models is matched by pyproject's package-data, so an install has it
    (a wheel built from this tree was checked to hold them)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["numbaem.sim"]
    for f in (root / "numbaem" / "sim" / "models").iterdir():
        assert any(fnmatch.fnmatch(f"models/{f.name}", g) for g in globs), f.name
