"""The FP8 variant of ``merge.py`` (``--fp8``): the same-shape base in transformers' block-scaled FP8
layout (DeepSeek-V3 / Qwen3-FP8: ``quant_method: "fp8"``, ``weight_block_size`` [128, 128]), and the
PEFT path that dequantizes it with transformers.

Every linear weight of the blocks (``*_proj.weight``) is quantized from the very bf16 values the dense
base holds, with DeepSeek-V3's ``weight_quant`` rule (per 128x128 block ``s = amax / 448`` in float32,
``q = fp8(w / s)``), and stored as ``F8_E4M3`` with its float32 ``weight_scale_inv``
[out/128, in/128] beside it, in the same shard; embeddings, norms and ``lm_head`` stay bf16, as in
DeepSeek-V3. Every dimension of these shapes is a multiple of 128, so transformers' dequantization
is exact and its merge is the oracle loractl's output is compared with.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from pathlib import Path

BLOCK = (128, 128)
FP8_MAX = 448.0
QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": list(BLOCK),
}
_SIZE = {"BF16": 2, "F8_E4M3": 1, "F32": 4}


def quantized(name: str, shape: tuple[int, ...]) -> bool:
    """What block-scaled FP8 checkpoints quantize: the projections, MoE experts' included (Mixtral's
    ``experts.<e>.w1/w2/w3``); not embeddings, norms, lm_head or the router."""
    expert = re.search(r"experts\.\d+\.w[123]\.weight$", name) is not None
    return (name.endswith("_proj.weight") or expert) and len(shape) == 2


def fp8_entries(shapes: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor of the FP8 base, in module order, each scale after its weight."""
    out = []
    for name, shape in shapes:
        if quantized(name, shape):
            rows, cols = shape
            assert rows % BLOCK[0] == 0 and cols % BLOCK[1] == 0, (name, shape)
            out.append((name, "F8_E4M3", shape))
            out.append((name + "_scale_inv", "F32", (rows // BLOCK[0], cols // BLOCK[1])))
        else:
            out.append((name, "BF16", shape))
    return out


def nbytes(entries: list[tuple[str, str, tuple[int, ...]]]) -> int:
    return sum(math.prod(s) * _SIZE[d] for _, d, s in entries)


def _header(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * _SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def values(block, name: str, n: int, seed: int, roll_of):
    """The first ``n`` values of the dense base's tensor ``name`` (its block from its own offset)."""
    import torch

    start, total = roll_of(seed, name), block.numel()
    parts, left = [], n
    while left:
        take = min(left, total - start)
        parts.append(block[start : start + take])
        left -= take
        start = 0
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def quantize(w):
    """DeepSeek-V3's ``weight_quant`` on a [rows, cols] tensor whose dims are multiples of the block."""
    import torch

    rows, cols = w.shape
    gr, gc = rows // BLOCK[0], cols // BLOCK[1]
    tiles = w.to(torch.float32).reshape(gr, BLOCK[0], gc, BLOCK[1])
    amax = tiles.abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / s[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(rows, cols), s


def build_fp8_base(
    folder: Path, shapes, seed: int, max_shard_bytes: int, block, roll_of, write_tensor, config
) -> dict:
    """Write the FP8 base: shards (greedy in module order, a weight and its scale together), index,
    config.json with ``quantization_config``. One tensor in memory at a time."""
    import torch

    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    block_bytes = memoryview(block.view(torch.uint8).numpy()).cast("B")
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = []
    for e in fp8_entries(shapes):
        if e[0].endswith("_scale_inv"):
            groups[-1].append(e)
        else:
            groups.append([e])
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    used = 0
    for g in groups:
        n = nbytes(g)
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].extend(g)
        used += n
    weight_map, params = {}, 0
    for k, entries in enumerate(shards):
        entries = sorted(entries)
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        fd = os.open(folder / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, _header(entries))
            scales = {}
            for name, dtype, shape in entries:
                weight_map[name] = fname
                if dtype == "BF16":
                    write_tensor(fd, block_bytes, name, shape, seed, block)
                    params += math.prod(shape)
                    continue
                if dtype == "F8_E4M3":
                    q, s = quantize(values(block, name, math.prod(shape), seed, roll_of).reshape(shape))
                    scales[name + "_scale_inv"] = s
                    _write_all(fd, q.view(torch.uint8).numpy())
                    params += math.prod(shape)
                    continue
                # a scale sorts after its weight (name + "_scale_inv" > name): computed with it
                _write_all(fd, scales.pop(name).contiguous().view(torch.uint8).numpy())
        finally:
            os.close(fd)
    total = nbytes([e for s in shards for e in s])
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = QUANTIZATION_CONFIG
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return {"seconds": time.perf_counter() - t0, "bytes": total, "parameters": params, "shards": len(shards)}


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def peft_worker_fp8(base: str, adapter: str, out: str) -> None:
    """transformers dequantizes the FP8 base to bf16 (``FineGrainedFP8Config(dequantize=True)``, what
    it does on a machine without a GPU), PEFT merges, transformers saves (bf16, no quantization_config)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.bfloat16, quantization_config=FineGrainedFP8Config(dequantize=True)
    )
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out)
