"""Oracles for ``loractl extract`` (issue #14): mergekit-extract-lora, the dense-SVD rule, tuned pairs.

Three things a test of the extraction needs, none of them loractl's own code:

* ``run_mergekit_extract``: the peer tool itself, ``mergekit-extract-lora``, run as a subprocess in
  its own virtual environment (mergekit pins transformers/peft ranges of its own, so it is kept out
  of the project venv). When no mergekit is found the calling test is skipped with the reason.
* ``dense_svd_fp32`` / ``dense_svd_fp64``: mergekit's rule written out, for when mergekit is not
  there: the truncated SVD of the whole dense update (Eckart-Young: the best rank-r approximation
  in the Frobenius and spectral norms), with the singular values split as sqrt(S) to each side, as
  ``mergekit/scripts/extract_lora.py::TaskVectorDecompositionTask.execute`` does (default
  ``--distribute-scale``):
      U, S, Vh = svd(delta);  A = diag(sqrt(S[:r])) @ Vh[:r];  B = U[:, :r] @ diag(sqrt(S[:r]))
  so that B @ A is the rank-r truncation, and PEFT's scale alpha/r is 1 (mergekit writes
  lora_alpha = r).
* ``make_tuned_pair``: a tiny Llama base and a "fine-tuned" copy saved with ``save_pretrained``,
  in four kinds (exact low-rank update, slowly decaying full-rank update, resized vocabulary,
  changed norms and biases), with the exact float64 update of every changed tensor.

Where mergekit is looked for, in order: ``$LORACTL_MERGEKIT_VENV`` (a venv folder), ``.venv-mergekit``
at the repository root, the venv running the tests (mergekit installed beside loractl),
``/work/venvs/mergekit``. Make one with::

    python3 -m venv .venv-mergekit
    .venv-mergekit/bin/pip install torch==2.13.0   # first: the CPU wheel, not a CUDA build
    .venv-mergekit/bin/pip install mergekit
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
EXTRACT_SCRIPT = "mergekit-extract-lora"


def _candidate_venvs() -> list[Path]:
    out = []
    env = os.environ.get("LORACTL_MERGEKIT_VENV")
    if env:
        out.append(Path(env))
    out += [REPO / ".venv-mergekit", Path(sys.executable).parent.parent, Path("/work/venvs/mergekit")]
    return out


def find_mergekit() -> Path | None:
    """The ``mergekit-extract-lora`` executable of the first venv that has one, or None."""
    for venv in _candidate_venvs():
        exe = venv / "bin" / EXTRACT_SCRIPT
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    return None


def mergekit_command(base_dir: Path, tuned_dir: Path, out_dir: Path, rank: int, *extra: str) -> list[str]:
    """The command line that runs mergekit's extraction on CPU, as the benchmark and tests use it."""
    exe = find_mergekit()
    if exe is None:
        raise FileNotFoundError(EXTRACT_SCRIPT)
    return [
        str(exe),
        "--model", str(tuned_dir),
        "--base-model", str(base_dir),
        "--out-path", str(out_dir),
        "--max-rank", str(rank),
        "--device", "cpu",
        "--no-copy-tokenizer",
        "--quiet",
        *extra,
    ]  # fmt: skip


