"""Oracles for FP8 bases: the block-scaled layout (DeepSeek-V3/R1, Qwen3-FP8: ``quant_method: "fp8"``) and
compressed-tensors' FP8 layout (``quant_method: "compressed-tensors"``). The facts behind every rule here,
with the source they come from, are in the notes for issue #13 (fp8.md).

Block-scaled layout on disk: each quantized linear has ``weight`` (F8_E4M3, [out, in]) and ``weight_scale_inv``
(F32, [ceil(out/B0), ceil(in/B1)]); config.json has ``quantization_config = {"quant_method": "fp8",
"weight_block_size": [B0, B1], "activation_scheme": "dynamic", ...}``.

- ``dequantize_blocks``: the reference dequantization, ``(q.float() * s[i // B0, j // B1]).to(dtype)``. It is
  transformers' ``Fp8Dequantize._dequantize_one`` bit for bit whenever transformers derives the right block from
  the scale grid (every dim a multiple of its block, or a single block along it), and DeepSeek's
  ``weight_dequant`` / compressed-tensors' ``FP8BlockDequantizer`` for every shape (partial last blocks too).
- ``quantize_blocks``: the requantization rule, DeepSeek's ``weight_quant``: ``s = amax / 448`` (float32),
  ``q = (w / s)`` cast to float8_e4m3fn (round to nearest even). It round-trips bit for bit:
  ``quantize_blocks(dequantize_blocks(q, s, B, float32), B) == (q, s)`` for a checkpoint it made.
  transformers' own rule (``Fp8Quantize``: ``q = w * (448 / amax)``, ``s = 1 / (448 / amax)``) is available as
  ``quantize_blocks_transformers``; it does not round-trip the scale for 11.8% of the amax values (torch computes
  the python-float-over-tensor ``448 / amax`` as ``448 * (1 / amax)``). ``amax / 448`` (tensor over python float)
  is a correctly rounded division: keep it that way round.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

# A tiny Llama whose dims are multiples of 128 and of 32: q/k/v/o 256 or 128 wide, mlp 384.
DIVISIBLE = dict(
    hidden_size=256,
    intermediate_size=384,
    num_attention_heads=4,
    head_dim=64,
    num_key_value_heads=2,
    num_hidden_layers=1,
    vocab_size=64,
)
# The same with head_dim 50: q_proj [200, 256], k/v [100, 256], o_proj [256, 200]: partial last blocks for
# 128 (200 = 128 + 72; 100 < 128 is one block) and for 32 (200 = 6*32 + 8, 100 = 3*32 + 4).
CEIL = dict(DIVISIBLE, head_dim=50)


def fp8_llama(dtype: torch.dtype = torch.bfloat16, seed: int = 0, ceil: bool = True):
    """A tiny Llama (``CEIL`` or ``DIVISIBLE`` dims) with seeded random weights, from tests/conftest.py."""
    from conftest import build_model

    return build_model("llama", dtype, seed=seed, **(CEIL if ceil else DIVISIBLE))


def _grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def expand_scale(s: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """The per-element scale: ``s[i // B0, j // B1]`` (the last row/column of blocks may be partial)."""
    return s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]


