"""Tests of loractl.ops.combine: exact cat, optimal svd, and PEFT's add_weighted_adapter parity.

The PEFT parity tests compare bit for bit (``torch.equal``): combine_peft replays PEFT's
operations in PEFT's order and dtypes, so nothing is left to tolerance.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import model as peft_lora_model

from loractl.ops.combine import PEFT_COMBINATION_TYPES, Module, combine_cat, combine_peft, combine_svd

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)


def dense_sum(modules: list[Module], m: int, n: int) -> torch.Tensor:
    total = torch.zeros(m, n, dtype=F64)
    for B, A, s, w in modules:
        total += w * s * (B.double() @ A.double())
    return total


@st.composite
def module_lists(draw: st.DrawFn) -> tuple[list[Module], int, int]:
    m, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # zero, or far enough from it that squared norms stay clear of float64's subnormal range
    coefficients = st.floats(-3.0, 3.0, allow_nan=False).filter(lambda c: c == 0 or abs(c) >= 1e-100)
    modules: list[Module] = []
    for _ in range(draw(st.integers(1, 3))):
        r = draw(st.integers(0, 5))  # 0: the adapter lacks this module
        B = torch.randn(m, r, generator=g, dtype=F64)
        A = torch.randn(r, n, generator=g, dtype=F64)
        modules.append((B, A, draw(coefficients), draw(coefficients)))
    return modules, m, n


def magnitude(modules: list[Module]) -> float:
    """A scale for absolute tolerances: Σ |w s| ‖B‖ ‖A‖ ≥ ‖Σ w s B A‖."""
    return sum(abs(w * s) * float(B.norm() * A.norm()) for B, A, s, w in modules) + 1e-300


# --- combine_cat / combine_svd ---------------------------------------------------------------


@SETTINGS
@given(case=module_lists())
def test_cat_equals_the_weighted_sum(case: tuple[list[Module], int, int]) -> None:
    modules, m, n = case
    B, A = combine_cat(modules)
    total_rank = sum(b.shape[1] for b, _, _, _ in modules)
    assert B.shape == (m, total_rank) and A.shape == (total_rank, n)
    assert B.dtype == A.dtype == F64
    assert torch.equal(A, torch.cat([a for _, a, _, _ in modules]))  # the weights go on B
    assert float((B @ A - dense_sum(modules, m, n)).abs().max()) <= 1e-12 * magnitude(modules)


@SETTINGS
@given(case=module_lists(), data=st.data())
def test_svd_is_the_optimal_truncation_of_the_sum(case: tuple[list[Module], int, int], data: Any) -> None:
    modules, m, n = case
    total_rank = sum(b.shape[1] for b, _, _, _ in modules)
    rank = data.draw(st.integers(1, max(1, total_rank + 1)))
    B, A = combine_svd(modules, rank)
    reference = dense_sum(modules, m, n)
    S = torch.linalg.svdvals(reference)
    error2 = float(torch.linalg.norm(reference - B @ A) ** 2)
    discarded = float(S[rank:].square().sum())
    assert abs(error2 - discarded) <= 1e-10 * magnitude(modules) ** 2
    expected_rank = min(rank, m, n) if rank < total_rank else total_rank
    assert B.shape == (m, expected_rank) and A.shape == (expected_rank, n)


@pytest.mark.parametrize(
    ("m", "n", "ranks", "rank"),
    [(6, 5, (4, 5), 3), (60, 50, (4, 3), 5)],  # dense SVD is cheaper / factored is cheaper
)
def test_svd_both_paths_match_the_dense_truncated_svd(
    m: int, n: int, ranks: tuple[int, ...], rank: int
) -> None:
    g = torch.Generator().manual_seed(m + n)
    modules: list[Module] = [
        (torch.randn(m, r, generator=g), torch.randn(r, n, generator=g), 0.5 + i, (-1.0) ** i)
        for i, r in enumerate(ranks)
    ]
    B, A = combine_svd(modules, rank)
    U, S, Vh = torch.linalg.svd(dense_sum(modules, m, n), full_matrices=False)
    best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
    assert B.shape == (m, rank) and A.shape == (rank, n)
    assert float(torch.linalg.norm(B @ A - best) / torch.linalg.norm(best)) <= 1e-10
    assert torch.allclose(B.T @ B, A @ A.T, atol=1e-10 * float(S[0]))  # balanced split


def test_svd_never_forms_the_dense_sum() -> None:
    # A dense 200000 x 200000 float64 sum would need 320 GB.
    g = torch.Generator().manual_seed(0)
    size = 200_000
    modules: list[Module] = [
        (torch.randn(size, 2, generator=g), torch.randn(2, size, generator=g), 1.0, 0.5),
        (torch.randn(size, 3, generator=g), torch.randn(3, size, generator=g), 2.0, -1.0),
        (torch.zeros(size, 0), torch.zeros(0, size), 1.0, 1.0),
    ]
    B, A = combine_svd(modules, 2)
    assert B.shape == (size, 2) and A.shape == (2, size)
    # Independent reference for the singular values of B_cat·A_cat through a Cholesky factor.
    B_cat, A_cat = combine_cat(modules)
    L = torch.linalg.cholesky(B_cat.T @ B_cat)
    S = torch.linalg.svdvals(L.T @ A_cat)
    assert torch.allclose(torch.diagonal(B.T @ B), S[:2], rtol=1e-10, atol=0)
    assert torch.allclose(torch.diagonal(A @ A.T), S[:2], rtol=1e-10, atol=0)


def test_zero_contributions_are_accepted() -> None:
    B, A = torch.randn(5, 2), torch.randn(2, 7)
    placeholder: Module = (torch.zeros(5, 0), torch.zeros(0, 7), 1.0, 1.0)
    zeros: Module = (torch.zeros(5, 3), torch.zeros(3, 7), 2.0, 1.0)
    expected = 0.5 * (B.double() @ A.double())
    for extra in (placeholder, zeros):
        Bc, Ac = combine_cat([(B, A, 0.5, 1.0), extra])
        assert torch.allclose(Bc @ Ac, expected, rtol=1e-12, atol=0)
        Bs, As = combine_svd([extra, (B, A, 0.5, 1.0)], 2)
        assert torch.allclose(Bs @ As, expected, rtol=1e-10, atol=1e-12)
    Bz, Az = combine_svd([zeros], 2)
    assert float((Bz @ Az).abs().max()) == 0.0
    with pytest.raises(ValueError):
        combine_cat([])
    with pytest.raises(ValueError, match="weight"):
        combine_cat([(B, A, 1.0, 1.0), (torch.zeros(4, 1), torch.zeros(1, 7), 1.0, 1.0)])


# --- combine_peft against PEFT's add_weighted_adapter ----------------------------------------

LAYERS = ("fc1", "fc2")
SEED = 1234


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 24)
        self.fc2 = torch.nn.Linear(24, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def build(configs: dict[str, LoraConfig], dtype: torch.dtype = torch.float32) -> Any:
    """A tiny MLP with the given adapters, whose factors are all filled with seeded noise."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        names = list(configs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(MLP(), configs[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.add_adapter(name, configs[name])
    model.to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g))
    return model


