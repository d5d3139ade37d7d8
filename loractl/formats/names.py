"""Resolving adapter module names to the base model's tensor names.

Adapters name modules relative to the model they were trained on (``model.layers.0.self_attn.q_proj``
for a ``LlamaForCausalLM``); a base checkpoint may carry more prefix (``bert.encoder...``) or less
(``layers.0...``). A module resolves to the base tensor ``<name>.weight`` when that exists, else to
the one base key ending in ``.<name>.weight``, else the same after dropping the name's leading
components one at a time. Tied output heads (``tie_word_embeddings``) resolve to the input
embedding, the tensor transformers loads them from.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import InputError
from ..io.files import shown, source_of

OUTPUT_HEADS = ("lm_head", "embed_out", "output")
#: pipeline components that prefix module names in diffusers/kohya adapters (``unet.conv_in``)
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")
EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "shared.weight",
)


def ties_word_embeddings(config: dict) -> bool:
    """The model's config ties its output head to the input embedding (transformers' ``tie_word_embeddings``,
    also under ``text_config`` for multimodal models).

    Raises:
        InputError: it is neither true nor false (nor absent).
    """
    tie = config.get("tie_word_embeddings")
    if tie is None and isinstance(config.get("text_config"), dict):
        tie = config["text_config"].get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise InputError(
            f"{source_of(config, 'the base config.json')}: tie_word_embeddings is {shown(tie)}, not true or false",
            hint="fix the base model's config.json",
        )
    return bool(tie)


class NameResolver:
    """Finds base tensor names for adapter module names.

    Args:
        base_keys: every tensor name of the base.
        tie_word_embeddings: the base's config ties the output head to the input embedding.
    """

    def __init__(self, base_keys: Iterable[str], tie_word_embeddings: bool = False) -> None:
        self.keys = set(base_keys)
        self.by_suffix: dict[str, list[str]] = {}
        for k in self.keys:
            parts = k.split(".")
            for i in range(1, len(parts)):
                self.by_suffix.setdefault(".".join(parts[i:]), []).append(k)
        self.tie = tie_word_embeddings

    def _lookup(self, key: str, strict: bool) -> str | None:
        if key in self.keys:
            return key
        hits = self.by_suffix.get(key, [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1 and strict:
            shown = ", ".join(sorted(hits)[:4])
            raise InputError(
                f"adapter tensor {key!r} matches several base tensors ({shown})",
                hint="the base holds several models; point at the one the adapter is for",
            )
        return None

    def resolve(self, module: str, leaf: str = "weight") -> str | None:
        """The base tensor for ``module``'s ``leaf`` (``weight`` or ``bias``), or None."""
        parts = module.split(".")
        if len(parts) > 1 and parts[0] in COMPONENTS:
            # a pipeline component's module against that component's own weights (``unet.conv_in``)
            hit = self._lookup(module + "." + leaf, strict=True) or self._lookup(
                ".".join(parts[1:] + [leaf]), strict=True
            )
            if hit is not None:
                return hit
        # drop at most two leading components, and keep at least two
        for i in range(min(3, len(parts) - 1) if len(parts) > 1 else 1):
            hit = self._lookup(".".join(parts[i:] + [leaf]), strict=i == 0)
            if hit is not None:
                return hit
        if leaf == "weight" and self.tie and parts[-1] in OUTPUT_HEADS:
            for emb in EMBEDDINGS:
                hits = [k for k in self.keys if k == emb or k.endswith("." + emb)]
                if len(hits) == 1:
                    return hits[0]
        return None

    def resolve_tensor(self, key: str) -> str | None:
        """The base tensor for a full tensor name such as ``lm_head.weight`` (``modules_to_save``)."""
        module, _, leaf = key.rpartition(".")
        return self.resolve(module, leaf)
