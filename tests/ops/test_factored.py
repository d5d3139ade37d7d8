"""Tests of loractl.ops.factored against dense float64 SVDs of the formed product."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from loractl.ops.factored import (
    RANK_RULE_RTOL,
    balanced_factors,
    choose_rank,
    effective_rank,
    energy_kept,
    factored_svd,
    truncate_factors,
)

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)


def factors(m: int, n: int, r: int, seed: int, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g, dtype=F64).to(dtype)
    A = torch.randn(r, n, generator=g, dtype=F64).to(dtype)
    return B, A


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


# --- factored_svd ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "n", "r", "s"),
    [(48, 80, 8, 0.5), (120, 30, 16, -2.0), (16, 16, 16, 1.0), (6, 40, 10, 3.0), (40, 5, 9, 1.5)],
)
def test_factored_svd_matches_dense_svd(m: int, n: int, r: int, s: float) -> None:
    B, A = factors(m, n, r, seed=m * n + r)
    U, S, Vh = factored_svd(B, A, s)
    dense = s * (B @ A)
    Ud, Sd, Vhd = torch.linalg.svd(dense, full_matrices=False)
    k = min(m, n, r)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert U.dtype == S.dtype == Vh.dtype == F64
    assert float((S - Sd[:k]).abs().max()) <= 1e-10 * float(Sd[0])
    assert bool((S[:-1] >= S[1:]).all()) and bool((S >= 0).all())
    assert rel(U @ torch.diag(S) @ Vh, dense) <= 1e-10
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=F64), atol=1e-12)
    assert torch.allclose(Vh @ Vh.T, torch.eye(k, dtype=F64), atol=1e-12)
    # Singular vectors equal the dense ones up to one sign per pair (random σ are distinct).
    signs = torch.sign(torch.diagonal(U.T @ Ud[:, :k]))
    assert float((U * signs - Ud[:, :k]).abs().max()) <= 1e-10
    assert float((signs[:, None] * Vh - Vhd[:k]).abs().max()) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_factored_svd_accepts_low_precision_and_returns_float64(dtype: torch.dtype) -> None:
    B, A = factors(20, 30, 4, seed=3, dtype=dtype)
    U, S, Vh = factored_svd(B, A, 0.25)
    assert U.dtype == S.dtype == Vh.dtype == F64
    U64, S64, Vh64 = factored_svd(B.to(F64), A.to(F64), 0.25)
    assert torch.equal(S, S64) and torch.equal(U, U64) and torch.equal(Vh, Vh64)


def test_factored_svd_never_forms_the_dense_product() -> None:
    # The dense 200000 x 200000 float64 product would need 320 GB.
    B, A = factors(200_000, 200_000, 3, seed=11)
    U, S, Vh = factored_svd(B, A, 2.0)
    assert U.shape == (200_000, 3) and Vh.shape == (3, 200_000)
    # Independent reference: Bᵀ B = L Lᵀ, so σ(s·B·A) = σ(s·Lᵀ·A), a 3 x 200000 matrix.
    L = torch.linalg.cholesky(B.T @ B)
    reference = torch.linalg.svdvals(2.0 * (L.T @ A))
    assert float((S - reference).abs().max()) <= 1e-10 * float(reference[0])


def test_factored_svd_of_a_large_module_is_fast() -> None:
    # ~0.03 s on one core (a dense float64 SVD of the same update takes ~40 s on two). One thread
    # and the best of five keep the measurement safe from other jobs on a shared machine.
    B, A = factors(3072, 12288, 64, seed=0, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            factored_svd(B, A, 0.5)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert best < 1.0, f"factored SVD of a 3072x12288 rank-64 module took {best:.3f} s"


def test_factored_svd_rejects_mismatched_factors() -> None:
    with pytest.raises(ValueError, match="inner dimensions"):
        factored_svd(torch.zeros(4, 3), torch.zeros(2, 5), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        factored_svd(torch.zeros(4, 3, 1, 1), torch.zeros(3, 5), 1.0)


# --- truncate_factors ------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(1, 10))
scales = st.floats(-4.0, 4.0, allow_nan=False).filter(lambda x: abs(x) > 1e-3)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), s=scales, extra=st.integers(0, 3))
def test_truncation_at_full_rank_is_the_identity(
    shape: tuple[int, int, int], seed: int, s: float, extra: int
) -> None:
    m, n, r = shape
    B, A = factors(m, n, r, seed)
    dense = s * (B @ A)
    B1, A1 = truncate_factors(B, A, s, r + extra)
    assert B1.shape == (m, r) and A1.shape == (r, n)
    assert rel(B1 @ A1, dense) <= 1e-12
    # The full numerical rank min(m, n, r) through the SVD path reproduces the update as well.
    k = min(m, n, r)
    B2, A2 = balanced_factors(*factored_svd(B, A, s), k)
    assert rel(B2 @ A2, dense) <= 1e-10
    if k < r:  # rank between the numerical rank and r goes through the SVD in truncate_factors
        B3, A3 = truncate_factors(B, A, s, k)
        assert B3.shape == (m, k) and rel(B3 @ A3, dense) <= 1e-10


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), s=scales, data=st.data())
def test_truncation_error_is_the_discarded_energy(
    shape: tuple[int, int, int], seed: int, s: float, data: st.DataObject
) -> None:
    m, n, r = shape
    rank = data.draw(st.integers(1, r))
    B, A = factors(m, n, r, seed)
    dense = s * (B @ A)
    B1, A1 = truncate_factors(B, A, s, rank)
    Sd = torch.linalg.svdvals(dense)
    error2 = float(torch.linalg.norm(dense - B1 @ A1) ** 2)
    discarded = float(Sd[rank:].square().sum()) if rank < r else 0.0
    assert abs(error2 - discarded) <= 1e-10 * float(Sd.square().sum())


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), s=scales, data=st.data())
def test_truncated_factors_are_balanced(
    shape: tuple[int, int, int], seed: int, s: float, data: st.DataObject
) -> None:
    m, n, r = shape
    assume(r >= 2)
    rank = data.draw(st.integers(1, r - 1))
    B, A = factors(m, n, r, seed)
    _, S, _ = factored_svd(B, A, s)
    B1, A1 = truncate_factors(B, A, s, rank)
    k = min(rank, S.shape[0])
    expected = torch.diag(S[:k])
    atol = 1e-10 * float(S[0])
    assert torch.allclose(B1.T @ B1, expected, atol=atol)
    assert torch.allclose(A1 @ A1.T, expected, atol=atol)


def test_truncate_factors_folds_the_scale_in_when_nothing_is_cut() -> None:
    B, A = factors(5, 7, 3, seed=1, dtype=torch.float32)
    B1, A1 = truncate_factors(B, A, 0.5, 3)
    assert torch.equal(B1, B.to(F64) * 0.5) and torch.equal(A1, A.to(F64))
    with pytest.raises(ValueError, match="rank"):
        truncate_factors(B, A, 1.0, 0)


# --- choose_rank -----------------------------------------------------------------------------

S321 = torch.tensor([3.0, 2.0, 1.0], dtype=F64)


def test_energy_boundary_counts_right() -> None:
    # Σσ² = 14; the first two values hold 13/14 exactly: k = 2 (sd-scripts would say 3).
    assert choose_rank(S321, energy=13 / 14) == 2
    assert choose_rank(S321, energy=13 / 14 + 1e-9) == 3
    assert choose_rank(S321, energy=9 / 14) == 1
    assert choose_rank(S321, energy=9 / 14 + 1e-9) == 2
    assert choose_rank(S321, energy=1.0) == 3
    assert choose_rank(S321, energy=0.0) == 1


def test_sv_fro_and_sv_cumulative_boundaries() -> None:
    assert choose_rank(S321, sv_fro=math.sqrt(13 / 14)) == 2
    assert choose_rank(S321, sv_fro=math.sqrt(13 / 14) + 1e-9) == 3
    assert choose_rank(S321, sv_cumulative=5 / 6) == 2
    assert choose_rank(S321, sv_cumulative=5 / 6 + 1e-9) == 3
    assert choose_rank(S321, sv_cumulative=0.5) == 1
    assert choose_rank(S321, sv_cumulative=0.5 + 1e-9) == 2


def test_sv_ratio_keeps_values_at_the_threshold() -> None:
    S = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert choose_rank(S, sv_ratio=2.0) == 2  # keeps 8 and 4 = 8 / 2
    assert choose_rank(S, sv_ratio=2.0 - 1e-6) == 1
    assert choose_rank(S, sv_ratio=4.0) == 3
    assert choose_rank(S, sv_ratio=8.0) == 4
    assert choose_rank(S, sv_ratio=0.5) == 1  # nothing reaches 16: still at least 1


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7, 0.9])
@pytest.mark.parametrize("length", [7, 10])
def test_round_off_at_the_boundary_is_tolerated(value: float, length: int) -> None:
    # Equal values: the first j hold exactly j/length of every measure, but the floating-point
    # cumulative fractions land just below j/length for many j (e.g. 0.3 x 10 at j = 8, 9, 10).
    S = torch.full((length,), value, dtype=F64)
    for j in range(1, length + 1):
        assert choose_rank(S, energy=j / length) == j
        assert choose_rank(S, sv_cumulative=j / length) == j
        assert choose_rank(S, sv_fro=math.sqrt(j / length)) == j


def test_rank_is_a_cap_or_a_fixed_rank() -> None:
    assert choose_rank(S321, rank=2) == 2
    assert choose_rank(S321, rank=7) == 3
    assert choose_rank(S321, energy=1.0, rank=2) == 2
    assert choose_rank(S321, energy=0.5, rank=2) == 1


def test_all_zero_singular_values_give_rank_one() -> None:
    zeros = torch.zeros(4)
    for rule in ({"energy": 0.9}, {"sv_ratio": 10.0}, {"sv_cumulative": 0.9}, {"sv_fro": 0.9}):
        assert choose_rank(zeros, **rule) == 1


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"energy": 0.5, "sv_fro": 0.5}, {"energy": 1.5}, {"sv_fro": -0.1}, {"sv_ratio": 0.0}, {"rank": 0}],
)
def test_choose_rank_rejects_bad_rules(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        choose_rank(S321, **kwargs)


def test_choose_rank_rejects_bad_singular_values() -> None:
    with pytest.raises(ValueError):
        choose_rank(torch.zeros(0), rank=1)
    with pytest.raises(ValueError):
        choose_rank(torch.tensor([1.0, -1.0]), energy=0.5)


descending = st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=12).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=F64)
)


def cumulative_fraction(S: torch.Tensor, k: int, power: int) -> float:
    return float(S[:k].pow(power).sum() / S.pow(power).sum())


@SETTINGS
@given(S=descending, target=st.floats(0.0, 1.0))
def test_dynamic_rules_return_the_smallest_rank_meeting_them(S: torch.Tensor, target: float) -> None:
    measures = {
        "energy": lambda k: cumulative_fraction(S, k, 2),
        "sv_cumulative": lambda k: cumulative_fraction(S, k, 1),
        "sv_fro": lambda k: math.sqrt(cumulative_fraction(S, k, 2)),
    }
    slack = 1.0 - RANK_RULE_RTOL
    for rule, measure in measures.items():
        k = choose_rank(S, **{rule: target})
        assert 1 <= k <= len(S)
        assert measure(k) >= target * slack, rule
        assert k == 1 or measure(k - 1) < target * slack, rule


@SETTINGS
@given(S=descending, ratio=st.floats(1.0, 1e4))
def test_sv_ratio_counts_the_values_above_the_floor(S: torch.Tensor, ratio: float) -> None:
    k = choose_rank(S, sv_ratio=ratio)
    floor = float(S[0]) / ratio * (1.0 - RANK_RULE_RTOL)
    assert all(float(x) >= floor for x in S[:k])
    assert all(float(x) < floor for x in S[k:])


# --- energy_kept and effective_rank -------------------------------------------------------------


def test_energy_kept() -> None:
    assert energy_kept(S321, 2) == pytest.approx(13 / 14, rel=1e-15)
    assert energy_kept(S321, 0) == 0.0
    assert energy_kept(S321, 3) == 1.0
    assert energy_kept(S321, 10) == 1.0
    assert energy_kept(torch.zeros(3), 1) == 1.0
    assert energy_kept(S321.to(torch.bfloat16), 1) == pytest.approx(9 / 14, rel=1e-15)


def test_effective_rank_known_values() -> None:
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0, rel=1e-12)
    assert effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0, rel=1e-12)
    p = torch.tensor([0.75, 0.25], dtype=F64)
    expected = math.exp(-float((p * p.log()).sum()))
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(expected, rel=1e-12)
    assert effective_rank(torch.zeros(4)) == 0.0


@SETTINGS
@given(S=descending)
def test_effective_rank_is_between_one_and_the_length(S: torch.Tensor) -> None:
    erank = effective_rank(S)
    assert 1.0 - 1e-12 <= erank <= len(S) * (1 + 1e-12)
    assert effective_rank(S * 7.5) == pytest.approx(erank, rel=1e-12)  # scale invariant