def dequantize_blocks(
    q: torch.Tensor, s: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Reference dequantization: the float32 product of the FP8 value and its block's scale, cast once to dtype."""
    if q.dtype != FP8 or s.dtype != torch.float32 or tuple(s.shape) != _grid(tuple(q.shape), block):
        raise ValueError(
            f"not a block-scaled FP8 weight: {q.dtype} {tuple(q.shape)}, {s.dtype} {tuple(s.shape)}"
        )
    return (q.to(torch.float32) * expand_scale(s, tuple(q.shape), block)).to(dtype)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Requantization rule (DeepSeek-V3 ``weight_quant``): per block ``s = amax / 448`` in float32,
    ``q = fp8(w / s)`` (round to nearest even; |w / s| <= 448 up to one float32 rounding, so the clamp is only a
    guard). An all-zero block gets ``s = 1`` (DeepSeek's kernel would divide 0 by 0)."""
    rows, cols = w.shape
    gr, gc = _grid((rows, cols), block)
    padded = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32)
    padded[:rows, :cols] = w.to(torch.float32)
    tiles = padded.reshape(gr, block[0], gc, block[1])
    amax = tiles.abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(gr * block[0], gc * block[1])[:rows, :cols].contiguous(), s.contiguous()


def quantize_blocks_transformers(
    w: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own quantizer (``integrations.finegrained_fp8.Fp8Quantize``, pure torch, runs on CPU).
    It only tiles shapes divisible by the block: it returns any other weight unquantized, so this raises."""
    from types import SimpleNamespace

    import transformers as tf
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    op = Fp8Quantize(
        SimpleNamespace(quantization_config=tf.FineGrainedFP8Config(weight_block_size=tuple(block)))
    )
    out = op._quantize_one("w.weight", w)
    if "w.weight_scale_inv" not in out:
        raise ValueError(f"transformers' Fp8Quantize leaves {tuple(w.shape)} unquantized for block {block}")
    return out["w.weight"], out["w.weight_scale_inv"]


def transformers_derives_block(shape: tuple[int, int], block: tuple[int, int]) -> bool:
    """Whether transformers' dequantization (block = dim // grid) uses the real block along both axes."""
    return all(d % b == 0 or d <= b for d, b in zip(shape, block))


def _is_fp8_target(key: str) -> bool:
    # what real checkpoints quantize: the linear projections (q/k/v/o, gate/up/down, per-expert ones,
    # DeepSeek's q_a_proj/kv_a_proj_with_mqa/kv_b_proj); not embeddings, norms, lm_head or the MoE router
    return key.endswith("proj.weight")


def save_fp8_base(
    model,
    path: Path,
    block: tuple[int, int] = (128, 128),
    *,
    rule: str = "reference",
    quantize: Callable[[str], bool] = _is_fp8_target,
    modules_to_not_convert: list[str] | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """Save ``model`` (transformers) in the FP8 block-scaled layout of real checkpoints: every 2-D weight with
    ``quantize(key)`` true (default: keys ending in ``proj.weight``) becomes F8_E4M3 ``weight`` + F32
    ``weight_scale_inv`` in the same shard (index updated), everything else keeps the model's dtype, and
    config.json gets the ``quantization_config``. ``rule``: "reference" (``quantize_blocks``) or "transformers"
    (``quantize_blocks_transformers``, divisible shapes only)."""
    from safetensors.torch import load_file, save_file

    quant = {"reference": quantize_blocks, "transformers": quantize_blocks_transformers}[rule]
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    skip = tuple(modules_to_not_convert or ())
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    done = 0
    for f in sorted(path.glob("*.safetensors")):
        tensors = load_file(f)
        out: dict[str, torch.Tensor] = {}
        for k, v in tensors.items():
            module = k.removesuffix(".weight")
            if v.ndim == 2 and quantize(k) and not any(module == m or module.endswith("." + m) for m in skip):
                q, s = quant(v, block)
                out[k], out[module + ".weight_scale_inv"] = q, s
                if index is not None:
                    index["weight_map"][module + ".weight_scale_inv"] = f.name
                done += 1
            else:
                out[k] = v
        save_file(out, f, metadata={"format": "pt"})
    if not done:
        raise ValueError(f"{path}: no weight to quantize")
    if index is not None:
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True))
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    if modules_to_not_convert:
        cfg["quantization_config"]["modules_to_not_convert"] = list(modules_to_not_convert)
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return path


def read_fp8_base(path: Path) -> tuple[dict[str, torch.Tensor], tuple[int, int], dict]:
    """The checkpoint's tensors (by on-disk name), its block and its config.json."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    cfg = json.loads((path / "config.json").read_text())
    return tensors, tuple(cfg["quantization_config"]["weight_block_size"]), cfg


def reference_dequantized(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``dequantize_blocks`` on every weight with a ``weight_scale_inv``; other float tensors cast to dtype
    (as transformers does); by on-disk name, scales dropped."""
    tensors, block, _ = read_fp8_base(path)
    out = {}
    for k, v in tensors.items():
        if k.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(k.removesuffix("weight") + "weight_scale_inv") if k.endswith(".weight") else None
        out[k] = dequantize_blocks(v, scale, block, dtype) if scale is not None else v.to(dtype)
    return out


def _load_dequantized(path: Path, dtype: torch.dtype):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=tf.FineGrainedFP8Config(dequantize=True), dtype=dtype, device_map="cpu"
    ).eval()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def transformers_dequantized(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The oracle for loractl's dequantization: transformers loads the FP8 checkpoint with
    ``FineGrainedFP8Config(dequantize=True)`` on CPU; its state dict (model names: MoE experts fused).
    Exact only where ``transformers_derives_block`` holds for every quantized weight: transformers 5.24
    mis-scales a partial last block when the dim divides by the grid (200 rows, grid 2: blocks of 100)
    and raises otherwise (ValueError "not divisible by scale grid", as a RuntimeError from from_pretrained)."""
    return _state(_load_dequantized(path, dtype))


def peft_merged_on_dequantized(path: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The oracle for the merge: PEFT's ``merge_and_unload`` on the model transformers dequantized."""
    import peft

    model = _load_dequantized(path, dtype)
    return _state(peft.PeftModel.from_pretrained(model, adapter).merge_and_unload())


def peft_merged_on_reference(path: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's ``merge_and_unload`` on the reference dequantization (a dense copy of the checkpoint loaded by
    transformers): the merge oracle for shapes transformers' dequantization gets wrong."""
    import peft
    import transformers as tf
    from safetensors.torch import save_file

    _, _, cfg = read_fp8_base(path)
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp)
        cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        (dense / "config.json").write_text(json.dumps(cfg))
        save_file(reference_dequantized(path, dtype), dense / "model.safetensors", metadata={"format": "pt"})
        model = tf.AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, device_map="cpu").eval()
        return _state(peft.PeftModel.from_pretrained(model, adapter).merge_and_unload())


