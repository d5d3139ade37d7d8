#!/usr/bin/env python
"""Benchmark ``loractl merge`` against ``cp -rL`` and PEFT's ``merge_and_unload`` on a Llama-shaped model
(or a Mixtral-shaped mixture of experts).

Run:  python benchmarks/merge.py [--size 1b|7b|moe] [--fp8] [--repeat N] [--workdir DIR] [--skip-peft] [--json FILE]

It builds, from seeds, a bf16 base model in the transformers layout (shards, index, config.json)
and a PEFT rank-16 all-linear adapter (``--size moe``: a Mixtral-shaped base of 3 GB, 8 experts per
layer saved per expert as Mixtral checkpoints are, and a PEFT adapter on the attention's q/v projections
and on the experts' ``gate_up_proj`` / ``down_proj`` parameters, ``target_parameters``, rank 16 per
expert), then times, each in its own subprocess under
``/usr/bin/time -v`` (wall clock and peak RSS), interleaved, ``--repeat`` times:

* ``cp -rL base out``                      (the floor: copying the bytes through the page cache)
* ``cp -rL base out && sync``             (the same, made durable: loractl fsyncs what it writes)
* ``loractl merge base adapter -o out --no-receipt``
* ``loractl merge base adapter -o out``    (with the receipt, the default)
* PEFT: from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  (1b and moe only, unless ``--peft-7b``)

and prints a table (median and min seconds, ratio to cp, peak RSS), the speedup of loractl over
PEFT, the receipt's size and the machine. See benchmarks/README.md for how to read it.

``--fp8``: the same shapes and values in transformers' block-scaled FP8 layout (benchmarks/_fp8.py);
loractl dequantizes and merges to bf16 (and, timed too, ``--requantize``), PEFT's path is transformers'
``FineGrainedFP8Config(dequantize=True)`` + ``merge_and_unload`` + ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import _fp8
from _common import Case, cpu_and_ram, export_ref, peft_config, remove, timed

# --------------------------------------------------------------------------------------------
# model shapes
# --------------------------------------------------------------------------------------------
SIZES = {
    # TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T)
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    # Llama-2-7b-hf
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    # Mixtral layout (8 experts, top-2), scaled down to 3.0 GB: 1.5 B parameters, 94 % of them in experts
    "moe": dict(
        hidden_size=1024,
        intermediate_size=2304,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: --size moe: a LoRA on the attention's q and v projections (target_modules) and on every expert
#: (target_parameters: PEFT's ParamWrapper, lora_A [r·E, in], lora_B [out, r·E])
MOE_MODULES = ["q_proj", "v_proj"]
MOE_PARAMETERS = ["gate_up_proj", "down_proj"]
RANK, ALPHA = 16, 32
BLOCK_ELEMENTS = 16_777_213  # a prime just under 2**24: its period never lines up with a row length
BF16 = 2


def tensor_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """The base's tensors in module order (the order transformers' save_pretrained shards them in)."""
    c = SIZES[size]
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
        ]
        if size == "moe":  # Mixtral's checkpoint layout: router and per-expert w1 (gate), w3 (up), w2 (down)
            e_count = c["num_local_experts"]
            out.append((p + "block_sparse_moe.gate.weight", (e_count, h)))
            for e in range(e_count):
                x = f"{p}block_sparse_moe.experts.{e}."
                out += [(x + "w1.weight", (i, h)), (x + "w2.weight", (h, i)), (x + "w3.weight", (i, h))]
        else:
            out += [
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def adapter_shapes(size: str) -> list[tuple[str, int, int]]:
    """(module name, in features, out features) of every targeted linear layer; ``--size moe``: PEFT's key
    prefix of every LoRA (the experts' gate_up_proj is the inner wrapper, ``experts.base_layer``), with
    ``out`` the rows of lora_B and ``in`` the columns of lora_A (r·E rows / columns for the experts)."""
    shapes = dict(tensor_shapes(size))
    mods = []
    if size == "moe":
        c = SIZES[size]
        h, i = c["hidden_size"], c["intermediate_size"]
        for n in range(c["num_hidden_layers"]):
            p = f"model.layers.{n}."
            for t in MOE_MODULES:
                out_f, in_f = shapes[f"{p}self_attn.{t}.weight"]
                mods.append((f"{p}self_attn.{t}", in_f, out_f))
            mods += [(f"{p}mlp.experts.base_layer", h, 2 * i), (f"{p}mlp.experts", i, h)]
        return mods
    for n in range(SIZES[size]["num_hidden_layers"]):
        for t in TARGETS:
            sub = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{n}.{sub}.{t}"
            out_f, in_f = shapes[name + ".weight"]
            mods.append((name, in_f, out_f))
    return mods


# --------------------------------------------------------------------------------------------
# building the base, streaming (one tensor's bytes at a time, never the model)
# --------------------------------------------------------------------------------------------
def random_block(seed: int):
    """One block of bf16 normals × 0.02, made once; every tensor is this block tiled with its own roll."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BLOCK_ELEMENTS, generator=g) * 0.02).to(torch.bfloat16)


def roll_of(seed: int, name: str) -> int:
    d = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(d[:8], "little") % BLOCK_ELEMENTS


def safetensors_header(entries: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """8-byte little-endian length + JSON header (bf16 tensors in the given order), space-padded to 8."""
    header: dict[str, object] = {"__metadata__": metadata}
    off = 0
    for name, shape in entries:
        n = math.prod(shape) * BF16
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def write_tensor(
    fd: int, block_bytes: memoryview, name: str, shape: tuple[int, ...], seed: int, block
) -> None:
    """Write the tensor's bytes: the block from a per-tensor offset, wrapping around, until full.

    1-D tensors (RMSNorm weights) are 1 + the block's values, as norms are near 1 in real models.
    """
    import torch

    n = math.prod(shape)
    start = roll_of(seed, name)
    if len(shape) == 1:
        idx = (torch.arange(n) + start) % BLOCK_ELEMENTS
        write_all(fd, (block[idx].float() + 1).to(torch.bfloat16).view(torch.uint8).numpy())
        return
    left, pos = n * BF16, start * BF16
    total = BLOCK_ELEMENTS * BF16
    while left:
        chunk = min(left, total - pos)
        write_all(fd, block_bytes[pos : pos + chunk])
        left -= chunk
        pos = (pos + chunk) % total


def shard_plan(size: str, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy in module order, like transformers' split of the state dict; within a shard sorted by name
    (safetensors' own serializer sorts tensors of one dtype by name)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensor_shapes(size):
        n = math.prod(shape) * BF16
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    return [sorted(s) for s in shards]


def llama_config(size: str):
    """The config.json of a base of this size (``moe``: Mixtral's)."""
    from transformers import LlamaConfig, MixtralConfig

    cls, arch = (MixtralConfig, "MixtralForCausalLM") if size == "moe" else (LlamaConfig, "LlamaForCausalLM")
    return cls(
        **SIZES[size],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=[arch],
        dtype="bfloat16",
    )


def build_base(folder: Path, size: str, seed: int, max_shard_bytes: int, fp8: bool = False) -> dict:
    import torch

    if fp8:
        return _fp8.build_fp8_base(
            folder, tensor_shapes(size), seed, max_shard_bytes, random_block(seed), roll_of, write_tensor,
            llama_config(size),
        )
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    block = random_block(seed)
    block_bytes = memoryview(block.view(torch.uint8).numpy()).cast("B")
    shards = shard_plan(size, max_shard_bytes)
    weight_map, total, params = {}, 0, 0
    for k, entries in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        fd = os.open(folder / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, safetensors_header(entries, {"format": "pt"}))
            for name, shape in entries:
                write_tensor(fd, block_bytes, name, shape, seed, block)
                weight_map[name] = fname
                total += math.prod(shape) * BF16
                params += math.prod(shape)
        finally:
            os.close(fd)
    index = {
        "metadata": {"total_parameters": params, "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    llama_config(size).save_pretrained(folder)
    return {"seconds": time.perf_counter() - t0, "bytes": total, "parameters": params, "shards": len(shards)}


def build_adapter(folder: Path, size: str, seed: int, base: Path) -> dict:
    """A PEFT rank-16 LoRA on every linear layer of every block, fp32, seeded, non-zero.

    A ~ N(0, 1/in) (kaiming-like), B ~ N(0, 0.005²): with s = 32/16 = 2 the update is a few percent
    of the base weights, so most bf16 values change on merge, as with a trained adapter.
    ``--size moe``: the expert LoRAs hold rank 16 per expert (lora_A [16·E, in], lora_B [out, 16·E]).
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name, in_f, out_f in adapter_shapes(size):
        key = f"base_model.model.{name}"
        r = RANK * (SIZES[size]["num_local_experts"] if ".experts" in name else 1)
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.005
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    if size == "moe":
        config = peft_config(RANK, ALPHA, MOE_MODULES, str(base))
        config["target_parameters"] = MOE_PARAMETERS
    else:
        config = peft_config(RANK, ALPHA, TARGETS, str(base))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"modules": len(tensors) // 2, "bytes": (folder / "adapter_model.safetensors").stat().st_size}


# --------------------------------------------------------------------------------------------
# the PEFT path, run as `python benchmarks/merge.py --peft-worker BASE ADAPTER OUT`
# --------------------------------------------------------------------------------------------
def peft_worker(base: str, adapter: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def warm(base: Path) -> float:
    """One untimed `cat base/* > /dev/null`, so every timed run starts with the base in the page cache."""
    t0 = time.perf_counter()
    files = sorted(str(f) for f in base.iterdir() if f.is_file())
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *files], stdout=null, check=True)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# checking loractl's output against PEFT's, tensor by tensor
# --------------------------------------------------------------------------------------------
def tensor_digests(folder: Path) -> dict[str, str]:
    """Each tensor of a merged folder (its dtype, shape and sha256 of its bytes), by name."""
    import hashlib

    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                out[k] = f"{t.dtype}{tuple(t.shape)}:{hashlib.sha256(raw).hexdigest()}"
    return out


def compare_digests(a: dict[str, str], b: dict[str, str]) -> dict:
    """:func:`compare` from two :func:`tensor_digests`."""
    common = sorted(set(a) & set(b))
    differ = [k for k in common if a[k] != b[k]]
    return {
        "equal": len(common) - len(differ),
        "differ": differ[:10],
        "n_differ": len(differ),
        "missing": sorted(set(a) ^ set(b))[:10],
    }


def compare(a: Path, b: Path) -> dict:
    """Bitwise comparison of every tensor of folder ``a`` with the same-named tensor of folder ``b``."""
    import torch
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    wa, wb = where(a), where(b)
    equal, differ, missing = 0, [], sorted(set(wa) ^ set(wb))
    for name in sorted(set(wa) & set(wb)):
        with safe_open(wa[name], "pt") as fa, safe_open(wb[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if (
            x.dtype == y.dtype
            and x.shape == y.shape
            and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        ):
            equal += 1
        else:
            differ.append(name)
    return {"equal": equal, "differ": differ[:10], "n_differ": len(differ), "missing": missing[:10]}


# --------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------
def machine_info(workdir: Path) -> dict:
    info: dict[str, object] = {"nproc": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    info.update(cpu_and_ram())
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("torch", "transformers", "peft", "safetensors", "loractl"):
        try:
            info[mod] = version(mod)  # not imported: importing peft prints warnings
        except PackageNotFoundError:
            info[mod] = None
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    try:
        df = (
            subprocess.run(["df", "-PT", str(workdir)], capture_output=True, text=True)
            .stdout.splitlines()[-1]
            .split()
        )
        info["workdir_fs"] = f"{df[1]} on {df[0]}"
    except (OSError, IndexError):
        pass
    return info


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time loractl merge against cp -rL and PEFT merge_and_unload on a Llama-shaped bf16 model.",
        epilog="See benchmarks/README.md for how to read the output.",
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="1b",
        help="1b: TinyLlama-1.1B shapes; 7b: Llama-2-7B; moe: Mixtral-shaped, 8 experts, 3 GB, expert + attention LoRA.",
    )
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each command; the median is reported")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "loractl-bench",
        help="where the base, adapter and outputs go (default /tmp/loractl-bench); needs ~3x the base size",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the workdir (and reuse its base on the next run)"
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="the base in block-scaled FP8 (transformers' quant_method fp8, blocks of 128); loractl merges "
        "to bf16 (and --requantize), PEFT's path dequantizes with transformers",
    )
    p.add_argument("--skip-peft", action="store_true", help="do not time the PEFT path")
    p.add_argument(
        "--peft-7b", action="store_true", help="time the PEFT path for --size 7b too (~14+ GB RAM, slow)"
    )
    p.add_argument(
        "--no-verify", action="store_true", help="do not compare loractl's output with PEFT's bit for bit"
    )
    p.add_argument(
        "--shard-size", default="1GB", help="base shard size, decimal as in transformers (default 1GB)"
    )
    p.add_argument(
        "--loractl-ref",
        metavar="REF",
        action="append",
        help="time the loractl package of this git commit (e.g. HEAD) instead of the installed one; "
        "repeat it to time several commits in the same run (e.g. before and after a change)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also save every number to this JSON file")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", args.shard_size.strip(), re.I)
    if not m:
        p.error(f"cannot read --shard-size {args.shard_size!r}")
    args.shard_bytes = int(float(m[1]) * 1000 ** " KMG".index((m[2] or " ").upper()))
    return args


def same_spec(stamp: Path, spec: dict) -> bool:
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return {k: saved.get(k) for k in spec} == spec


def loractl_cmd(ref: str | None, work: Path) -> tuple[list[str], dict[str, str] | None, str]:
    """The command that runs ``loractl``, its environment, and a description of which code it is.

    With ``ref``, the ``loractl`` package of that git commit of this repository is exported to the
    workdir and run from there, so a working tree that others edit during the run cannot change the
    code under test midway.
    """
    if ref is None:
        exe = shutil.which("loractl", path=os.path.dirname(sys.executable)) or shutil.which("loractl")
        return ([exe] if exe else [sys.executable, "-m", "loractl"]), None, "installed loractl"
    sha, src = export_ref(ref, work)
    env = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    where = subprocess.run(
        [sys.executable, "-c", "import loractl; print(loractl.__file__)"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not where.startswith(str(src)):
        raise SystemExit(
            f"--loractl-ref: the export in {src} is not the loractl that gets imported ({where})"
        )
    return [sys.executable, "-m", "loractl"], env, f"loractl at {ref} ({sha[:12]}, from {src})"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    size = args.size
    base_bytes = sum(math.prod(s) * BF16 for _, s in tensor_shapes(size))
    out_bytes_est = base_bytes
    if args.fp8:
        base_bytes = _fp8.nbytes(_fp8.fp8_entries(tensor_shapes(size)))
    run_peft = not args.skip_peft and (size in ("1b", "moe") or args.peft_7b)
    verify = run_peft and not args.no_verify

    work: Path = args.workdir.resolve()
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{size}-fp8" if args.fp8 else size
    base, adapter, logs = work / f"base-{tag}", work / f"adapter-{size}", work / "bench-logs"
    stamp = work / f"base-{tag}.json"
    spec = {
        "size": size,
        "fp8": args.fp8,
        "seed": args.seed,
        "shard_bytes": args.shard_bytes,
        "block": BLOCK_ELEMENTS,
        "version": 1,
    }
    outputs = [work / n for n in ("out_cp", "out_cp_sync", "out_loractl", "out_loractl_receipt", "out_peft")]

    reuse = base.exists() and adapter.exists() and stamp.exists() and same_spec(stamp, spec)
    have = shutil.disk_usage(work).free + (base_bytes if reuse else 0)
    need = out_bytes_est * (2 if verify else 1) + base_bytes + (0 if reuse else base_bytes)
    if have < need * 1.05:
        raise SystemExit(
            f"{work}: {have / 1e9:.1f} GB free, this benchmark needs about {need / 1e9:.1f} GB; use --workdir elsewhere"
        )

    try:
        logs.mkdir(exist_ok=True)
        for o in outputs:
            remove(o)
        print(f"workdir {work}  ({shutil.disk_usage(work).free / 1e9:.0f} GB free)", flush=True)
        if reuse:
            print(f"reusing base {base} and adapter {adapter} (same seed and shapes)", flush=True)
            build = json.loads(stamp.read_text()).get("build", {})
        else:
            for p in (base, adapter, stamp):
                remove(p)
            kind = "FP8 blocks of 128" if args.fp8 else "bf16"
            print(f"building {size} base ({base_bytes / 1e9:.2f} GB {kind}, streamed) ...", flush=True)
            b = build_base(base, size, args.seed, args.shard_bytes, fp8=args.fp8)
            a = build_adapter(adapter, size, args.seed, base)
            build = {"base": b, "adapter": a}
            stamp.write_text(json.dumps({**spec, "build": build}))
            print(
                f"  {b['parameters'] / 1e9:.3f} B parameters in {b['shards']} shards, {b['seconds']:.1f}s; "
                f"adapter {a['modules']} modules, {a['bytes'] / 1e6:.1f} MB",
                flush=True,
            )

        warm_s = warm(base)
        print(
            f"warm-up: cat base/* > /dev/null took {warm_s:.1f}s (page caches are not dropped: warm-cache timings)",
            flush=True,
        )

        refs = args.loractl_ref or [None]
        codes = [loractl_cmd(ref, work) for ref in refs]
        envs: dict[str, dict[str, str] | None] = {}
        lc_what = "; ".join(what for _, _, what in codes)
        print(f"timing {lc_what}", flush=True)
        cases: list[tuple[Case, list[str], Path]] = [
            (Case("cp -rL", key="cp"), ["cp", "-rL", str(base), str(outputs[0])], outputs[0]),
            (
                Case("cp -rL && sync", key="cp_sync"),
                ["sh", "-c", 'cp -rL "$0" "$1" && sync', str(base), str(outputs[1])],
                outputs[1],
            ),
        ]
        for i, (ref, (lc, lc_env, _)) in enumerate(zip(refs, codes)):
            tag = "" if len(refs) == 1 else f" @{ref}"
            suffix = "" if i == 0 else f"_{i}"
            variants = [
                ("loractl", "loractl merge --no-receipt", ["--no-receipt"], outputs[2]),
                ("loractl_receipt", "loractl merge (receipt)", [], outputs[3]),
            ]
            if args.fp8:
                variants.append(
                    ("loractl_requantize", "loractl merge --requantize --no-receipt",
                     ["--requantize", "--no-receipt"], work / "out_loractl_requantize")
                )
            for key, label, extra, out in variants:
                envs[key + suffix] = lc_env
                out_i = out if i == 0 else out.with_name(f"{out.name}{suffix}")
                cases.append(
                    (
                        Case(label + tag, key=key + suffix),
                        [*lc, "merge", str(base), str(adapter), "-o", str(out_i), *extra, "-q"],
                        out_i,
                    )
                )
                if out_i not in outputs:
                    outputs.append(out_i)
        if run_peft:
            cases.append(
                (
                    Case("PEFT merge_and_unload", key="peft"),
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--peft-worker-fp8" if args.fp8 else "--peft-worker",
                        str(base),
                        str(adapter),
                        str(outputs[4]),
                    ],
                    outputs[4],
                )
            )

        receipt_bytes: int | None = None
        out_bytes: dict[str, int] = {}
        digests: dict[str, dict[str, str]] = {}
        verification: dict | None = None
        for r in range(args.repeat):
            last = r == args.repeat - 1
            for case, cmd, out in cases:
                run = timed(
                    cmd,
                    logs / f"{case.key}-{r}.log",
                    work,
                    envs.get(case.key),
                )
                case.runs.append(run)
                print(
                    f"  [{r + 1}/{args.repeat}] {case.label:<28} {run.seconds:8.2f}s  "
                    f"peak RSS {(run.peak_rss_kib or 0) / 1024:6.0f} MiB  (load {run.load1:.1f})",
                    flush=True,
                )
                out_bytes[case.key] = folder_bytes(out)
                if case.key.startswith("loractl_receipt") and (out / "loractl.receipt").exists():
                    receipt_bytes = (out / "loractl.receipt").stat().st_size
                if last and len(refs) > 1 and case.key.startswith("loractl"):
                    digests[case.key] = tensor_digests(out)  # not the outputs: 7B ones would fill the disk
                if not (last and verify and case.key in ("loractl", "peft")):
                    remove(out)
        if verify:
            print("comparing loractl's merged tensors with PEFT's, bit for bit ...", flush=True)
            verification = compare(outputs[2], outputs[4])
        if len(refs) > 1:  # the same output bits from every commit timed
            for c, _, _out in cases:
                if c.key.startswith("loractl") and c.key not in ("loractl", "loractl_receipt"):
                    first = "loractl_receipt" if "receipt" in c.key else "loractl"
                    same = compare_digests(digests[first], digests[c.key])
                    print(
                        f"  {c.label}: {same['equal']} tensors bit-identical to the first commit's, {same['n_differ']} differ",
                        flush=True,
                    )
        for o in outputs:
            remove(o)

        info = machine_info(work)
        info["loractl_code"] = lc_what
        report(
            size,
            base_bytes,
            build,
            [c for c, _, _ in cases],
            receipt_bytes,
            out_bytes,
            verification,
            info,
            args,
        )
        if args.json:
            doc = {
                "size": size,
                "fp8": args.fp8,
                "repeat": args.repeat,
                "spec": spec,
                "base_bytes": base_bytes,
                "build": build,
                "warmup_seconds": warm_s,
                "cases": {
                    c.key: {
                        "label": c.label,
                        "median_s": c.median,
                        "min_s": c.min,
                        "ratio_to_cp": c.median / cases[0][0].median,
                        "peak_rss_mib": c.peak_rss_mib,
                        "runs": [asdict(x) for x in c.runs],
                    }
                    for c, _, _ in cases
                },
                "receipt_bytes": receipt_bytes,
                "output_bytes": out_bytes,
                "verification": verification,
                "loractl_code": lc_what,
                "machine": info,
            }
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"numbers saved to {args.json}")
    finally:
        for o in outputs:
            if o.exists():
                remove(o)
        if not args.keep:
            if created:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for p in (base, adapter, stamp, logs, work / "loractl-src"):
                    remove(p) if p.exists() else None
    return 0


def report(size, base_bytes, build, cases, receipt_bytes, out_bytes, verification, info, args) -> None:
    by = {c.key: c for c in cases}
    cp = by["cp"].median
    print()
    kind = "FP8 (blocks of 128, merged to bf16)" if args.fp8 else "bf16"
    print(f"loractl merge benchmark: {size} ({base_bytes / 1e9:.2f} GB {kind} base), median of {args.repeat}")
    print()
    w = max(30, *(len(c.label) + 1 for c in cases))
    head = f"{'what':<{w}} {'median s':>9} {'min s':>8} {'× cp':>6} {'× cp+sync':>9} {'peak RSS MiB':>12} {'CPU s':>7}"
    print(head)
    print("-" * len(head))
    for c in cases:
        cpu = [r.user_s + r.sys_s for r in c.runs if r.user_s is not None and r.sys_s is not None]
        cpu_s = f"{statistics.median(cpu):7.1f}" if cpu else f"{'-':>7}"
        print(
            f"{c.label:<{w}} {c.median:9.2f} {c.min:8.2f} {c.median / cp:6.2f} "
            f"{c.median / by['cp_sync'].median:9.2f} {c.peak_rss_mib:12.0f} {cpu_s}"
        )
    print()
    if "peft" in by:
        for k, c in by.items():
            if k.startswith("loractl"):
                print(f"speedup {c.label} vs PEFT: {by['peft'].median / c.median:.1f}×")
    else:
        print("PEFT path not timed" + (" (pass --peft-7b)" if size == "7b" and not args.skip_peft else ""))
    if receipt_bytes is not None:
        print(f"receipt: {receipt_bytes / 1e6:.1f} MB ({100 * receipt_bytes / base_bytes:.2f}% of the base)")
    if verification is not None:
        n = verification["equal"] + verification["n_differ"]
        ok = verification["n_differ"] == 0 and not verification["missing"]
        print(
            f"loractl vs PEFT output: {verification['equal']}/{n} tensors bit-identical"
            + ("" if ok else f"; differ: {verification['differ']} missing: {verification['missing']}")
        )
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info.get('ram_gib')} GiB RAM, "
        f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, "
        f"{info['loractl_code']} (version {info['loractl']}), "
        f"workdir {info.get('workdir_fs', '?')}, load average {info['load_average']}"
    )
    sync = by["cp_sync"].median if "cp_sync" in by else None
    if size == "moe":  # issue #13: against cp && sync (loractl's output is durable)
        lines = [
            f"loractl {flag} ≤ 2× cp+sync: {by[key].median / by['cp_sync'].median:.2f}×"
            for key, flag in (("loractl", "--no-receipt"), ("loractl_receipt", "(receipt)"))
            if key in by
        ]
    else:
        target = {"1b": 2.5, "7b": 1.5}[size]
        lines = [
            f"loractl {flag} ≤ {target}× cp: {by[key].median / cp:.2f}×"
            + (f" ({by[key].median / sync:.2f}× cp+sync)" if sync else "")
            for key, flag in (("loractl", "--no-receipt"), ("loractl_receipt", "(receipt)"))
            if key in by
        ]
    if size in ("1b", "moe") and "peft" in by:
        lines.append(f"≥ 5× faster than PEFT: {by['peft'].median / by['loractl'].median:.1f}×")
    lines.append(
        f"peak RSS ≤ 1 GiB: {max(by['loractl'].peak_rss_mib, by['loractl_receipt'].peak_rss_mib):.0f} MiB"
    )
    print("targets: " + "; ".join(lines))
    print(
        "notes: peak RSS from /usr/bin/time counts touched mmap'd file pages (safetensors/transformers mmap"
        " the base); loractl reads with pread, so its RSS is real memory. loractl fsyncs its output, cp and"
        " PEFT do not: compare loractl with 'cp -rL && sync' for equal durability."
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peft-worker":
        peft_worker(*sys.argv[2:])
        sys.exit(0)
    if len(sys.argv) == 5 and sys.argv[1] == "--peft-worker-fp8":
        _fp8.peft_worker_fp8(*sys.argv[2:])
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
