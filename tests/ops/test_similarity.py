"""Tests of loractl.ops.similarity: φ of Hu et al. 2021 Sec. 7.2 and the Sec. 7.3 amplification."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loractl.ops.similarity import amplification, similarity_grid, subspace_similarity

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=F64)


def phi_reference(x1: np.ndarray, x2: np.ndarray, i: int, j: int, factor: str) -> float:
    """φ straight from the formula with numpy: ‖U1ᵢᵀ U2ⱼ‖²_F / min(i, j)."""
    if factor == "A":  # right singular vectors of A [r, n]: the rows of Vh, as columns
        u1, u2 = np.linalg.svd(x1)[2].T, np.linalg.svd(x2)[2].T
    else:  # left singular vectors of B [m, r]
        u1, u2 = np.linalg.svd(x1)[0], np.linalg.svd(x2)[0]
    return float(np.linalg.norm(u1[:, :i].T @ u2[:, :j], "fro") ** 2) / min(i, j)


# --- φ properties ----------------------------------------------------------------------------


@SETTINGS
@given(r=st.integers(1, 8), extra=st.integers(0, 12), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_phi_of_a_factor_with_itself_is_one(r: int, extra: int, seed: int, data: st.DataObject) -> None:
    i = data.draw(st.integers(1, r))
    A = gaussian(r, r + extra, seed)
    assert subspace_similarity(A, A, i, i) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(A.T, A.T, i, i, factor="B") == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(r1=st.integers(1, 6), r2=st.integers(1, 6), n=st.integers(6, 20), seed=st.integers(0, 2**31 - 1))
def test_grid_matches_pointwise_phi_and_is_symmetric(r1: int, r2: int, n: int, seed: int) -> None:
    A1, A2 = gaussian(r1, n, seed), gaussian(r2, n, seed + 1)
    for factor, x1, x2 in (("A", A1, A2), ("B", A1.T, A2.T)):
        grid = similarity_grid(x1, x2, factor)
        assert grid.shape == (r1, r2) and grid.dtype == F64
        assert bool(((grid >= -1e-12) & (grid <= 1 + 1e-12)).all())
        assert torch.allclose(grid.T, similarity_grid(x2, x1, factor), atol=1e-12, rtol=0)
        for i in range(1, r1 + 1):
            for j in range(1, r2 + 1):
                assert subspace_similarity(x1, x2, i, j, factor) == pytest.approx(
                    float(grid[i - 1, j - 1]), abs=1e-12
                )


@pytest.mark.parametrize("factor", ["A", "B"])
def test_phi_of_random_subspaces_averages_max_i_j_over_n(factor: str) -> None:
    # For independent uniformly random subspaces of dimension i and j in R^n,
    # E‖U1ᵢᵀU2ⱼ‖²_F = i·j/n, so E φ = max(i, j)/n. Gaussian factors have uniformly random
    # singular subspaces. The tolerance is 6 standard errors of the mean over the draws.
    n, r1, r2, draws = 24, 6, 4, 600
    g = torch.Generator().manual_seed(1234)
    grids = []
    for _ in range(draws):
        A1 = torch.randn(r1, n, generator=g, dtype=F64)
        A2 = torch.randn(r2, n, generator=g, dtype=F64)
        grids.append(similarity_grid(A1, A2) if factor == "A" else similarity_grid(A1.T, A2.T, "B"))
    stacked = torch.stack(grids)
    mean, std = stacked.mean(0), stacked.std(0)
    i = torch.arange(1, r1 + 1, dtype=F64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=F64)[None, :]
    expected = torch.maximum(i, j) / n
    tolerance = 6 * std / math.sqrt(draws)
    assert bool(((mean - expected).abs() <= tolerance).all()), (mean - expected) / tolerance


def test_phi_rejects_bad_arguments() -> None:
    A1, A2 = gaussian(4, 10, 0), gaussian(3, 10, 1)
    with pytest.raises(ValueError):
        subspace_similarity(A1, A2, 0, 1)
    with pytest.raises(ValueError):
        subspace_similarity(A1, A2, 1, 4)
    with pytest.raises(ValueError, match="share"):
        subspace_similarity(A1, gaussian(3, 11, 2), 1, 1)
    with pytest.raises(ValueError, match="factor"):
        similarity_grid(A1, A2, factor="C")


# --- φ on adapters trained with PEFT ---------------------------------------------------------


def train_adapter(seed: int, r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train a rank-r LoRA on a fixed tiny MLP for a few steps; return {module: (B, A)}."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):  # leave the global RNG as other tests expect it
        torch.manual_seed(0)  # the same base model and data for both adapters
        base = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Tanh(), torch.nn.Linear(24, 16))
        x, y = torch.randn(64, 32), torch.randn(64, 16)
        torch.manual_seed(seed)  # the adapter's own initialisation
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    layers = {"0": model.base_model.model[0], "2": model.base_model.model[2]}
    return {
        name: (
            layer.lora_B["default"].weight.detach().clone(),
            layer.lora_A["default"].weight.detach().clone(),
        )
        for name, layer in layers.items()
    }


def test_phi_on_peft_trained_adapters_matches_the_dense_formula() -> None:
    first, second = train_adapter(seed=1, r=8), train_adapter(seed=2, r=4)
    for name in first:
        (B1, A1), (B2, A2) = first[name], second[name]
        assert float(B1.abs().max()) > 0 and float(B2.abs().max()) > 0  # the adapters trained
        for factor, x1, x2 in (("A", A1, A2), ("B", B1, B2)):
            grid = similarity_grid(x1, x2, factor)
            assert grid.shape == (8, 4)
            n1, n2 = x1.double().numpy(), x2.double().numpy()
            for i in range(1, 9):
                for j in range(1, 5):
                    expected = phi_reference(n1, n2, i, j, factor)
                    assert subspace_similarity(x1, x2, i, j, factor) == pytest.approx(expected, abs=1e-10)
                    assert float(grid[i - 1, j - 1]) == pytest.approx(expected, abs=1e-10)
            assert float(grid[-1, -1]) < 1 - 1e-3  # different seeds: not the same subspace


# --- amplification (Sec. 7.3) ----------------------------------------------------------------


def test_amplification_against_dense_computation() -> None:
    m, n, r = 30, 20, 3
    W = gaussian(m, n, 0).float()
    B, A = gaussian(m, r, 1), gaussian(r, n, 2)
    s = 0.75
    out = amplification(W, B, A, s)
    dense = s * (B @ A)
    Ud, _, Vhd = torch.linalg.svd(dense)
    W64 = W.double()
    proj = torch.linalg.matrix_norm(Ud[:, :r].T @ W64 @ Vhd[:r].T)
    Sw = torch.linalg.svdvals(W64)
    assert out["delta_norm"] == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-12)
    assert out["proj_delta"] == pytest.approx(float(proj), rel=1e-10)
    assert out["amplification"] == pytest.approx(out["delta_norm"] / out["proj_delta"], rel=1e-15)
    assert out["w_norm"] == pytest.approx(float(torch.linalg.matrix_norm(W64)), rel=1e-12)
    # W's own top-r subspaces capture its top-r singular values: ‖U_rᵀ W V_r‖_F = sqrt(Σ_{i≤r} σᵢ²).
    assert out["proj_top"] == pytest.approx(float(Sw[:r].square().sum().sqrt()), rel=1e-10)
    assert 0 < out["proj_random"] < out["proj_top"]
    assert set(out) == {"delta_norm", "proj_delta", "proj_top", "proj_random", "amplification", "w_norm"}


def test_amplification_orientation_and_random_pair() -> None:
    # ΔW built on W's own top singular pair projects W exactly like W's top subspaces do;
    # swapping U and V would not even fit the shapes of this non-square W.
    m, n, r = 25, 15, 2
    W = gaussian(m, n, 5)
    Uw, _, Vhw = torch.linalg.svd(W, full_matrices=False)
    out = amplification(W, Uw[:, :r] * 3.0, Vhw[:r], s=2.0)
    assert out["proj_delta"] == pytest.approx(out["proj_top"], rel=1e-10)
    one = amplification(W, Uw[:, :r], Vhw[:r], 1.0, r=1)
    assert one["proj_delta"] < out["proj_delta"]
    seeded = [amplification(W, Uw[:, :r], Vhw[:r], 1.0, generator=torch.Generator().manual_seed(7))]
    seeded.append(amplification(W, Uw[:, :r], Vhw[:r], 1.0, generator=torch.Generator().manual_seed(7)))
    other = amplification(W, Uw[:, :r], Vhw[:r], 1.0, generator=torch.Generator().manual_seed(8))
    assert seeded[0]["proj_random"] == seeded[1]["proj_random"] != other["proj_random"]
    with pytest.raises(ValueError):
        amplification(W.T, Uw[:, :r], Vhw[:r], 1.0)
    with pytest.raises(ValueError):
        amplification(W, Uw[:, :r], Vhw[:r], 1.0, r=3)
