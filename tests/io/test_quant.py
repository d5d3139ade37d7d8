"""bitsandbytes 4-bit bases: pure-torch dequantization against bitsandbytes itself.

bitsandbytes quantizes on the CPU, so the files are made here by the peer: by transformers
(``BitsAndBytesConfig`` + ``save_pretrained``) and by ``bitsandbytes.functional.quantize_4bit``
written the way transformers writes them. The expected values are bitsandbytes'
``dequantize_4bit``. A few tests need neither library: a hand-computed example of the formula and
the broken-file errors.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, same_bits, save_base
from safetensors.torch import save_file

from loractl.errors import FormatError
from loractl.io import quant
from loractl.io.base import open_base

BF16 = torch.bfloat16


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle")


def no_neg_zero(t: torch.Tensor) -> torch.Tensor:
    """``-0.0`` -> ``+0.0``, every other value unchanged (x + 0.0 = x for x != -0.0)."""
    return t + 0.0


def same_up_to_zero_sign(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, except that FP4 code 8 is -0.0 in some bitsandbytes kernels and +0.0 in others."""
    return same_bits(no_neg_zero(a), no_neg_zero(b))


def bnb_dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit`` of ``packed`` as ``dtype``.

    On an AVX-512 CPU, bitsandbytes 0.50's native kernel (``dequantizeBlockwise4bitCpu`` in
    ``csrc/cpu_ops.cpp``) indexes ``absmax`` per row (``row · n / blocksize + col / blocksize``)
    instead of over the flattened weight whenever the row length n is a multiple of 16 but not of
    the block size; its scalar path, its CUDA kernel and its pure-torch kernel all index the
    flattened weight. For those shapes we take its pure-torch kernel (the ``default`` backend),
    called without ``torch.compile``.
    """
    import copy

    F = bnb_functional()
    st = copy.copy(state)
    st.dtype = dtype
    n_row = st.shape[-1]
    if n_row % 16 or n_row % st.blocksize == 0:
        return F.dequantize_4bit(packed, st).reshape(st.shape)
    from bitsandbytes.backends.default import ops as default_ops

    absmax = st.absmax
    if st.nested:
        absmax = F.dequantize_blockwise(st.absmax, st.state2)
        absmax += st.offset
    compute = default_ops._dequantize_4bit_compute
    compute = getattr(compute, "__wrapped__", compute)
    code = F.get_4bit_type(st.quant_type, device="cpu")
    return compute(packed.view(-1).view(torch.uint8), absmax.float(), code, st.blocksize, st.shape, dtype)


def save_like_transformers(path: Path, packed: dict[str, tuple[torch.Tensor, object]], **plain) -> Path:
    """Write 4-bit weights the way transformers does.

    transformers' ``save_pretrained`` takes the model's ``state_dict``; bitsandbytes'
    ``Linear4bit._save_to_state_dict`` (``bitsandbytes/nn/modules.py``) puts the packed weight
    under ``<m>.weight`` and each item of ``weight.quant_state.as_dict(packed=True)`` under
    ``<m>.weight.<item>``.
    """
    sd: dict[str, torch.Tensor] = dict(plain)
    for name, (q, state) in packed.items():
        sd[name] = q
        for k, v in state.as_dict(packed=True).items():
            sd[f"{name}.{k}"] = v
    save_file(sd, path, metadata={"format": "pt"})
    return path


# --------------------------------------------------------------------------------------------
# the formula by hand (no bitsandbytes)
# --------------------------------------------------------------------------------------------
def _state_bytes(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


def synthetic(
    path: Path,
    *,
    quant_type: str = "nf4",
    shape: tuple[int, ...] = (3, 50),
    blocksize: int = 64,
    double: bool = False,
    seed: int = 0,
) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """A random but well-formed 4-bit weight ``m.weight`` (codes and scales drawn directly)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    t: dict[str, torch.Tensor] = {
        "m.weight": torch.randint(0, 256, (-(-n // 2), 1), generator=g, dtype=torch.uint8),
        "m.weight.quant_map": quant.table(quant_type),
        "other.weight": torch.randn(4, 4, generator=g).to(BF16),
    }
    state: dict = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": "bfloat16",
        "shape": list(shape),
    }
    if double:
        nbs = 4
        t["m.weight.absmax"] = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8)
        t["m.weight.nested_absmax"] = torch.rand(-(-blocks // nbs), generator=g) + 0.5
        t["m.weight.nested_quant_map"] = torch.linspace(-1, 1, 256)
        state.update(nested_blocksize=nbs, nested_dtype="float32", nested_offset=0.8125)
    else:
        t["m.weight.absmax"] = torch.rand(blocks, generator=g) * 3 + 0.1
    t[f"m.weight.quant_state.bitsandbytes__{quant_type}"] = _state_bytes(state)
    save_file(t, path)
    return path, t, state


def by_hand(t: dict[str, torch.Tensor], state: dict) -> np.ndarray:
    """Element by element: high nibble first, block b = i // blocksize, float32 arithmetic."""
    f32 = np.float32
    packed = t["m.weight"].reshape(-1).tolist()
    lut = [f32(v) for v in t["m.weight.quant_map"].tolist()]
    bs = state["blocksize"]
    raw = t["m.weight.absmax"].tolist()
    if "nested_blocksize" in state:
        nmap = t["m.weight.nested_quant_map"].tolist()
        nabs = t["m.weight.nested_absmax"].tolist()
        nbs = state["nested_blocksize"]
        absmax = [
            f32(f32(nmap[c]) * f32(nabs[b // nbs])) + f32(state["nested_offset"]) for b, c in enumerate(raw)
        ]
    else:
        absmax = [f32(a) for a in raw]
    n = math.prod(state["shape"])
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        byte = packed[i // 2]
        code = byte >> 4 if i % 2 == 0 else byte & 0xF
        out[i] = lut[code] * absmax[i // bs]
    return out.reshape(state["shape"])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("shape", [(3, 50), (5, 7), (129,)], ids=str)
def test_formula_by_hand(tmp_path: Path, quant_type: str, double: bool, shape: tuple[int, ...]) -> None:
    path, t, state = synthetic(tmp_path / "m.safetensors", quant_type=quant_type, shape=shape, double=double)
    with open_base(path) as base:
        found = quant.find_quantized(base)
        assert list(found) == ["m.weight"]
        q = found["m.weight"]
        assert (q.quant_type, q.shape, q.dtype, q.blocksize, q.double_quant) == (
            quant_type,
            shape,
            "bfloat16",
            64,
            double,
        )
        got = quant.dequantize(base, q)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    assert same_bits(got, torch.from_numpy(by_hand(t, state)))


def test_high_nibble_is_the_first_element(tmp_path: Path) -> None:
    # byte 0x7F: high nibble 7 (NF4 0.0) then low nibble 15 (NF4 1.0); byte 0x0F: -1.0 then 1.0
    t = {
        "m.weight": torch.tensor([[0x7F], [0x0F]], dtype=torch.uint8),
        "m.weight.absmax": torch.tensor([2.0]),
        "m.weight.quant_map": quant.table("nf4"),
        "m.weight.quant_state.bitsandbytes__nf4": _state_bytes(
            {"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [1, 4]}
        ),
    }
    save_file(t, tmp_path / "m.safetensors")
    with open_base(tmp_path / "m.safetensors") as base:
        q = quant.find_quantized(base)["m.weight"]
        assert q.st_dtype == "F16"
        assert quant.dequantize(base, q).tolist() == [[0.0, 2.0, -2.0, 2.0]]


# --------------------------------------------------------------------------------------------
# against bitsandbytes.functional.quantize_4bit / dequantize_4bit
# --------------------------------------------------------------------------------------------
SHAPES = [
    (64, 128),  # rows a multiple of both block sizes
    (96, 640),  # 960 / 480 blocks: several nested blocks, the last one partial
    (32, 96),  # rows not a multiple of 64 (or 128): blocks straddle rows
    (7, 9),  # 63 elements: odd, a partial last block, a half-used last byte
    (33,),  # 1-D, odd
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double", [False, True], ids=["plain", "double"])
def test_matches_bitsandbytes(
    tmp_path: Path, shape: tuple[int, ...], quant_type: str, blocksize: int, double: bool
) -> None:
    F = bnb_functional()
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, quant_type, blocksize, double)).encode()))
    w = (torch.randn(shape, generator=g) * 0.02).to(BF16)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double)
    path = save_like_transformers(tmp_path / "model.safetensors", {"layer.weight": (packed, state)})
    with open_base(path) as base:
        assert quant.is_quantized(base)
        q = quant.find_quantized(base)["layer.weight"]
        assert (q.quant_type, q.shape, q.dtype, q.blocksize, q.double_quant) == (
            quant_type,
            shape,
            "bfloat16",
            blocksize,
            double,
        )
        got = quant.dequantize(base, q)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    # what bitsandbytes returns (the weight's own dtype) and its float32 values before rounding
    assert same_up_to_zero_sign(got.to(BF16), bnb_dequantize(packed, state, BF16))
    assert same_up_to_zero_sign(got, bnb_dequantize(packed, state, torch.float32))
    # and independently of bitsandbytes: each element is within half a step of the 4-bit grid
    if not double:
        lut = quant.table(quant_type).sort().values
        half_step = float((lut[1:] - lut[:-1]).max()) / 2
        scale = state.absmax.repeat_interleave(blocksize)[: w.numel()].view(shape)
        assert bool(((got - w.float()).abs() <= half_step * scale + 1e-7).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_other_weight_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    F = bnb_functional()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    path = save_like_transformers(tmp_path / "model.safetensors", {"layer.weight": (packed, state)})
    with open_base(path) as base:
        q = quant.find_quantized(base)["layer.weight"]
        assert q.dtype == str(dtype).removeprefix("torch.")
        got = quant.dequantize(base, q)
    assert same_bits(got.to(dtype), F.dequantize_4bit(packed, state))


# --------------------------------------------------------------------------------------------
# a real model quantized and saved by transformers
# --------------------------------------------------------------------------------------------
LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
)


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    pytest.importorskip("bitsandbytes")
    return save_base(build_model("llama", BF16, **LLAMA), tmp_path_factory.mktemp("bf16") / "base")


def quantize_with_transformers(base_dir: Path, out: Path, **bnb) -> dict[str, torch.Tensor]:
    """Load ``base_dir`` in 4 bits, save it to ``out``; bitsandbytes' dequantization of each weight."""
    import transformers as tf
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    cfg = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=BF16, **bnb)
    model = tf.LlamaForCausalLM.from_pretrained(
        base_dir, quantization_config=cfg, device_map="cpu", dtype=BF16
    )
    expected = {
        f"{name}.weight": dequantize_4bit(m.weight.data, m.weight.quant_state)
        for name, m in model.named_modules()
        if isinstance(m, Linear4bit)
    }
    assert len(expected) == 7  # q, k, v, o, gate, up, down
    model.save_pretrained(out, max_shard_size="16KB")
    return expected


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True], ids=["plain", "double"])
def test_transformers_save_pretrained(tmp_path: Path, bf16_base: Path, quant_type: str, double: bool) -> None:
    out = tmp_path / "q4"
    expected = quantize_with_transformers(
        bf16_base, out, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double
    )
    with open_base(bf16_base) as original, open_base(out) as base:
        assert len(base.shards) > 1  # statistics may sit in another shard than their weight
        assert quant.is_quantized(base) and not quant.is_quantized(original)
        found = quant.find_quantized(base)
        assert set(found) == set(expected)
        for name, q in found.items():
            assert (q.quant_type, q.dtype, q.blocksize, q.double_quant) == (
                quant_type,
                "bfloat16",
                64,
                double,
            )
            assert q.shape == original.info(name).shape
            assert sorted(q.aux) == sorted(k for k in base.tensors if k.startswith(name + "."))
            got = quant.dequantize(base, q)
            assert tuple(got.shape) == q.shape
            assert same_up_to_zero_sign(got.to(BF16), expected[name]), name
        # every other tensor is kept as it was; the dequantized copy weighs what the bf16 base did
        rest = set(base.tensors) - set(found) - quant.aux_keys(found)
        assert rest == set(original.tensors) - set(found)
        assert quant.dequantized_nbytes(base) == original.nbytes
        assert quant.dequantized_nbytes(base, dtype_bytes=None) == original.nbytes  # their own bf16
        assert quant.dequantized_nbytes(base, dtype_bytes=4) == original.nbytes + sum(
            original.info(k).nbytes for k in found
        )
        assert "quantization_config" in base.config
        assert "quantization_config" not in quant.dequantized_config(base.config)
        assert quant.dequantized_config(base.config)["hidden_size"] == 64


def test_transformers_quant_storage_bf16(tmp_path: Path, bf16_base: Path) -> None:
    """``bnb_4bit_quant_storage=bfloat16`` (FSDP QLoRA) stores the same code bytes as a bf16 tensor."""
    out = tmp_path / "q4"
    expected = quantize_with_transformers(
        bf16_base, out, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=BF16
    )
    with open_base(out) as base:
        found = quant.find_quantized(base)
        assert {base.info(k).dtype for k in found} == {"BF16"}
        for name, q in found.items():
            assert same_bits(quant.dequantize(base, q).to(BF16), expected[name]), name


def test_unquantized_base(tmp_path: Path) -> None:
    base_dir = save_base(build_model("llama", BF16), tmp_path / "base")
    with open_base(base_dir) as base:
        assert not quant.is_quantized(base)
        assert quant.find_quantized(base) == {}
        assert quant.dequantized_nbytes(base) == base.nbytes


# --------------------------------------------------------------------------------------------
# broken files: one clear error naming the file and the tensor
# --------------------------------------------------------------------------------------------
STATE = "m.weight.quant_state.bitsandbytes__nf4"


def rewrite(path: Path, t: dict[str, torch.Tensor], drop: tuple[str, ...] = ()) -> Path:
    t = {k: v for k, v in t.items() if k not in drop}
    path.unlink()
    save_file(t, path)
    return path


def state_with(state: dict, **change) -> torch.Tensor:
    s = dict(state)
    for k, v in change.items():
        if v is None:
            s.pop(k, None)
        else:
            s[k] = v
    return _state_bytes(s)


def expect_error(
    path: Path, tensor: str, words: str, *, on_dequantize: bool = False, file: Path | None = None
) -> None:
    """Opening ``path``, find_quantized (or dequantize) fails with ``<file>: tensor '<tensor>': ...words...``."""
    with open_base(path) as base:
        with pytest.raises(FormatError) as e:
            found = quant.find_quantized(base)
            if on_dequantize:
                quant.dequantize(base, found["m.weight"])
    msg = str(e.value)
    assert msg.startswith(f"{file or path}: tensor {tensor!r}: "), msg
    assert words in msg, msg
    assert e.value.hint


def test_bad_json(tmp_path: Path) -> None:
    path, t, _ = synthetic(tmp_path / "m.safetensors")
    t[STATE] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    expect_error(rewrite(path, t), STATE, "does not hold a JSON quant state")


@pytest.mark.parametrize(
    ("change", "tensor", "words"),
    [
        ({"quant_type": "fp4"}, STATE, "quant_type is 'fp4' but the key says 'nf4'"),
        ({"blocksize": 0}, STATE, "blocksize 0 is not a positive integer"),
        ({"dtype": "int8"}, STATE, "dtype 'int8' is not one of"),
        ({"shape": None}, STATE, "shape None is not a list of sizes"),
        ({"shape": [3, 51]}, "m.weight", "75 bytes of 4-bit codes (U8 [75, 1]) but shape [3, 51] needs 77"),
        ({"blocksize": 32}, "m.weight.absmax", "expected 5 float values, found F32 [3]"),
    ],
    ids=["type", "blocksize", "dtype", "no-shape", "shape", "absmax-count"],
)
def test_inconsistent_state(tmp_path: Path, change: dict, tensor: str, words: str) -> None:
    path, t, state = synthetic(tmp_path / "m.safetensors")
    t[STATE] = state_with(state, **change)
    expect_error(rewrite(path, t), tensor, words)


def test_missing_tensors(tmp_path: Path) -> None:
    path, t, _ = synthetic(tmp_path / "m.safetensors")
    expect_error(rewrite(path, t, drop=("m.weight.absmax",)), STATE, "missing its absmax tensor")
    path, t, _ = synthetic(tmp_path / "m.safetensors")
    expect_error(rewrite(path, t, drop=("m.weight",)), STATE, "the base has no tensor 'm.weight'")
    path, t, _ = synthetic(tmp_path / "m.safetensors", double=True)
    expect_error(rewrite(path, t, drop=("m.weight.nested_quant_map",)), STATE, "missing its nested_quant_map")


def test_double_quant_needs_its_state(tmp_path: Path) -> None:
    path, t, state = synthetic(tmp_path / "m.safetensors", double=True)
    t[STATE] = state_with(state, nested_offset=None)
    expect_error(rewrite(path, t), STATE, "nested_offset None is not a finite number")
    path, t, state = synthetic(tmp_path / "m.safetensors", double=False)
    t["m.weight.absmax"] = t["m.weight.absmax"].to(torch.uint8)
    expect_error(rewrite(path, t), "m.weight.absmax", "expected 3 float values, found U8")


def test_statistics_without_quant_state(tmp_path: Path) -> None:
    path, t, _ = synthetic(tmp_path / "m.safetensors")
    expect_error(rewrite(path, t, drop=(STATE,)), "m.weight.absmax", "no quant state")


def test_unknown_quant_type(tmp_path: Path) -> None:
    path, t, state = synthetic(tmp_path / "m.safetensors")
    t["m.weight.quant_state.bitsandbytes__int4"] = t.pop(STATE)
    expect_error(
        rewrite(path, t), "m.weight.quant_state.bitsandbytes__int4", "unknown bitsandbytes quant type"
    )


def test_two_quant_states(tmp_path: Path) -> None:
    path, t, state = synthetic(tmp_path / "m.safetensors")
    t["m.weight.quant_state.bitsandbytes__fp4"] = state_with(state, quant_type="fp4")
    expect_error(
        rewrite(path, t), "m.weight.quant_state.bitsandbytes__nf4", "a second quant state for 'm.weight'"
    )


def test_wrong_quant_map_and_nan_statistics(tmp_path: Path) -> None:
    path, t, _ = synthetic(tmp_path / "m.safetensors")
    t["m.weight.quant_map"] = quant.table("fp4")
    expect_error(rewrite(path, t), "m.weight.quant_map", "is not bitsandbytes' NF4 table", on_dequantize=True)
    path, t, _ = synthetic(tmp_path / "m.safetensors", double=True)
    t["m.weight.nested_absmax"][0] = float("nan")
    expect_error(rewrite(path, t), "m.weight.nested_absmax", "holds 1 NaN/Inf values", on_dequantize=True)


def test_error_names_the_shard(tmp_path: Path) -> None:
    """In a sharded base the message names the shard that holds the tensor."""
    path, t, state = synthetic(tmp_path / "x.safetensors")
    folder = tmp_path / "base"
    folder.mkdir()
    first = {k: v for k, v in t.items() if k != "m.weight.absmax"}
    save_file(first, folder / "model-00001-of-00002.safetensors")
    save_file(
        {"m.weight.absmax": t["m.weight.absmax"][:2].clone()}, folder / "model-00002-of-00002.safetensors"
    )
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map["m.weight.absmax"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    expect_error(
        folder,
        "m.weight.absmax",
        "expected 3 float values, found F32 [2]",
        file=folder / "model-00002-of-00002.safetensors",
    )
