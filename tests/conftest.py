"""Shared factories: tiny transformers models from small configs and PEFT adapters with seeded weights.

Nothing is downloaded: every model is built from a config with seeded random weights, a few KB each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _config(arch: str, **over: Any):
    import transformers as tf

    if arch == "llama":
        kw = dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=96,
            tie_word_embeddings=False,
        )
        kw.update(over)
        return tf.LlamaConfig(**kw)
    if arch == "bert":
        kw = dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=96
        )
        kw.update(over)
        return tf.BertConfig(**kw)
    if arch == "gpt2":
        kw = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
        kw.update(over)
        return tf.GPT2Config(**kw)
    raise ValueError(arch)


def build_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **over: Any):
    """A tiny transformers model with seeded random weights (every parameter, not just the init)."""
    import transformers as tf

    cls = {"llama": tf.LlamaForCausalLM, "bert": tf.BertModel, "gpt2": tf.GPT2LMHeadModel}[arch]
    torch.manual_seed(seed)
    model = cls(_config(arch, **over))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype).eval()


def save_base(model, path: Path, max_shard_size: str | None = None) -> Path:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return path


def make_adapter(
    model, path: Path, seed: int = 1, dora_jitter: bool = True, std: float = 0.3, **lora: Any
) -> Path:
    """Attach a PEFT LoRA to (a copy of) ``model``, give every adapter tensor seeded non-zero values, save it."""
    import copy

    import peft

    m = copy.deepcopy(model).float()
    pm = peft.get_peft_model(m, peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                if dora_jitter:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pm.save_pretrained(path)
    readme = path / "README.md"
    if readme.exists():
        readme.unlink()
    return path


def peft_merged(base_dir: Path, adapters: list[Path], dtype: torch.dtype, arch: str):
    """PEFT's own merge: from_pretrained, PeftModel.from_pretrained (+ load_adapter), merge_and_unload."""
    import peft
    import transformers as tf

    cls = {"llama": tf.LlamaForCausalLM, "bert": tf.BertModel, "gpt2": tf.GPT2LMHeadModel}[arch]
    model = cls.from_pretrained(base_dir, dtype=dtype)
    pm = peft.PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    names = ["a0"]
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}")
        names.append(f"a{i}")
    return pm.merge_and_unload(adapter_names=names).eval()


def save_peft_merged(base_dir: Path, adapters: list[Path], dtype: torch.dtype, arch: str, out: Path) -> Path:
    """PEFT's merge (:func:`peft_merged`, the base loaded in ``dtype``) saved as users save it:
    ``merge_and_unload()`` then transformers' ``save_pretrained(out)``."""
    peft_merged(base_dir, adapters, dtype, arch).save_pretrained(out)
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()
    return out


def read_st(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder or file, by name (safetensors' own reader, not ours)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool((a.contiguous().view(-1).view(ints) == b.contiguous().view(-1).view(ints)).all())


@pytest.fixture
def examples() -> Path:
    return EXAMPLES
