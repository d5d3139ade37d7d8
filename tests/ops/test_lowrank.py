"""Tests of loractl.ops.lowrank (the maths of `extract` and `truncate --budget`, issue #14).

Truths used: matrices built with known singular values (random orthonormal vectors from QR of
Gaussians, in float64), float64 SVDs (torch.linalg.svdvals / svd), PEFT's own bf16 merge of a
PEFT adapter, the dense-SVD rule of mergekit-extract-lora (tests/extract_oracle.py), and brute
force over all rank allocations.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, peft_merged, read_st, same_bits
from extract_oracle import LINEAR_SUFFIXES, make_tuned_pair, mergekit_rule, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from loractl.ops.factored import choose_rank, factored_svd
from loractl.ops.lowrank import (
    Candidate,
    allocate,
    low_rank,
    rounding_floor,
    spectrum_topk,
)

F64 = torch.float64
METHODS = ["exact", "randomized"]


def direct_rel_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    d = delta.double()
    return float(torch.linalg.matrix_norm(d - b.double() @ a.double()) / torch.linalg.matrix_norm(d))


def direct_energy(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    d = delta.double()
    return float(torch.linalg.matrix_norm(b.double() @ a.double()) ** 2 / torch.linalg.matrix_norm(d) ** 2)


def rank_r(m: int, n: int, r: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)).to(dtype)


class Spectra:
    """Matrices m×n = U·diag(s)·Vᵀ with the same random orthonormal U, V and chosen spectra s."""

    def __init__(self, m: int, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        p = min(m, n)
        self.u, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=F64))
        self.v, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=F64))
        self.i = torch.arange(p, dtype=F64)

    def matrix(self, s: torch.Tensor) -> torch.Tensor:
        return ((self.u * s) @ self.v.T).to(torch.float32)

    def spectrum(self, kind: str) -> torch.Tensor:
        i = self.i
        return {
            # a full fine-tune's flat spectrum: sigma_i ~ 1/(1 + i/200)^0.3
            "flat": 1 / (1 + i / 200) ** 0.3,
            # the oracle's "fullrank" kind: sigma_i ~ 1/(1 + i)^0.3
            "pow0.3": 1 / (1 + i) ** 0.3,
            "pow0.5": 1 / (1 + i) ** 0.5,
            "pow1": 1 / (1 + i),
            # the benchmark's shape: a rank-64 decaying update plus a small full-rank noise
            "rank64+noise": torch.where(i < 64, 1 / (1 + i) ** 0.5, torch.full_like(i, 0.02)),
        }[kind]


@pytest.fixture(scope="module")
def spectra() -> Spectra:
    return Spectra(1024, 2816)


def optimal(s: torch.Tensor, k: int) -> float:
    """Eckart–Young: the least relative Frobenius error of rank k."""
    return math.sqrt(float(s[k:].square().sum() / s.square().sum()))


# --- exact when it must be ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (300, 800)])
def test_exact_rank8_product_comes_back_to_float32_rounding(shape, method):
    m, n = shape
    d = rank_r(m, n, 8, seed=1)
    before = d.clone()
    r = low_rank(d, rank=8, method=method)
    assert r.method == method
    assert r.rank == 8 and r.b.shape == (m, 8) and r.a.shape == (8, n)
    assert r.b.dtype == r.a.dtype == torch.float32
    assert direct_rel_error(d, r.b, r.a) < 1e-6
    assert r.rel_error < 1e-6 and r.energy_kept == pytest.approx(1.0, abs=1e-6)
    assert same_bits(d, before), "the input was modified"
    # the chosen rank is never above the update's true rank, whatever is asked
    assert low_rank(d, rank=16, method=method).rank == 8
    for f in (0.999999, 1.0):
        assert low_rank(d, energy=f, method=method).rank == 8
    # sqrt(sigma) on each side, as balanced_factors splits them
    gram_b, gram_a = (r.b.double().T @ r.b.double()), (r.a.double() @ r.a.double().T)
    assert torch.allclose(gram_b, torch.diag(r.s[:8]), rtol=1e-5, atol=1e-5 * float(r.s[0]))
    assert torch.allclose(gram_a, torch.diag(r.s[:8]), rtol=1e-5, atol=1e-5 * float(r.s[0]))


@pytest.mark.parametrize("method", METHODS)
def test_energy_rule_is_the_smallest_rank_that_keeps_the_fraction(method):
    sp = Spectra(200, 700, seed=3)
    s = 1 / (1 + sp.i) ** 1.0
    d = sp.matrix(s)
    exact = torch.linalg.svdvals(d.double())
    for f in (0.3, 0.6, 0.9):
        r = low_rank(d, energy=f, method=method)
        k = choose_rank(exact, energy=f)
        assert r.energy_kept >= f * (1 - 1e-6)
        if method == "exact":
            assert r.rank == k
        else:  # Ritz values are lower bounds: never fewer ranks, at most a few more
            assert k <= r.rank <= k + 2
    assert low_rank(d, energy=0.95, max_rank=5, method=method).rank == 5


def _bf16_merge(tmp_path: Path):
    """A tiny bf16 Llama merged BY PEFT with a rank-8 PEFT adapter on every projection."""
    model = build_model("llama", dtype=torch.bfloat16, seed=0)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    adapter = make_adapter(
        model, tmp_path / "adapter", seed=1, r=8, lora_alpha=16, target_modules=list(LINEAR_SUFFIXES)
    )
    merged = peft_merged(base_dir, [adapter], torch.bfloat16, "llama").state_dict()
    base = read_st(base_dir)
    lora = read_st(adapter / "adapter_model.safetensors")
    scale = 16 / 8
    out = {}
    for key, tuned in merged.items():
        name = key.removesuffix(".weight")
        lora_a = lora.get(f"base_model.model.{name}.lora_A.weight")
        if lora_a is None:
            continue
        lora_b = lora[f"base_model.model.{name}.lora_B.weight"]
        assert tuned.dtype == torch.bfloat16
        update = scale * lora_b.double() @ lora_a.double()  # the adapter's s·B·A, exactly
        out[name] = (base[key], tuned, update)
    assert len(out) == 14
    return out


def test_bf16_model_merged_by_peft_gives_back_the_adapter(tmp_path):
    for name, (base_w, tuned, update) in _bf16_merge(tmp_path).items():
        delta = tuned.float() - base_w.float()  # exact: a difference of two bf16 numbers
        rounding = delta.double() - update  # what the merge's rounding to bf16 added
        floor = rounding_floor(tuned)
        r = low_rank(delta, rank=8, noise_floor=floor)
        assert r.rank == 8 and r.numerical_rank == 8, name
        # Eckart–Young + triangle inequality: the best rank-8 approximation of update + rounding is
        # within 2·‖rounding‖ of the update (the update is one rank-8 candidate)
        err = float(torch.linalg.matrix_norm(r.b.double() @ r.a.double() - update))
        assert err <= 2 * float(torch.linalg.matrix_norm(rounding)), name
        # and it is the float64 truncated SVD of the difference, to float32 rounding
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        best = (u[:, :8] * s[:8]) @ vh[:8]
        assert float(torch.linalg.matrix_norm(r.b.double() @ r.a.double() - best)) <= 1e-6 * float(s[0])
        # rules that would keep the rounding noise never go above the adapter's rank
        for kw in ({"energy": 0.999999}, {"energy": 1.0}, {"rank": 16}):
            assert low_rank(delta, noise_floor=floor, **kw).rank == 8, (name, kw)
        # the floor is what stops them: the rounding noise is far above float32's own resolution
        assert low_rank(delta, energy=0.999999).rank > 8, name
        assert float(torch.linalg.matrix_norm(rounding, ord=2)) < floor < float(s[7]), name


def test_update_below_the_floor_gives_rank_zero():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 96, generator=g) * 0.5).to(torch.bfloat16)
    tiny = rank_r(64, 96, 4, seed=2, dtype=F64) * 1e-5  # far below half a bf16 ulp of w
    tuned = (w.double() + tiny).to(torch.bfloat16)
    delta = tuned.float() - w.float()
    assert delta.abs().max() > 0  # a few entries crossed a rounding boundary
    r = low_rank(delta, rank=4, noise_floor=rounding_floor(tuned))
    assert r.rank == 0 and r.b.shape == (64, 0) and r.a.shape == (0, 96)
    assert r.rel_error == 1.0 and r.energy_kept == 0.0


def test_zero_update():
    r = low_rank(torch.zeros(40, 30), rank=4)
    assert (r.rank, r.rel_error, r.energy_kept, r.norm) == (0, 0.0, 1.0, 0.0)
    assert r.b.shape == (40, 0) and r.a.shape == (0, 30)
    assert spectrum_topk(torch.zeros(40, 30), 4).s.numel() == 0


# --- the certificate ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["flat", "pow1", "rank8", "rank8+noise", "bf16", "fp16", "fp64", "tall"])
def test_certificate_is_the_true_error_of_the_returned_factors(case, method):
    g = torch.Generator().manual_seed(7)
    sp = Spectra(300, 800, seed=5)
    d = {
        "flat": lambda: sp.matrix(sp.spectrum("flat")),
        "pow1": lambda: sp.matrix(sp.spectrum("pow1")),
        "rank8": lambda: rank_r(300, 800, 8, seed=5),
        "rank8+noise": lambda: rank_r(300, 800, 8, seed=5) + 1e-4 * torch.randn(300, 800, generator=g),
        "bf16": lambda: sp.matrix(sp.spectrum("pow0.5")).to(torch.bfloat16),
        "fp16": lambda: sp.matrix(sp.spectrum("pow0.5")).to(torch.float16),
        "fp64": lambda: sp.matrix(sp.spectrum("pow0.5")).double() + 1e-9,
        "tall": lambda: sp.matrix(sp.spectrum("pow0.3")).T.contiguous(),
    }[case]()
    for k in (1, 8, 40):
        r = low_rank(d, rank=k, method=method)
        assert r.method == method
        truth = direct_rel_error(d, r.b, r.a)
        assert r.rel_error == pytest.approx(truth, rel=1e-6, abs=1e-12), (case, k)
        assert r.energy_kept == pytest.approx(direct_energy(d, r.b, r.a), rel=1e-6), (case, k)
        assert r.norm == pytest.approx(float(torch.linalg.matrix_norm(d.double())), rel=1e-6)


# --- fast when it can be: within 1% of the optimum -----------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "pow0.3", "pow0.5", "pow1", "rank64+noise"])
def test_randomized_is_within_one_percent_of_the_optimum(spectra, kind):
    s = spectra.spectrum(kind)
    d = spectra.matrix(s)
    for k in (16, 64):
        r = low_rank(d, rank=k)
        assert r.method == "randomized" and r.rank == k
        opt = optimal(s, k)  # s is the float64 matrix's exact spectrum; d is its float32 rounding
        assert r.rel_error <= 1.01 * opt, (kind, k, r.rel_error / opt)
        assert r.rel_error >= opt - 1e-6, (kind, k)  # sanity: nothing beats Eckart–Young
        assert torch.all(r.s[:k] <= s[:k] * (1 + 1e-5))  # Ritz values are lower bounds


def test_randomized_on_marchenko_pastur_noise_against_a_float64_svd():
    g = torch.Generator().manual_seed(11)
    d = torch.randn(512, 1408, generator=g)  # pure noise: the flattest spectrum there is
    s = torch.linalg.svdvals(d.double())
    for k in (16, 64):
        r = low_rank(d, rank=k, method="randomized")
        assert optimal(s, k) - 1e-6 <= r.rel_error <= 1.01 * optimal(s, k)


def test_exact_method_is_the_truncated_svd():
    sp = Spectra(120, 90, seed=2)
    s = sp.spectrum("pow0.5")
    d = sp.matrix(s)
    r = low_rank(d, rank=10, method="exact")
    assert torch.allclose(r.s, s, rtol=1e-5, atol=1e-6)
    assert r.rel_error == pytest.approx(optimal(s, 10), rel=1e-5)
    u, sv, vh = torch.linalg.svd(d.double(), full_matrices=False)
    best = (u[:, :10] * sv[:10]) @ vh[:10]
    assert torch.allclose(r.b.double() @ r.a.double(), best, atol=1e-5)


def test_auto_picks_exact_for_small_or_high_rank_and_randomized_otherwise():
    small = Spectra(40, 64).matrix(torch.ones(40))
    assert low_rank(small, rank=4).method == "exact"
    sp = Spectra(704, 256)
    d = sp.matrix(sp.spectrum("pow1"))
    assert low_rank(d, rank=16).method == "randomized"  # a sketch of 16 + 16 columns < 256 / 4
    assert low_rank(d, rank=50).method == "exact"  # 50 + 25 >= 256 / 4: the Gram matrix is cheaper
    assert low_rank(d, energy=0.5).method == "randomized"  # found within the first sketch
    assert low_rank(d, energy=0.999).method == "exact"  # needs a sketch too wide


def test_seed_makes_it_deterministic():
    d = Spectra(300, 500).matrix(1 / (1 + torch.arange(300, dtype=F64)) ** 0.5)
    r1, r2 = low_rank(d, rank=8, method="randomized"), low_rank(d, rank=8, method="randomized")
    assert same_bits(r1.b, r2.b) and same_bits(r1.a, r2.a)
    r3 = low_rank(d, rank=8, method="randomized", seed=1)
    assert r3.rel_error == pytest.approx(r1.rel_error, rel=1e-3)


# --- against mergekit's rule (tests/extract_oracle.py) -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["lowrank", "fullrank"])
def test_no_worse_than_mergekit_rule_on_every_module(tmp_path, kind, dtype):
    pair = make_tuned_pair(tmp_path, kind, rank=8, noise=1e-3 if kind == "lowrank" else 0.0, dtype=dtype)
    base, tuned = read_st(pair.base_dir), read_st(pair.tuned_dir)
    for key, exact in pair.linear_deltas().items():
        b_w, t_w = base[key], tuned[key]
        r = low_rank(t_w.float() - b_w.float(), rank=8, noise_floor=rounding_floor(t_w))
        assert r.rank == 8, key
        ours = relative_error(exact, r.a, r.b)
        mk_a, mk_b = mergekit_rule(b_w, t_w, 8)
        theirs = relative_error(exact, mk_a, mk_b)
        assert ours <= theirs * (1 + 1e-5) + 1e-7, (key, ours, theirs)


# --- spectrum_topk --------------------------------------------------------------------------------


def test_spectrum_topk_exact_and_randomized(spectra):
    s = spectra.spectrum("pow0.5")
    d = spectra.matrix(s)
    sp = spectrum_topk(d, 20)
    assert sp.method == "randomized" and sp.s.shape == (20,)
    assert sp.total == pytest.approx(float(s.square().sum()), rel=1e-6)
    assert torch.all(sp.s <= s[:20] * (1 + 1e-5))  # lower bounds, tight at the top, looser near k
    assert torch.allclose(sp.s[:10], s[:10], rtol=1e-3) and torch.allclose(sp.s, s[:20], rtol=1e-2)
    small = Spectra(50, 80).matrix(1 / (1 + torch.arange(50, dtype=F64)))
    ex = spectrum_topk(small, 10)
    assert ex.method == "exact"
    assert torch.allclose(ex.s, torch.linalg.svdvals(small.double())[:10], rtol=1e-5)
    assert spectrum_topk(rank_r(50, 80, 3, seed=0), 10).s.shape == (3,)  # only what is above the floor


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "kw", "exc", "msg"),
    [
        (torch.zeros(3), {"rank": 1}, ValueError, "2-D"),
        (torch.zeros(3, 4, dtype=torch.int32), {"rank": 1}, TypeError, "floating point"),
        (torch.tensor([[1.0, float("nan")]]), {"rank": 1}, ValueError, "non-finite"),
        (torch.tensor([[1.0, float("inf")]]), {"rank": 1}, ValueError, "non-finite"),
        (torch.ones(3, 4), {}, ValueError, "exactly one of rank and energy"),
        (torch.ones(3, 4), {"rank": 1, "energy": 0.5}, ValueError, "exactly one of rank and energy"),
        (torch.ones(3, 4), {"rank": 0}, ValueError, "rank must be >= 1"),
        (torch.ones(3, 4), {"energy": 1.5}, ValueError, r"energy must be in \[0, 1\]"),
        (torch.ones(3, 4), {"rank": 1, "max_rank": 0}, ValueError, "max_rank"),
        (torch.ones(3, 4), {"rank": 1, "noise_floor": -1.0}, ValueError, "noise_floor"),
        (torch.ones(3, 4), {"rank": 1, "method": "svd"}, ValueError, "method"),
    ],
)
def test_bad_input_is_refused(delta, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        low_rank(delta, **kw)


def test_rounding_floor_bounds_the_noise_of_a_rounding():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for m, n in ((16, 32), (48, 32), (300, 700)):
            exact = torch.randn(m, n, generator=g, dtype=F64) * 0.02
            exact[:, :3] *= 30  # outlier columns (their ulps are larger)
            stored = exact.to(dtype)
            noise = float(torch.linalg.matrix_norm(stored.double() - exact, ord=2))
            floor = rounding_floor(stored)
            assert noise < floor < 4 * noise, (dtype, m, n, noise, floor)
    with pytest.raises(ValueError, match="2-D"):
        rounding_floor(torch.zeros(4))


# --- the budget allocator -------------------------------------------------------------------------


def _cost(c: Candidate, k: int) -> int:
    return 0 if k == 0 else c.fixed_bytes + k * c.bytes_per_rank


def _brute_force(cands: list[Candidate], budget: int) -> float | None:
    """The least total loss of any allocation within the budget (None: none is feasible)."""
    best = None
    ranges = [range(c.min_rank, len(c.sv2) + 1) for c in cands]
    for ks in itertools.product(*ranges):
        if sum(_cost(c, k) for c, k in zip(cands, ks, strict=True)) > budget:
            continue
        loss = sum(sum(c.sv2[k:]) for c, k in zip(cands, ks, strict=True))
        best = loss if best is None else min(best, loss)
    return best


def _loss_of(cands: list[Candidate], ranks: dict[str, int]) -> float:
    return sum(sum(c.sv2[ranks[c.name] :]) for c in cands)


sv2_lists = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.0, 7.5, 10.0]), max_size=4).map(
    lambda v: sorted(v, reverse=True)
)


@st.composite
def instances(draw, fixed: bool = True, equal_bytes: bool = False):
    n = draw(st.integers(1, 3))
    bpr = draw(st.integers(1, 6))
    cands = []
    for i in range(n):
        sv2 = draw(sv2_lists)
        cands.append(
            Candidate(
                name=f"m{i}",
                sv2=sv2,
                bytes_per_rank=bpr if equal_bytes else draw(st.integers(1, 6)),
                fixed_bytes=draw(st.integers(0, 5)) if fixed else 0,
                min_rank=draw(st.integers(0, min(1, len(sv2)))),
            )
        )
    return cands, draw(st.integers(0, 40))


@settings(max_examples=300, deadline=None)
@given(instances())
def test_greedy_is_optimal_at_the_bytes_it_reaches_and_within_its_bound(inst):
    cands, budget = inst
    opt = _brute_force(cands, budget)
    try:
        al = allocate(cands, budget)
    except ValueError as e:
        # refused only when no allocation fits at all, or only the empty one when something gains
        if "minimum ranks" in str(e):
            assert opt is None
        else:
            assert "cheapest single rank" in str(e)
            assert all(_cost(c, 1) > budget for c in cands if c.min_rank == 0 and c.sv2 and c.sv2[0] > 0)
        return
    assert opt is not None
    ranks = al.ranks
    assert al.bytes == sum(_cost(c, ranks[c.name]) for c in cands) <= budget
    assert all(c.min_rank <= ranks[c.name] <= len(c.sv2) for c in cands)
    assert al.lost == pytest.approx(_loss_of(cands, ranks))
    # optimal among all allocations of at most `optimal_bytes` bytes, and the bound is a true bound
    assert al.lost <= _brute_force(cands, al.optimal_bytes) + 1e-9
    assert al.lost_bound - 1e-9 <= opt <= al.lost + 1e-9


@settings(max_examples=200, deadline=None)
@given(instances(fixed=False, equal_bytes=True))
def test_greedy_is_optimal_for_any_budget_when_every_rank_costs_the_same(inst):
    cands, budget = inst
    cands = [Candidate(c.name, c.sv2, c.bytes_per_rank) for c in cands]  # no minimum ranks
    try:
        al = allocate(cands, budget)
    except ValueError:
        assert all(_cost(c, 1) > budget for c in cands if c.sv2 and c.sv2[0] > 0)
        return
    assert al.lost == pytest.approx(_brute_force(cands, budget))


def test_allocate_ties_zero_modules_and_saturation():
    a = Candidate("a", [4.0, 1.0], bytes_per_rank=10)
    b = Candidate("b", [4.0, 1.0], bytes_per_rank=10)
    z = Candidate("z", [0.0, 0.0], bytes_per_rank=1)
    e = Candidate("e", [], bytes_per_rank=1)
    al = allocate([a, b, z, e], 10)  # one rank: a tie, broken by candidate order
    assert al.ranks == {"a": 1, "b": 0, "z": 0, "e": 0}
    assert al.lost == pytest.approx(1.0 + 5.0) and al.lost_bound == pytest.approx(6.0)
    al = allocate([b, a, z, e], 10)
    assert al.ranks["b"] == 1 and al.ranks["a"] == 0
    al = allocate([a, b, z, e], 1000)  # everything that gains fits; zero modules take nothing
    assert al.ranks == {"a": 2, "b": 2, "z": 0, "e": 0} and al.bytes == 40 and al.lost == 0.0
    assert al.saturated == ("a", "b")
    assert allocate([z, e], 0).ranks == {"z": 0, "e": 0}  # nothing to keep: nothing to refuse


def test_allocate_total_counts_what_the_spectrum_does_not_list():
    c = Candidate("m", [9.0, 4.0], bytes_per_rank=1, total=20.0)
    al = allocate([c], 1)
    assert al.ranks == {"m": 1} and al.lost == pytest.approx(11.0) and al.saturated == ()


def test_allocate_fixed_costs_use_the_concave_hull_and_fill():
    # the first rank is expensive (a fixed cost), so rank 3 pays more per byte than rank 1
    c = Candidate("big", [1.0, 1.0, 1.0], bytes_per_rank=1, fixed_bytes=10)
    d = Candidate("small", [0.2, 0.1], bytes_per_rank=1)
    al = allocate([c, d], 13)
    assert al.ranks == {"big": 3, "small": 0} and al.lost == pytest.approx(0.3)
    # 12 bytes: the hull segment (13 bytes) does not fit; the fill takes rank 2 and the rest
    al = allocate([c, d], 12)
    assert al.bytes <= 12 and al.lost == pytest.approx(_brute_force([c, d], 12))


def test_allocate_refusals():
    c = Candidate("m", [1.0], bytes_per_rank=8, fixed_bytes=4, min_rank=1)
    with pytest.raises(ValueError, match="budget of 11 bytes is below the 12 bytes the minimum ranks take"):
        allocate([c], 11)
    with pytest.raises(ValueError, match=r"budget of 7 bytes is below the cheapest single rank \(8 bytes\)"):
        allocate([Candidate("m", [1.0, 0.5], bytes_per_rank=8)], 7)
    with pytest.raises(ValueError, match="duplicate module names"):
        allocate([Candidate("m", [1.0], 1), Candidate("m", [1.0], 1)], 5)
    with pytest.raises(ValueError, match="descending"):
        allocate([Candidate("m", [1.0, 2.0], 1)], 5)
    with pytest.raises(ValueError, match="min_rank"):
        allocate([Candidate("m", [1.0], 1, min_rank=2)], 5)
    with pytest.raises(ValueError, match="bytes_per_rank"):
        allocate([Candidate("m", [1.0], 0)], 5)
    with pytest.raises(ValueError, match="budget must be"):
        allocate([Candidate("m", [1.0], 1)], -1)


def test_allocate_on_an_adapters_spectra_as_truncate_budget_would():
    """truncate --budget: spectra from factored_svd, every module keeps rank >= 1; the allocation's
    loss is what truncating each module to its rank loses (checked with dense float64 SVDs)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (64, 32), "v": (16, 32), "up": (96, 32)}
    factors, cands = {}, []
    for name, (m, n) in shapes.items():
        b, a = torch.randn(m, 8, generator=g), torch.randn(8, n, generator=g) * torch.rand(8, 1, generator=g)
        factors[name] = (b, a)
        _, s, _ = factored_svd(b, a, 2.0)
        cands.append(Candidate(name, s.square(), bytes_per_rank=(m + n) * 2, min_rank=1))
    budget = 12 * (64 + 32) * 2
    al = allocate(cands, budget)
    assert al.bytes <= budget and all(k >= 1 for k in al.ranks.values())
    lost = 0.0
    for name, (b, a) in factors.items():
        s = torch.linalg.svdvals(2.0 * b.double() @ a.double())
        lost += float(s[al.ranks[name] :].square().sum())
    assert al.lost == pytest.approx(lost, rel=1e-9)
    as_lists = [Candidate(c.name, c.sv2.tolist(), c.bytes_per_rank, min_rank=1) for c in cands]
    assert al.lost <= _brute_force(as_lists, al.optimal_bytes) * (1 + 1e-12)
    assert al.lost_bound <= _brute_force(as_lists, budget) * (1 + 1e-12) <= al.lost * (1 + 1e-9)