def modules_of(model: Any, layer_name: str, weights: dict[str, float]) -> list[Module]:
    """(B, A, s, w) per adapter, with a zero-rank placeholder where the adapter lacks the layer."""
    layer = getattr(model.base_model.model, layer_name)
    out: list[Module] = []
    for adapter, w in weights.items():
        if adapter in layer.lora_A:
            B, A = layer.lora_B[adapter].weight.data, layer.lora_A[adapter].weight.data
            out.append((B.clone(), A.clone(), layer.scaling[adapter], w))
        else:
            dtype = layer.weight.dtype
            empty_B = torch.zeros(layer.out_features, 0, dtype=dtype)
            out.append((empty_B, torch.zeros(0, layer.in_features, dtype=dtype), 1.0, w))
    return out


def peft_factors(model: Any, layer_name: str, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = getattr(model.base_model.model, layer_name)
    return layer.lora_B[adapter].weight.data, layer.lora_A[adapter].weight.data


def add_weighted(
    model: Any, weights: dict[str, float], name: str, combination_type: str, **kwargs: Any
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about density >= 1 and similar
        model.add_weighted_adapter(list(weights), list(weights.values()), name, combination_type, **kwargs)


@pytest.fixture
def seeded_dare(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Seed torch's global RNG right before PEFT's per-module DARE call, where combine_peft does."""

    def seeded(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
            torch.manual_seed(SEED)
            return function(*args, **kwargs)

        return wrapper

    for name in ("dare_linear", "dare_ties"):
        monkeypatch.setattr(peft_lora_model, name, seeded(getattr(peft_lora_model, name)))
    yield


# Adapter "two" has another rank and rsLoRA, and lacks fc2 (a zero-rank placeholder there).
SVD_CONFIGS = {
    "one": LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]),
    "two": LoraConfig(r=6, lora_alpha=3, use_rslora=True, target_modules=["fc1"]),
}
MAX_CONFIGURED_R = 6
SVD_CASES = [
    ("svd", {}),
    ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency", "svd_rank": 5}),
    ("dare-linear", {"density": 0.5}),
    ("dare-ties", {"density": 0.4}),
    ("dare-ties", {"density": 0.6, "majority_sign_method": "frequency", "svd_clamp": 0.95}),
    ("magnitude-prune", {"density": 0.5}),
    ("magnitude-prune", {"density": 1.0}),
]


@pytest.mark.usefixtures("seeded_dare")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("method", "kwargs"), SVD_CASES)
def test_svd_methods_match_peft_bit_for_bit(method: str, kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    model = build(SVD_CONFIGS, dtype)
    weights = {"one": 0.7, "two": -1.3}
    add_weighted(model, weights, "merged", PEFT_COMBINATION_TYPES[method], **kwargs)
    for layer in LAYERS:
        modules = modules_of(model, layer, weights)
        # PEFT's default rank is the largest configured r; fc1 has both adapters, so None finds it.
        default_rank = None if layer == "fc1" else MAX_CONFIGURED_R
        B, A = combine_peft(
            modules,
            method,
            density=kwargs.get("density"),
            majority_sign=kwargs.get("majority_sign_method", "total"),
            rank=kwargs.get("svd_rank", default_rank),
            generator_seed=SEED,
            clamp=kwargs.get("svd_clamp"),
        )
        peft_B, peft_A = peft_factors(model, layer, "merged")
        assert B.dtype == peft_B.dtype and A.dtype == peft_A.dtype
        assert torch.equal(B, peft_B), (method, layer)
        assert torch.equal(A, peft_A), (method, layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cat_matches_peft_bit_for_bit(dtype: torch.dtype) -> None:
    model = build(SVD_CONFIGS, dtype)
    weights = {"one": -0.4, "two": 1.1}
    add_weighted(model, weights, "merged", "cat")
    for layer in LAYERS:
        B, A = combine_peft(modules_of(model, layer, weights), "cat")
        peft_B, peft_A = peft_factors(model, layer, "merged")
        r = B.shape[1]
        assert torch.equal(B, peft_B[:, :r]) and torch.equal(A, peft_A[:r])
        assert not peft_B[:, r:].any() and not peft_A[r:].any()  # PEFT's zero padding
        # The same update as loractl's exact float64 cat.
        exact_B, exact_A = combine_cat(modules_of(model, layer, weights))
        exact = exact_B @ exact_A
        error = torch.linalg.norm(B.double() @ A.double() - exact) / torch.linalg.norm(exact)
        assert float(error) <= (1e-6 if dtype == torch.float32 else 1e-2)  # one rounding of w·s·A


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [{"one": 0.7, "two": -1.3}, {"one": -0.5, "two": 2.0}])
def test_linear_matches_peft_bit_for_bit(weights: dict[str, float], dtype: torch.dtype) -> None:
    model = build(
        {
            "one": LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]),
            "two": LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["fc1"]),
        },
        dtype,
    )
    add_weighted(model, weights, "merged", "linear")
    for layer in LAYERS:
        B, A = combine_peft(modules_of(model, layer, weights), "linear")
        peft_B, peft_A = peft_factors(model, layer, "merged")
        assert B.dtype == peft_B.dtype == dtype
        assert torch.equal(B, peft_B) and torch.equal(A, peft_A), layer


def test_linear_with_unequal_ranks_is_refused_like_peft() -> None:
    model = build(SVD_CONFIGS)
    weights = {"one": 1.0, "two": 1.0}
    with pytest.raises(ValueError):
        add_weighted(model, weights, "merged", "linear")
    with pytest.raises(ValueError, match="'cat'"):
        combine_peft(modules_of(model, "fc1", weights), "linear")


def test_a_single_adapter_is_always_linear_like_peft() -> None:
    model = build(SVD_CONFIGS)
    weights = {"two": -0.8}
    add_weighted(model, weights, "merged", "ties_svd", density=0.5)
    modules = modules_of(model, "fc1", weights)
    B, A = combine_peft(modules, "ties", density=0.5)
    peft_B, peft_A = peft_factors(model, "fc1", "merged")
    assert torch.equal(B, peft_B) and torch.equal(A, peft_A)
    linear_B, linear_A = combine_peft(modules, "linear")
    assert torch.equal(B, linear_B) and torch.equal(A, linear_A)


def test_dare_seed_is_used_and_the_global_rng_is_left_alone() -> None:
    model = build(SVD_CONFIGS)
    modules = modules_of(model, "fc1", {"one": 0.7, "two": -1.3})
    state = torch.get_rng_state()
    first = combine_peft(modules, "dare-linear", density=0.5, generator_seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    again = combine_peft(modules, "dare-linear", density=0.5, generator_seed=1)
    other = combine_peft(modules, "dare-linear", density=0.5, generator_seed=2)
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    torch.manual_seed(1)  # without a seed, the global RNG is used as it stands
    unseeded = combine_peft(modules, "dare-linear", density=0.5)
    assert torch.equal(first[0], unseeded[0])


def test_combine_peft_rejects_bad_arguments() -> None:
    model = build(SVD_CONFIGS)
    modules = modules_of(model, "fc1", {"one": 0.7, "two": -1.3})
    with pytest.raises(ValueError, match="unknown method"):
        combine_peft(modules, "ties_svd")
    with pytest.raises(ValueError, match="density"):
        combine_peft(modules, "ties")
    with pytest.raises(ValueError, match="majority_sign"):
        combine_peft(modules, "ties", density=0.5, majority_sign="mean")  # type: ignore[arg-type]
    placeholders = modules_of(model, "fc2", {"two": 1.0, "three": 1.0})
    with pytest.raises(ValueError, match="placeholder"):
        combine_peft(placeholders, "svd")


@pytest.mark.parametrize("method", ["ties", "dare-ties", "dare-linear", "magnitude-prune"])
def test_svd_methods_keep_no_more_components_than_the_update_has(method: str) -> None:
    """A module whose rank exceeds its update's size (a loralib MergedLinear of 8 slices of rank 8 on
    a 32x8 weight: rank 64) combined by an SVD method: the new factors agree in rank (at most 8) and
    give the dense SVD's best approximation; PEFT slices U and Vh to different ranks there and fails
    (fuzz seed 7 case 4058 was an exit 3)."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(32, 64, generator=g)
    a = torch.randn(64, 8, generator=g)
    nb, na = combine_peft([(b, a, 1.0, 1.0), (b, a, 1.0, 0.5)], method, density=1.0, rank=64, generator_seed=0)
    assert nb.shape == (32, 8) and na.shape == (8, 8)
    if method == "dare-linear":
        # density 1 keeps every element: the weighted sum (rank 8 at most) is reproduced
        want = (b @ a) * 1.5
        assert torch.allclose(nb @ na, want, rtol=1e-4, atol=1e-3)