def run_mergekit_extract(base_dir: Path, tuned_dir: Path, out_dir: Path, rank: int, *extra: str) -> Path:
    """Run ``mergekit-extract-lora`` (offline, CPU) and return ``out_dir``, which holds a PEFT adapter.

    Skips the calling test when no mergekit venv is found (see the module docstring). A failing
    run raises RuntimeError with mergekit's stderr, so a broken oracle is never mistaken for a skip.
    """
    import pytest

    if find_mergekit() is None:
        where = ", ".join(str(v) for v in _candidate_venvs())
        pytest.skip(f"{EXTRACT_SCRIPT} not found (looked in the venvs {where}); set LORACTL_MERGEKIT_VENV")
    # Absolute paths: mergekit.card.is_hf takes a relative "dir/model" that exists locally for a Hub id and,
    # offline, fails on writing README.md after the adapter is written.
    cmd = mergekit_command(
        Path(base_dir).resolve(), Path(tuned_dir).resolve(), Path(out_dir).resolve(), rank, *extra
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return Path(out_dir)


# --- the reference rule -------------------------------------------------------------------------


def _dense_svd(delta: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D, got {tuple(delta.shape)}")
    u, s, vh = torch.linalg.svd(delta.to(dtype), full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    a = root[:, None] * vh[:r]  # [r, in]  = diag(sqrt S) Vh
    b = u[:, :r] * root[None, :]  # [out, r] = U diag(sqrt S)
    return a.contiguous(), b.contiguous()


def dense_svd_fp32(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [r, in], lora_B [out, r]) in float32: mergekit's rule, B @ A = the rank-r SVD truncation of delta."""
    return _dense_svd(delta, rank, torch.float32)


def dense_svd_fp64(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rule in float64: the reference that fp32 implementations are measured against."""
    return _dense_svd(delta, rank, torch.float64)


def mergekit_rule(
    base_w: torch.Tensor, tuned_w: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit-extract-lora's computation step by step (``TaskVectorTask.execute`` then
    ``TaskVectorDecompositionTask.execute``): the update ``tuned - base`` in the *storage* dtype
    (so bf16 weights give a bf16-rounded update), the SVD in float32, the factors cast back to the
    storage dtype."""
    delta = tuned_w - base_w
    a, b = dense_svd_fp32(delta, rank)
    return a.to(delta.dtype), b.to(delta.dtype)


def relative_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> float:
    """||delta - scale * B @ A||_F / ||delta||_F, computed in float64."""
    d = delta.double()
    return float(
        torch.linalg.matrix_norm(d - scale * (b.double() @ a.double())) / torch.linalg.matrix_norm(d)
    )


def optimal_relative_error(delta: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the smallest relative Frobenius error of any rank-r approximation, sqrt(sum_{i>r} s_i^2)/||delta||."""
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


# --- tuned pairs ---------------------------------------------------------------------------------

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KINDS = ("lowrank", "fullrank", "vocab", "norms")


@dataclasses.dataclass
class TunedPair:
    """A base folder, a tuned folder, and the exact float64 update (tuned - base) of each changed tensor."""

    kind: str
    base_dir: Path
    tuned_dir: Path
    deltas: dict[str, torch.Tensor]  # every changed tensor whose shape is the same in both models
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # name -> (base shape, tuned shape)

    def linear_deltas(self) -> dict[str, torch.Tensor]:
        """The updates of the attention and MLP projection weights (what a LoRA extraction targets)."""
        return {
            k: v
            for k, v in self.deltas.items()
            if k.endswith(".weight") and k.split(".")[-2] in LINEAR_SUFFIXES
        }


def _llama(seed: int, **over: Any):
    import transformers as tf

    kw: dict[str, Any] = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        tie_word_embeddings=False,
    )
    kw.update(over)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _low_rank(shape: torch.Size, rank: int, g: torch.Generator, scale: float) -> torch.Tensor:
    out, inp = shape
    b = torch.randn(out, rank, generator=g, dtype=torch.float64)
    a = torch.randn(rank, inp, generator=g, dtype=torch.float64)
    return scale * (b @ a) / rank**0.5


def _decaying(shape: torch.Size, decay: float, g: torch.Generator, scale: float) -> torch.Tensor:
    """Full rank, singular values s_i = scale / (1 + i)**decay: decay 0 is perfectly flat, small decay is a
    full fine-tune's slowly decaying spectrum. Random orthonormal singular vectors (QR of Gaussians)."""
    out, inp = shape
    n = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, n, generator=g, dtype=torch.float64))
    s = scale / (1.0 + torch.arange(n, dtype=torch.float64)) ** decay
    return (u * s) @ v.T


def make_tuned_pair(
    tmp: Path,
    kind: str = "lowrank",
    *,
    rank: int = 8,
    noise: float = 0.0,
    decay: float = 0.3,
    scale: float = 0.2,
    extra_vocab: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> TunedPair:
    """Save a tiny Llama base and a tuned copy under ``tmp`` (``tmp/base``, ``tmp/tuned``) and return them.

    kind:
      ``lowrank``  every projection weight gets an exact rank-``rank`` update (+ Gaussian ``noise``
                   of that std, if any); nothing else changes. Extraction at ``rank`` is exact up to noise.
      ``fullrank`` every projection weight gets a full-rank update with singular values
                   scale/(1+i)**decay (``decay=0``: flat), like a full fine-tune; norms change too.
      ``vocab``    ``lowrank`` plus ``extra_vocab`` new tokens: embed_tokens and lm_head grow
                   (``resized``), their old rows change too.
      ``norms``    a model with biases (attention_bias, mlp_bias): ``lowrank`` plus changed
                   RMSNorm weights and changed biases of every projection.
    The deltas are computed from the saved tensors (tuned - base in float64), so they are exact
    for every dtype.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tmp = Path(tmp)
    over: dict[str, Any] = {"attention_bias": True, "mlp_bias": True} if kind == "norms" else {}
    base = _llama(seed, **over).to(dtype)
    tuned = _llama(seed, **over).to(dtype)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        if kind == "vocab":
            tuned.resize_token_embeddings(tuned.config.vocab_size + extra_vocab)
        for name, p in tuned.named_parameters():
            parts = name.split(".")
            is_linear = parts[-1] == "weight" and parts[-2] in LINEAR_SUFFIXES
            if is_linear:
                if kind == "fullrank":
                    d = _decaying(p.shape, decay, g, scale)
                else:
                    d = _low_rank(p.shape, rank, g, scale)
                if noise:
                    d = d + noise * torch.randn(p.shape, generator=g, dtype=torch.float64)
                p.copy_((p.double() + d).to(dtype))
            elif parts[-1] == "bias" and kind == "norms":
                p.add_((0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(dtype))
            elif "norm" in parts[-2] and kind in ("norms", "fullrank"):
                p.add_((0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(dtype))
            elif kind == "vocab" and parts[-2] in ("embed_tokens", "lm_head"):
                p.copy_(
                    (p.double() + 0.01 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(dtype)
                )
    base_dir, tuned_dir = tmp / "base", tmp / "tuned"
    base.save_pretrained(base_dir)
    tuned.save_pretrained(tuned_dir)

    from safetensors.torch import load_file

    b_sd = {k: v for f in sorted(base_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    t_sd = {k: v for f in sorted(tuned_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    if b_sd.keys() != t_sd.keys():
        raise AssertionError(f"base and tuned differ in tensor names: {sorted(b_sd.keys() ^ t_sd.keys())}")
    deltas, resized = {}, {}
    for k, bv in b_sd.items():
        tv = t_sd[k]
        if bv.shape != tv.shape:
            resized[k] = (tuple(bv.shape), tuple(tv.shape))
        elif not torch.equal(bv, tv):
            deltas[k] = tv.double() - bv.double()
    return TunedPair(kind, base_dir, tuned_dir, deltas, resized)