def save_requantized(base: Path, merged: dict[str, torch.Tensor], out: Path) -> Path:
    """Write ``merged`` (by on-disk name) in ``base``'s FP8 layout: every weight the base has a
    ``weight_scale_inv`` for is requantized with ``quantize_blocks`` in the base's block, the others are cast
    to the base's dtype for them; config.json (quantization_config included) copied unchanged."""
    from safetensors.torch import save_file

    tensors, block, _ = read_fp8_base(base)
    out = Path(out)
    out.mkdir(parents=True)
    written: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.endswith(".weight_scale_inv"):
            continue
        scale_key = k.removesuffix("weight") + "weight_scale_inv"
        if scale_key in tensors:
            written[k], written[scale_key] = quantize_blocks(merged[k].to(torch.float32), block)
        else:
            written[k] = merged[k].to(v.dtype).contiguous()
    save_file(written, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(Path(base) / "config.json", out / "config.json")
    return out


# ---- compressed-tensors (vLLM llm-compressor) FP8 ------------------------------------------------------------


def save_ct_fp8_base(
    model, path: Path, scheme: str = "FP8_BLOCK", block: tuple[int, int] | None = None, ignore=("lm_head",)
) -> Path:
    """Save ``model`` as llm-compressor does, with compressed-tensors itself (needs the package): preset
    ``scheme`` ("FP8_BLOCK": block [128, 128] or ``block``; "FP8_DYNAMIC": per channel; "FP8": per tensor, static
    ``input_scale`` set to 1) on every Linear but ``ignore``; scales from a min/max observer and
    compressed-tensors' ``calculate_qparams`` (scale = amax / 448 in the weight's dtype), weights compressed by
    its own compressor ("float-quantized"), config.json written by ``ModelCompressor.update_config``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils.helpers import (
        calculate_qparams,
        maybe_pad_tensor_for_block_quant,
    )

    qscheme = preset_name_to_scheme(scheme, ["Linear"])
    if block is not None:
        qscheme.weights.block_structure = list(block)
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": qscheme}, ignore=list(ignore))
    )
    with torch.no_grad():
        for _, mod in model.named_modules():
            if not hasattr(mod, "weight_scale"):
                continue
            w, args = mod.weight.data, mod.quantization_scheme.weights
            if args.strategy == "block":
                b = tuple(args.block_structure)
                wp = maybe_pad_tensor_for_block_quant(w, b)
                tiles = wp.reshape(wp.shape[0] // b[0], b[0], wp.shape[1] // b[1], b[1])
                lo, hi = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
            elif args.strategy == "channel":
                lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
            elif args.strategy == "tensor":
                lo, hi = w.amin(), w.amax()
            else:
                raise ValueError(f"unsupported weight strategy {args.strategy}")
            scale, _ = calculate_qparams(lo, hi, args)
            mod.weight_scale.copy_(scale.reshape(mod.weight_scale.shape))
            if hasattr(mod, "input_scale"):
                mod.input_scale.fill_(1.0)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    path = Path(path)
    model.save_pretrained(path)
    compressor.update_config(path)
    return path


def ct_decompressed(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The oracle for compressed-tensors FP8: transformers loads with ``CompressedTensorsConfig(dequantize=True)``
    (compressed-tensors' own ``decompress`` per module) on CPU."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=tf.CompressedTensorsConfig(dequantize=True), dtype=dtype, device_map="cpu"
    )
    return _state(model)


def reference_ct_dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """compressed-tensors' rule: ``q.to(scale.dtype) * scale`` computed in the scale's dtype (bf16 for a bf16
    model), then cast to dtype. ``scale`` is [1] (tensor), [out, 1] (channel) or the block grid (``block``)."""
    rows, cols = q.shape
    if block is not None:
        s = expand_scale(scale, (rows, cols), block)
    else:
        s = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1)
    return (q.to(scale.dtype) * s).to(dtype)
