"""Regenerate the tiny example models shipped in ``examples/``.

Writes two folders under ``--out`` (default: the directory holding this script):

* ``tiny-llama/``: a tiny, randomly initialised Llama-shaped causal LM (bfloat16,
  saved as exactly two safetensors shards plus ``model.safetensors.index.json``),
  with a small byte-level BPE tokenizer trained on an inline paragraph.
* ``tiny-llama-lora/``: a PEFT LoRA adapter (r=8, alpha=16, all attention and MLP
  projections) for that base, whose A *and* B factors are seeded non-zero random
  values, so merging it really changes the base weights.

Everything is seeded, and the script is deterministic: running it twice produces
byte-identical safetensors files. Nothing is downloaded. Requires the ``test``
extras (``transformers`` and ``peft``)::

    python examples/make_examples.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

SEED = 1234
BASE_DIR = "tiny-llama"
ADAPTER_DIR = "tiny-llama-lora"
VOCAB_SIZE = 512
# The bf16 base is ~0.3 MB; this limit splits it into exactly two shards.
MAX_SHARD_SIZE = "200KB"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CORPUS = """\
Low-rank adaptation freezes the weights of a pretrained model and learns a pair of small
matrices for each adapted layer. The update is the product of the two factors, scaled by
alpha over the rank, and it can be merged into the base weight once training is done.
Merging makes inference as fast as the original model, while unmerging restores the base
exactly, up to the rounding of the storage dtype. Adapters are small, so many of them can
share one base model: a translator, a summariser, a coder and a poet may all live on the
same disk. The quick brown fox jumps over the lazy dog, and the lazy dog does not mind.
Tokenizers split text into pieces; byte pairs that occur often are merged into new tokens,
so common words become single tokens and rare words are spelled out from smaller parts.
Shards, indexes, configs and tokenizers are saved next to each other in one folder, and a
careful tool reads them all, checks their shapes and dtypes, and never trusts a file name.
One, two, three, four, five, six, seven, eight, nine, ten: numbers are words as well.
"""

SAMPLE_SENTENCE = "The quick brown fox merges a low-rank adapter into the base model."


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``CORPUS`` and wrap it for transformers."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"corpus too small: got {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=256,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A tiny Llama config whose vocabulary matches ``tokenizer``."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )


@torch.no_grad()
def fill_seeded(module: torch.nn.Module, seed: int, std: float) -> None:
    """Overwrite every parameter of ``module`` from a private seeded generator.

    Weights are drawn in float32 (in name order) and cast to the parameter dtype, so
    the result depends only on ``seed`` and the shapes, not on library init code.
    Norm weights are set to 1 plus a little noise so they are not trivially all-ones.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        value = 1.0 + 0.1 * noise if name.endswith("norm.weight") else std * noise
        param.copy_(value.to(param.dtype))


def portable_tokenizer_files(base_dir: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """Make the saved tokenizer loadable by both transformers 4.x and 5.x.

    transformers 5 records ``tokenizer_class: TokenizersBackend`` (unknown to 4.x) and no
    longer writes ``special_tokens_map.json``; use the portable class name and write the map.
    """
    cfg_path = base_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    special = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
    }
    (base_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def build_base(out: Path) -> tuple[Path, PreTrainedTokenizerFast]:
    """Create, seed and save the tiny base model and its tokenizer."""
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    fill_seeded(model, SEED, std=0.05)

    base_dir = out / BASE_DIR
    if base_dir.exists():
        shutil.rmtree(base_dir)
    model.save_pretrained(base_dir, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(base_dir)
    portable_tokenizer_files(base_dir, tokenizer)

    shards = sorted(base_dir.glob("model-*.safetensors"))
    if len(shards) != 2 or not (base_dir / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"expected exactly 2 shards + index, got {[s.name for s in shards]}")
    return base_dir, tokenizer


def build_adapter(out: Path, base_dir: Path) -> Path:
    """Create a LoRA adapter with seeded non-zero A and B factors and save it."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    lora_config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(SEED + 1)
    peft_model = get_peft_model(base, lora_config)
    # PEFT initialises lora_B to zero (a no-op adapter); give every factor real values.
    lora_params = {n: p for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n}
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name in sorted(lora_params):
            param = lora_params[name]
            param.copy_((0.02 * torch.randn(param.shape, generator=gen)).to(param.dtype))
    # Point at the sibling base folder, never at a hub id or an absolute local path.
    saved_config = peft_model.peft_config["default"]
    saved_config.base_model_name_or_path = f"../{BASE_DIR}"
    # PEFT keeps target_modules as a set, whose JSON order varies with PYTHONHASHSEED.
    saved_config.target_modules = sorted(saved_config.target_modules)

    adapter_dir = out / ADAPTER_DIR
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    # save_embedding_layers=False: nothing but LoRA factors is saved, and PEFT does not
    # try to resolve the relative base path to inspect its vocabulary.
    peft_model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
    # PEFT also writes a boilerplate model card; keep the example folder minimal.
    (adapter_dir / "README.md").unlink(missing_ok=True)
    return adapter_dir


def verify(base_dir: Path, adapter_dir: Path) -> None:
    """Reload both folders, run a forward pass, and check that merging changes weights."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if base.config.vocab_size != len(tokenizer):
        raise RuntimeError("model vocab size does not match the tokenizer")
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    batch = tokenizer(SAMPLE_SENTENCE, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    if logits.shape != (1, batch["input_ids"].shape[1], len(tokenizer)) or not torch.isfinite(logits).all():
        raise RuntimeError(f"bad logits: {tuple(logits.shape)}")
    merged = model.merge_and_unload().state_dict()
    changed = [k for k, v in merged.items() if not torch.equal(v, before[k])]
    expected = 2 * len(TARGET_MODULES)
    if len(changed) != expected:
        raise RuntimeError(f"merge changed {len(changed)} tensors, expected {expected}")
    print(
        f"verified: {len(batch['input_ids'][0])} tokens -> logits {tuple(logits.shape)}, "
        f"merge changed {len(changed)} weight tensors"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: the examples/ folder next to this script)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the reload/forward/merge check")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base_dir, _ = build_base(out)
    adapter_dir = build_adapter(out, base_dir)
    if not args.no_verify:
        verify(base_dir, adapter_dir)
    for folder in (base_dir, adapter_dir):
        for path in sorted(folder.iterdir()):
            print(f"{path.stat().st_size:>9,d}  {path.relative_to(out)}")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    print(f"adapter base_model_name_or_path = {cfg['base_model_name_or_path']!r}")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
