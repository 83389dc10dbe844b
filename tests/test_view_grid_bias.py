"""examples/view_grid_bias.py: its EM over the cell weights and upsilon (volume fixed) against a
numerical maximiser of the same likelihood, and its first step against the M-step's update."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize

from numbaem.model import viewprior

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(ROOT / "examples"))       # it imports the example beside it
    try:
        spec = importlib.util.spec_from_file_location("view_grid_bias", ROOT / "examples" / "view_grid_bias.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return mod


def _case(rng, n=400, B=12):
    """Likelihoods by cell (n, B; a cell's: the sum over its rotations) and of the empty state
    (n,), and a grid with n_b rotations per cell: 60% of the patches hold a particle seen from
    a cell drawn with skewed probabilities (that cell's likelihood raised, the empty state's
    lowered), the rest are empty."""
    n_b = rng.integers(1, 6, B).astype(float)
    cells = rng.choice(B, n, p=np.arange(1, B + 1) / (B * (B + 1) / 2))
    full = rng.random(n) < 0.6
    lik_cell = rng.gamma(4.0, 0.25, (n, B)) * n_b
    lik_cell[full, cells[full]] += 20.0 * n_b[cells[full]]
    lik_empty = np.where(full, 0.2, 5.0) * rng.gamma(4.0, 0.25, n)
    return lik_cell, lik_empty, n_b


def _posteriors(example, lik_cell, lik_empty, n_b):
    u = example.UPSILON0
    mol = (1 - u) * lik_cell / n_b.sum()
    tot = u * lik_empty + mol.sum(axis=1)
    return mol / tot[:, None], u * lik_empty / tot


def test_weights_em_reaches_the_maximiser_of_the_likelihood(example, rng):
    """The EM's fixed point is the maximiser over (upsilon, the grid's cell masses pi) of
    sum_j log(upsilon e_j + (1 - upsilon) sum_b pi_b l_jb / n_b) (scipy on a softmax
    parametrisation): the same masses to 1e-4, a log-likelihood at least as high (to 1e-7)."""
    lik_cell, lik_empty, n_b = _case(rng)
    P, E = _posteriors(example, lik_cell, lik_empty, n_b)
    dists, u = example.weights_em(P, E, n_b, 3000)

    def nll(z):
        pi = np.exp(z[1:] - z[1:].max())
        pi /= pi.sum()
        uu = 1 / (1 + np.exp(-z[0]))
        return -np.sum(np.log(uu * lik_empty + (1 - uu) * (lik_cell / n_b) @ pi))

    z0 = np.concatenate([[0.0], np.zeros(len(n_b))])
    opt = optimize.minimize(nll, z0, method="BFGS", options=dict(gtol=1e-10, maxiter=20000))
    pi = np.exp(opt.x[1:] - opt.x[1:].max())
    pi /= pi.sum()
    # dists are the density's cell probabilities r_b / sum r (equal-area cells); the grid's mass
    # of cell b is n_b r_b / sum n r
    em_pi = n_b * dists[-1] / np.sum(n_b * dists[-1])
    em_z = np.concatenate([[np.log(u / (1 - u))], np.log(np.maximum(em_pi, 1e-300))])
    assert nll(em_z) <= opt.fun + 1e-7 * abs(opt.fun)
    np.testing.assert_allclose(em_pi, pi, atol=1e-4)
    assert u == pytest.approx(1 / (1 + np.exp(-opt.x[0])), abs=1e-4)


def test_first_step_is_the_m_step_update(example, rng):
    """One step from uniform is r_b = N_b / n_b normalised: viewprior.update_weights without a floor."""
    lik_cell, lik_empty, n_b = _case(rng)
    P, E = _posteriors(example, lik_cell, lik_empty, n_b)
    dists, _ = example.weights_em(P, E, n_b, 1)
    bins = np.repeat(np.arange(len(n_b)), n_b.astype(int))
    mass = np.concatenate([np.full(int(k), P[:, b].sum() / k) for b, k in enumerate(n_b)])
    q = viewprior.update_weights(np.ones(len(n_b)), bins, mass, floor=1e-15)
    np.testing.assert_allclose(dists[0], viewprior.distribution(q), rtol=1e-12)
