"""truncate, combine, similarity, amplification and spectra through the API, checked against dense
linear algebra in float64 and against PEFT itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, read_st, save_base
from safetensors.torch import load_file, save_file

from loractl import api
from loractl.errors import ShapeMismatchError, UsageError
from loractl.ops.merge import delta_weight

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dense(m) -> torch.Tensor:
    """s·B·A laid out like the base weight, in float64, straight from the definition."""
    import dataclasses

    m64 = dataclasses.replace(m, down=m.down.double(), up=m.up.double())
    return delta_weight(m64)


def _decaying(adapter_dir: Path, seed: int = 0) -> None:
    """Give the adapter a decaying spectrum like a trained one (B columns scaled by 0.7^i)."""
    f = adapter_dir / "adapter_model.safetensors"
    sd = load_file(f)
    for k, v in sd.items():
        if k.endswith("lora_B.weight") or k.endswith("lora_embedding_B"):
            r = v.shape[1]
            sd[k] = (v * (0.7 ** torch.arange(r, dtype=v.dtype))).contiguous()
    save_file(sd, f, metadata={"format": "pt"})


@pytest.fixture
def llama(tmp_path: Path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    return model, base


def test_truncate_rank_is_optimal_and_small_modules_are_kept(llama, tmp_path: Path) -> None:
    model, _ = llama
    ad = make_adapter(
        model, tmp_path / "ad", r=8, lora_alpha=16, target_modules=LLAMA_ALL, rank_pattern={"down_proj": 3}
    )
    _decaying(ad)
    res = api.truncate(ad, tmp_path / "t", rank=4)
    before = api.load_adapter(ad)
    after = api.load_adapter(tmp_path / "t")
    by_name = {m.name: m for m in res.modules}
    for name, m in before.modules.items():
        d = dense(m)
        s = torch.linalg.svdvals(d)
        k = min(4, m.rank)
        assert after.modules[name].rank == k == by_name[name].rank_after
        got = dense(after.modules[name])
        if m.rank <= 4:  # kept as it is
            assert torch.equal(after.modules[name].down, m.down) and after.modules[name].alpha == m.alpha
            continue
        u, sv, vh = torch.linalg.svd(d, full_matrices=False)
        best = (u[:, :k] * sv[:k]) @ vh[:k]
        assert torch.allclose(got, best, rtol=0, atol=1e-6 * float(sv[0]))
        # Eckart–Young: the error is exactly the discarded singular values
        err = torch.linalg.matrix_norm(d - got) ** 2
        assert math.isclose(float(err), float((s[k:] ** 2).sum()), rel_tol=1e-4)
        assert math.isclose(by_name[name].energy_kept, float((s[:k] ** 2).sum() / (s**2).sum()), rel_tol=1e-9)
    # PEFT loads the result, and it computes base + the truncated updates
    from conftest import peft_merged

    merged = peft_merged(llama[1], [tmp_path / "t"], torch.float32, "llama").state_dict()
    k = "model.layers.0.self_attn.q_proj.weight"
    expect = read_st(llama[1])[k].double() + dense(after.modules["model.layers.0.self_attn.q_proj"])
    torch.testing.assert_close(merged[k].double(), expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "rule, value, check",
    [
        (
            "energy",
            0.9,
            lambda s, k: (s[:k] ** 2).sum() / (s**2).sum() >= 0.9 > (s[: k - 1] ** 2).sum() / (s**2).sum(),
        ),
        ("sv_fro", 0.95, lambda s, k: ((s[:k] ** 2).sum() / (s**2).sum()).sqrt() >= 0.95),
        ("sv_cumulative", 0.8, lambda s, k: s[:k].sum() / s.sum() >= 0.8 > s[: k - 1].sum() / s.sum()),
        ("sv_ratio", 3.0, lambda s, k: bool((s[:k] >= s[0] / 3).all()) and (k == len(s) or s[k] < s[0] / 3)),
    ],
)
def test_dynamic_rules_choose_the_smallest_rank(llama, tmp_path: Path, rule, value, check) -> None:
    model, _ = llama
    ad = make_adapter(model, tmp_path / "ad", r=8, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    _decaying(ad)
    res = api.truncate(ad, tmp_path / "t", **{rule: value})
    before = api.load_adapter(ad)
    for m in res.modules:
        s = torch.linalg.svdvals(dense(before.modules[m.name]))[:8]
        assert check(s, m.rank_after), (m.name, m.rank_after, s)
    capped = api.truncate(ad, tmp_path / "t2", rank=2, **{rule: value})
    assert all(m.rank_after <= 2 for m in capped.modules)


def test_truncate_conv_embedding_fifo_and_rslora(tmp_path: Path) -> None:
    model = build_model("gpt2", torch.float32)
    ad = make_adapter(
        model,
        tmp_path / "g",
        r=6,
        lora_alpha=5,
        use_rslora=True,
        fan_in_fan_out=True,
        target_modules=["c_attn", "wte"],
    )
    api.truncate(ad, tmp_path / "gt", rank=3)
    a, b = api.load_adapter(ad), api.load_adapter(tmp_path / "gt")
    for name, m in a.modules.items():
        d = dense(m)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        assert torch.allclose(dense(b.modules[name]), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5 * float(s[0]))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 6, 3)

    net = Net()
    cad = make_adapter(net, tmp_path / "c", r=4, lora_alpha=4, target_modules=["conv"])
    api.truncate(cad, tmp_path / "ct", rank=2)
    ca, cb = api.load_adapter(cad), api.load_adapter(tmp_path / "ct")
    d = dense(ca.modules["conv"]).reshape(6, -1)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    assert cb.modules["conv"].down.shape == (2, 4, 3, 3)
    assert torch.allclose(dense(cb.modules["conv"]).reshape(6, -1), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)


def test_truncate_lets_go_of_its_own_input_but_not_a_callers(llama, tmp_path: Path, monkeypatch) -> None:
    """From a path, each input module's factors are dropped once truncated (so the output grows as
    the input shrinks); an Adapter the caller passed is never touched; both give the same file."""
    model, _ = llama
    ad = make_adapter(model, tmp_path / "ad", r=8, lora_alpha=16, target_modules=LLAMA_ALL)
    _decaying(ad)
    loaded: list = []
    real_load = api.load_adapter

    def spy(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(api, "load_adapter", spy)
    api.truncate(ad, tmp_path / "from_path", rank=4)
    (own,) = loaded
    assert own.modules and all(m.down.is_meta and m.up.is_meta for m in own.modules.values())
    mine = real_load(ad)
    before = {n: (m.down.clone(), m.up.clone()) for n, m in mine.modules.items()}
    api.truncate(mine, tmp_path / "from_object", rank=4)
    for n, m in mine.modules.items():
        assert not m.down.is_meta and torch.equal(m.down, before[n][0]) and torch.equal(m.up, before[n][1])
    a = read_st(tmp_path / "from_path" / "adapter_model.safetensors")
    b = read_st(tmp_path / "from_object" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dylora(tmp_path: Path, model, unit: int) -> Path:
    ad = make_adapter(model, tmp_path / "dy", r=8, lora_alpha=4, target_modules=["q_proj"])
    f = ad / "adapter_model.safetensors"
    meta = {"ss_network_module": "networks.dylora", "ss_network_args": json.dumps({"unit": str(unit)})}
    save_file(load_file(f), f, metadata=meta)
    return ad


def test_nested_truncation_keeps_first_components(llama, tmp_path: Path) -> None:
    model, _ = llama
    ad = _dylora(tmp_path, model, unit=2)
    info = api.inspect([ad]).adapters[0]
    assert info.kind == "DyLoRA"
    res = api.truncate(ad, tmp_path / "n4", rank=4, nested=True)
    assert res.method == "nested-kohya"
    a, b = api.load_adapter(ad), api.load_adapter(tmp_path / "n4")
    for name, m in a.modules.items():
        n = b.modules[name]
        assert torch.equal(n.down, m.down[:4]) and torch.equal(n.up, m.up[:, :4])
        assert n.alpha == m.alpha  # kohya's extractor keeps alpha: s = alpha / 4
    api.truncate(ad, tmp_path / "ly", rank=4, nested=True, dylora_convention="lycoris")
    ly = api.load_adapter(tmp_path / "ly")
    assert all(m.alpha == a.modules[k].alpha * 2 for k, m in ly.modules.items())  # alpha/(blocks used)
    with pytest.raises(UsageError, match="not a multiple of the DyLoRA unit 2"):
        api.truncate(ad, tmp_path / "bad", rank=3, nested=True)
    assert not (tmp_path / "bad").exists()


def test_nested_truncation_of_plain_lora_needs_force(llama, tmp_path: Path) -> None:
    model, _ = llama
    ad = make_adapter(model, tmp_path / "ad", r=8, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(UsageError, match="not a DyLoRA adapter"):
        api.truncate(ad, tmp_path / "n", rank=4, nested=True)
    assert not (tmp_path / "n").exists()
    res = api.truncate(ad, tmp_path / "n", rank=4, nested=True, force=True)
    assert res.method == "nested-original"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=9), "larger than the adapter's largest rank 8"),
        (dict(rank=0), "at least 1"),
        (dict(energy=0.0), "outside"),
        (dict(energy=1.5), "outside"),
        (dict(sv_fro=-1.0), "outside"),
        (dict(), "say how far"),
    ],
)
def test_truncate_bad_arguments(llama, tmp_path: Path, kwargs, message) -> None:
    model, _ = llama
    ad = make_adapter(model, tmp_path / "ad", r=8, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(UsageError, match=message):
        api.truncate(ad, tmp_path / "t", **kwargs)
    assert not (tmp_path / "t").exists()


def test_combine_cat_is_the_exact_weighted_sum_over_the_union(llama, tmp_path: Path) -> None:
    model, _ = llama
    a1 = make_adapter(model, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    a2 = make_adapter(
        model,
        tmp_path / "a2",
        seed=2,
        r=6,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["q_proj", "o_proj"],
    )
    res = api.combine([a1, a2], tmp_path / "c", weights=[0.7, -1.3])
    A1, A2, C = api.load_adapter(a1), api.load_adapter(a2), api.load_adapter(tmp_path / "c")
    assert sorted(C.modules) == sorted(set(A1.modules) | set(A2.modules))
    for name, m in C.modules.items():
        expect = torch.zeros_like(dense(m))
        if name in A1.modules:
            expect += 0.7 * dense(A1.modules[name])
        if name in A2.modules:
            expect += -1.3 * dense(A2.modules[name])
        torch.testing.assert_close(dense(m), expect, rtol=0, atol=1e-6)
    assert C.modules["model.layers.0.self_attn.q_proj"].rank == 10
    assert res.rank == {"min": 4, "max": 10}
    # svd: the exact sum truncated optimally
    api.combine([a1, a2], tmp_path / "s", weights=[0.7, -1.3], method="svd", rank=3)
    S = api.load_adapter(tmp_path / "s")
    for name, m in S.modules.items():
        full = dense(C.modules[name])
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        k = min(3, int((s > 1e-9 * s[0]).sum()))
        torch.testing.assert_close(dense(m), (u[:, :k] * s[:k]) @ vh[:k], rtol=0, atol=1e-5 * float(s[0]))


@pytest.mark.parametrize("method", ["linear", "ties", "dare-linear", "dare-ties", "magnitude-prune"])
def test_combine_equals_peft_add_weighted_adapter(llama, tmp_path: Path, method: str) -> None:
    import peft

    from loractl.ops.combine import PEFT_COMBINATION_TYPES

    model, _ = llama
    r2 = 4 if method == "linear" else 6
    a1 = make_adapter(model, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    a2 = make_adapter(model, tmp_path / "a2", seed=2, r=r2, lora_alpha=3, target_modules=["q_proj", "v_proj"])
    density = None if method == "linear" else 0.5
    api.combine([a1, a2], tmp_path / "c", weights=[0.6, 0.9], method=method, density=density, seed=7, rank=5)
    ours = api.load_adapter(tmp_path / "c")

    pm = peft.PeftModel.from_pretrained(build_model("llama", torch.float32), a1, adapter_name="a1")
    pm.load_adapter(a2, adapter_name="a2")
    kw = {} if density is None else {"density": density}
    if method != "linear":
        kw["svd_rank"] = 5
    # DARE draws from torch's global RNG: seed it right before each module's draw, as loractl does
    import peft.tuners.lora.model as lm

    originals = {n: getattr(lm, n) for n in ("dare_linear", "dare_ties") if hasattr(lm, n)}

    def seeded(fn):
        def wrapper(*a, **k):
            torch.manual_seed(7)
            return fn(*a, **k)

        return wrapper

    for n, fn in originals.items():
        setattr(lm, n, seeded(fn))
    try:
        pm.add_weighted_adapter(
            ["a1", "a2"], [0.6, 0.9], "c", combination_type=PEFT_COMBINATION_TYPES[method], **kw
        )
    finally:
        for n, fn in originals.items():
            setattr(lm, n, fn)
    for name, module in pm.named_modules():
        if (
            hasattr(module, "lora_A")
            and isinstance(module.lora_A, torch.nn.ModuleDict)
            and "c" in module.lora_A
        ):
            key = name.removeprefix("base_model.model.")
            assert torch.equal(ours.modules[key].down, module.lora_A["c"].weight.detach()), key
            assert torch.equal(ours.modules[key].up, module.lora_B["c"].weight.detach()), key
            assert ours.modules[key].scale == module.scaling["c"]


def test_combine_linear_with_unequal_ranks_points_to_cat(llama, tmp_path: Path) -> None:
    model, _ = llama
    a1 = make_adapter(model, tmp_path / "a1", r=4, lora_alpha=8, target_modules=["q_proj"])
    a2 = make_adapter(model, tmp_path / "a2", r=6, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(UsageError) as e:
        api.combine([a1, a2], tmp_path / "c", method="linear")
    assert "cat" in (e.value.hint or "")
    assert not (tmp_path / "c").exists()


def test_combine_refuses_adapters_for_different_bases(llama, tmp_path: Path) -> None:
    model, _ = llama
    other = build_model("llama", torch.float32, hidden_size=16, intermediate_size=24)
    a1 = make_adapter(model, tmp_path / "a1", r=4, lora_alpha=8, target_modules=["q_proj"])
    a2 = make_adapter(other, tmp_path / "a2", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ShapeMismatchError, match="q_proj"):
        api.combine([a1, a2], tmp_path / "c")
    with pytest.raises(UsageError, match="--weight"):
        api.combine([a1, a1], tmp_path / "c", weights=[1.0])
    assert not (tmp_path / "c").exists()


def _train(model, path: Path, seed: int, steps: int = 6) -> Path:
    """A few real optimisation steps with PEFT (default init: B = 0, A random), then save."""
    import copy

    import peft

    torch.manual_seed(seed)
    pm = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 96, (4, 12), generator=g)
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(path)
    return path


def test_similarity_matches_the_formula_on_trained_adapters(llama, tmp_path: Path) -> None:
    model, _ = llama
    a1 = _train(model, tmp_path / "s1", seed=1)
    a2 = _train(model, tmp_path / "s2", seed=2)
    res = api.similarity(a1, a2, i=3, j=5, grid=True)
    A1, A2 = api.load_adapter(a1), api.load_adapter(a2)
    for m in res.modules:
        # φ straight from the paper: U = right-singular vectors of A (columns), top i / j
        _, _, v1 = torch.linalg.svd(A1.modules[m.name].down.double(), full_matrices=False)
        _, _, v2 = torch.linalg.svd(A2.modules[m.name].down.double(), full_matrices=False)
        phi = float(torch.linalg.matrix_norm(v1[:3] @ v2[:5].T) ** 2 / 3)
        assert math.isclose(m.phi, phi, rel_tol=1e-9, abs_tol=1e-12)
        assert m.grid is not None and math.isclose(m.grid[2][4], phi, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(res.mean_phi, sum(m.phi for m in res.modules) / len(res.modules))
    threads = torch.get_num_threads()
    same = api.similarity(a1, a1)
    assert torch.get_num_threads() == threads  # its two single-threaded workers leave torch as it was
    assert all(math.isclose(m.phi, 1.0, rel_tol=1e-9) for m in same.modules)
    only_q = api.similarity(a1, a2, module="*q_proj")
    assert {m.name.rsplit(".", 1)[1] for m in only_q.modules} == {"q_proj"}
    b_factor = api.similarity(a1, a2, factor="B", i=2, j=2)
    for m in b_factor.modules:
        u1, _, _ = torch.linalg.svd(A1.modules[m.name].up.double(), full_matrices=False)
        u2, _, _ = torch.linalg.svd(A2.modules[m.name].up.double(), full_matrices=False)
        phi = float(torch.linalg.matrix_norm(u1[:, :2].T @ u2[:, :2]) ** 2 / 2)
        assert math.isclose(m.phi, phi, rel_tol=1e-7, abs_tol=1e-9)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_similarity_reads_only_the_factor_it_compares(llama, tmp_path: Path, monkeypatch, fmt: str) -> None:
    """φ of the A factors reads no B tensor (and vice versa), in PEFT's and kohya's layouts, and
    gives what fully loaded adapters give."""
    from loractl.io.safetensors import SafetensorsFile

    model, base = llama
    a1 = _train(model, tmp_path / "s1", seed=1)
    a2 = _train(model, tmp_path / "s2", seed=2)
    if fmt == "kohya":
        a1 = api.convert(a1, tmp_path / "k1.safetensors", to="kohya", base=base).output
        a2 = api.convert(a2, tmp_path / "k2.safetensors", to="kohya", base=base).output
    full = {f: api.similarity(api.load_adapter(a1), api.load_adapter(a2), factor=f, grid=True) for f in "AB"}
    read: list[str] = []
    real_read, real_mapped = SafetensorsFile.read, SafetensorsFile.mapped
    monkeypatch.setattr(
        SafetensorsFile, "read", lambda self, k, out=None: read.append(k) or real_read(self, k, out)
    )
    monkeypatch.setattr(SafetensorsFile, "mapped", lambda self, k: read.append(k) or real_mapped(self, k))
    for f, other in (("A", ("lora_B", "lora_up")), ("B", ("lora_A", "lora_down"))):
        read.clear()
        res = api.similarity(a1, a2, factor=f, grid=True)
        assert read and not [k for k in read if any(o in k for o in other)]
        assert [(m.name, m.phi, m.grid) for m in res.modules] == [
            (m.name, m.phi, m.grid) for m in full[f].modules
        ]


def test_amplification_matches_dense_computation(llama, tmp_path: Path) -> None:
    model, base = llama
    ad = _train(model, tmp_path / "t", seed=3)
    res = api.amplification(ad, base, module="*layers.0.self_attn.q_proj")
    (m,) = res.modules
    A = api.load_adapter(ad).modules[m.name]
    d = dense(A)
    w = read_st(base)[m.name + ".weight"].double()
    u, s, vh = torch.linalg.svd(d)
    r = A.rank
    proj = float(torch.linalg.matrix_norm(u[:, :r].T @ w @ vh[:r].T))
    assert math.isclose(m.delta_norm, float(torch.linalg.matrix_norm(d)), rel_tol=1e-9)
    assert math.isclose(m.proj_delta, proj, rel_tol=1e-6)
    assert math.isclose(m.amplification, m.delta_norm / proj, rel_tol=1e-6)
    uw, sw, vhw = torch.linalg.svd(w)
    assert math.isclose(
        m.proj_top, float(torch.linalg.matrix_norm(uw[:, :r].T @ w @ vhw[:r].T)), rel_tol=1e-9
    )


def test_spectrum_equals_dense_singular_values(llama, tmp_path: Path) -> None:
    model, _ = llama
    ad = make_adapter(model, tmp_path / "ad", r=8, lora_alpha=16, target_modules=["q_proj"])
    res = api.spectrum([ad])
    a = api.load_adapter(ad)
    for m in res.adapters[0].modules:
        s = torch.linalg.svdvals(dense(a.modules[m.name]))[:8]
        assert torch.allclose(torch.tensor(m.singular_values, dtype=torch.float64), s, rtol=1e-9, atol=1e-12)
        assert list(m.energy) == ["1", "2", "4", "8"] and math.isclose(m.energy["8"], 1.0)
        p = s / s.sum()
        assert math.isclose(m.effective_rank, float(torch.exp(-(p * p.log()).sum())), rel_tol=1e-9)
