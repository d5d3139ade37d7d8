"""Module names of the Stable Diffusion world: kohya's flat names, diffusers' and LDM's dotted ones.

Pure functions over strings; no tensors, no files.

- kohya / sd-scripts name a LoRA module ``<prefix>_<module path with "." replaced by "_">``
  (sd-scripts ``networks/lora.py``, ``LoRANetwork.create_modules``: ``lora_name = prefix + "." + name``
  then ``.replace(".", "_")``). Undoing that is ambiguous, because module names contain ``_``:
  :func:`split_flat` uses the spelling of the names diffusers, transformers and sd-scripts use
  (``down_blocks``, ``to_q``, ``self_attn``...), and :class:`FlatIndex` resolves a flat name against
  a base model's real module names instead.
- Single-file Stable Diffusion checkpoints (the original LDM layout, ``model.diffusion_model.input_blocks...``)
  name UNet modules differently from diffusers. :func:`ldm_unet_map` and :func:`diffusers_unet_map`
  give the module-level correspondence that diffusers' ``convert_ldm_unet_checkpoint``
  (``diffusers/loaders/single_file_utils.py``) and sd-scripts' ``library/model_util.py`` apply to
  tensors, generalised from the keys (any number of blocks and ``layers_per_block``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: kohya key prefixes and the component (PEFT-style module name prefix) each stands for
COMPONENTS: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_transformer_": "transformer",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}

#: where each component lives inside a single-file checkpoint, by layout: (root, layout of the names under it)
#: ``hf``: transformers' own names (CLIPTextModel, T5EncoderModel); ``openclip``: OpenCLIP (SD 2.x, SDXL te2);
#: ``ldm``: the original UNet; ``native``: the model's own names (Flux/SD3 in ComfyUI files).
SINGLE_FILE_ROOTS: dict[str, tuple[tuple[str, str], ...]] = {
    "unet": (("model.diffusion_model.", "ldm"), ("model.diffusion_model.", "native")),
    "transformer": (("model.diffusion_model.", "native"),),
    "text_encoder": (
        ("cond_stage_model.transformer.", "hf"),
        ("cond_stage_model.model.", "openclip"),
        ("conditioner.embedders.0.transformer.", "hf"),
        ("text_encoders.clip_l.transformer.", "hf"),
    ),
    "text_encoder_2": (
        ("conditioner.embedders.1.model.", "openclip"),
        ("text_encoders.clip_g.transformer.", "hf"),
    ),
    "text_encoder_3": (("text_encoders.t5xxl.transformer.", "hf"),),
}

LDM_UNET_PREFIX = "model.diffusion_model."

# Module-name components that contain "_", as spelled by diffusers (UNet2DConditionModel, SD3/Flux
# transformers), the LDM/sgm UNet, transformers' CLIP and T5, OpenCLIP, and the BFL Flux / SD3 MMDiT
# models sd-scripts trains. split_flat joins underscore-separated tokens into these, longest first.
_COMPOUNDS = """
down_blocks up_blocks mid_block transformer_blocks single_transformer_blocks temp_attentions
to_q to_k to_v to_out to_add_out add_q_proj add_k_proj add_v_proj norm_q norm_k norm_added_q norm_added_k
proj_in proj_out proj_mlp time_emb_proj conv_shortcut conv_in conv_out conv_norm_out conv_act
time_embedding add_embedding class_embedding encoder_hid_proj linear_1 linear_2 norm_out
ff_context norm1_context norm2_context time_text_embed timestep_embedder text_embedder guidance_embedder
context_embedder x_embedder pos_embed caption_projection
input_blocks output_blocks middle_block in_layers out_layers emb_layers skip_connection time_embed label_emb
text_model self_attn q_proj k_proj v_proj out_proj final_layer_norm text_projection token_embedding
position_embedding layer_norm1 layer_norm2 layer_norm embed_tokens relative_attention_bias
DenseReluDense wi_0 wi_1 c_fc c_proj ln_1 ln_2 ln_final in_proj
double_blocks single_blocks img_attn txt_attn img_mlp txt_mlp img_mod txt_mod img_in txt_in time_in
vector_in guidance_in final_layer in_layer out_layer adaLN_modulation joint_blocks x_block context_block
t_embedder y_embedder
"""
COMPOUNDS: frozenset[str] = frozenset(_COMPOUNDS.split())
_BY_FIRST: dict[str, list[tuple[str, ...]]] = {}
for _c in COMPOUNDS:
    _t = tuple(_c.split("_"))
    _BY_FIRST.setdefault(_t[0], []).append(_t)
for _v in _BY_FIRST.values():
    _v.sort(key=len, reverse=True)


def flatten(name: str) -> str:
    """kohya's flattening of a dotted module name (sd-scripts: ``.replace(".", "_")``)."""
    return name.replace(".", "_")


def split_prefix(lora_name: str) -> tuple[str, str, str] | None:
    """``(kohya prefix, component, flat module path)`` of a kohya module name, or None."""
    for prefix in sorted(COMPONENTS, key=len, reverse=True):
        if lora_name.startswith(prefix) and len(lora_name) > len(prefix):
            return prefix, COMPONENTS[prefix], lora_name[len(prefix) :]
    return None


def split_flat(flat: str) -> str:
    """The dotted module path of a flat kohya path, by the known spellings (no base model at hand).

    Tokens between underscores are joined back into the compounds of :data:`COMPOUNDS`
    (longest match first); every other underscore was a dot. E.g.
    ``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` ->
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` and
    ``text_model_encoder_layers_0_self_attn_q_proj`` -> ``text_model.encoder.layers.0.self_attn.q_proj``.
    """
    tokens = flat.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for cand in _BY_FIRST.get(tokens[i], ()):
            if tuple(tokens[i : i + len(cand)]) == cand:
                parts.append("_".join(cand))
                i += len(cand)
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(p for p in parts if p) or flat


def weight_modules(keys: Iterable[str]) -> list[str]:
    """The module names of a checkpoint: every ``<module>.weight`` key without ``.weight``."""
    return [k[: -len(".weight")] for k in keys if k.endswith(".weight")]


class FlatIndex:
    """Resolves flat kohya paths against real module names ("try every split of the underscores").

    Args:
        modules: dotted module names (the base's, perhaps under a root).
        aliases: extra spellings: ``{alias dotted name: real module}`` (e.g. the LDM names of a
            diffusers UNet's modules); an alias resolves to the real module's name.
        suffixes: match trailing parts of the names too (else whole names only).

    A flat path matches a module when it is the flattening of the module's name or of one of its
    trailing parts (``text_model_encoder...`` matches ``cond_stage_model.transformer.text_model.encoder...``).
    """

    def __init__(
        self, modules: Iterable[str], aliases: dict[str, str] | None = None, suffixes: bool = True
    ) -> None:
        self._by_flat: dict[str, set[tuple[str, str]]] = {}
        for m in modules:
            parts = m.split(".")
            for i in range(len(parts) if suffixes else 1):
                suffix = ".".join(parts[i:])
                self._by_flat.setdefault(flatten(suffix), set()).add((suffix, m))
        for alias, real in (aliases or {}).items():
            self._by_flat.setdefault(flatten(alias), set()).add((real, real))

    def candidates(self, flat: str) -> list[tuple[str, str]]:
        """Every ``(dotted name, real module)`` whose name (or alias) flattens to ``flat``, sorted."""
        return sorted(self._by_flat.get(flat, ()))


# ------------------------------------------------------------------------------------------------
# diffusers UNet2DConditionModel <-> original LDM UNet
# ------------------------------------------------------------------------------------------------
# diffusers single_file_utils: DIFFUSERS_TO_LDM_MAPPING["unet"] ("layers" and "addition_embed_type")
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# diffusers single_file_utils.update_unet_resnet_ldm_to_diffusers (sd-scripts unet_conversion_map_resnet)
_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.*))?$")
_LDM_MID = re.compile(r"^middle_block\.(\d+)\.(.+)$")
_DIFF_BLOCK = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$"
)
_DIFF_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _resnet_to_diffusers(rest: str) -> str:
    for old, new in _RESNET:
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _resnet_to_ldm(rest: str) -> str:
    for old, new in _RESNET:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def ldm_layers_per_block(ldm_names: Iterable[str]) -> int:
    """``layers_per_block`` of an LDM UNet from its names: the first downsampler (``input_blocks.N.0.op``)
    sits at N = layers_per_block + 1; without one, every input block but ``conv_in`` is a layer."""
    ops, inputs = [], set()
    for n in ldm_names:
        m = _LDM_BLOCK.match(n)
        if m and m[1] == "input_blocks":
            inputs.add(int(m[2]))
            if m[3] == "0" and (m[4] or "").startswith("op"):
                ops.append(int(m[2]))
    if ops:
        return min(ops) - 1
    return max(len(inputs) - 1, 1)


def ldm_to_diffusers_unet(name: str, layers_per_block: int) -> str | None:
    """The diffusers name of an LDM UNet module (relative to ``model.diffusion_model.``), or None.

    Mirrors diffusers' ``convert_ldm_unet_checkpoint``: input block i > 0 is layer (i-1) % (L+1) of
    down block (i-1) // (L+1), its ``.0`` the resnet (``.0.op`` the downsampler) and ``.1`` the
    attention; middle block k is resnet k/2 (k even) or attention 0; output block i is layer
    i % (L+1) of up block i // (L+1), with ``.1.conv`` / ``.2.conv`` its upsampler.
    """
    for d, ldm in _UNET_FIXED.items():
        if name == ldm or name.startswith(ldm + "."):
            return d + name[len(ldm) :]
    m = _LDM_MID.match(name)
    if m:
        k, rest = int(m[1]), m[2]
        if k % 2 == 0:
            return f"mid_block.resnets.{k // 2}.{_resnet_to_diffusers(rest)}"
        return f"mid_block.attentions.{(k - 1) // 2}.{rest}"
    m = _LDM_BLOCK.match(name)
    if not m:
        return None
    kind, i, j, rest = m[1], int(m[2]), int(m[3]), m[4]
    per = layers_per_block + 1
    if kind == "input_blocks":
        if i == 0:
            return None
        block, layer = (i - 1) // per, (i - 1) % per
        if j == 0 and rest is not None and (rest == "op" or rest.startswith("op.")):
            return _join(f"down_blocks.{block}.downsamplers.0.conv", rest[2:].lstrip("."))
        if j == 0:
            return _join(f"down_blocks.{block}.resnets.{layer}", _resnet_to_diffusers(rest or ""))
        if j == 1:
            return _join(f"down_blocks.{block}.attentions.{layer}", rest)
        return None
    block, layer = i // per, i % per
    if j == 0:
        return _join(f"up_blocks.{block}.resnets.{layer}", _resnet_to_diffusers(rest or ""))
    if rest is not None and (rest == "conv" or rest.startswith("conv.")) and j in (1, 2):
        return _join(f"up_blocks.{block}.upsamplers.0", rest)
    if j == 1:
        return _join(f"up_blocks.{block}.attentions.{layer}", rest)
    return None


def diffusers_to_ldm_unet(name: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str | None:
    """The LDM name of a diffusers UNet module (the inverse of :func:`ldm_to_diffusers_unet`), or None.

    Args:
        name: a diffusers ``UNet2DConditionModel`` module name.
        layers_per_block: the UNet's ``layers_per_block`` (up blocks have one layer more).
        up_blocks_with_attention: up blocks that have attentions (their upsampler is ``.2.conv``, else ``.1.conv``).
    """
    for d, ldm in _UNET_FIXED.items():
        if name == d or name.startswith(d + "."):
            return ldm + name[len(d) :]
    per = layers_per_block + 1
    m = _DIFF_MID.match(name)
    if m:
        if m[1] == "resnets":
            return _join(f"middle_block.{2 * int(m[2])}", _resnet_to_ldm(m[3] or ""))
        return _join(f"middle_block.{2 * int(m[2]) + 1}", m[3])
    m = _DIFF_BLOCK.match(name)
    if not m:
        return None
    side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if side == "down_blocks":
        if kind == "downsamplers":
            if layer != 0 or not rest or not (rest == "conv" or rest.startswith("conv.")):
                return None
            return _join(f"input_blocks.{(block + 1) * per}.0.op", rest[4:].lstrip("."))
        if kind == "upsamplers":
            return None
        i = 1 + block * per + layer
        if kind == "resnets":
            return _join(f"input_blocks.{i}.0", _resnet_to_ldm(rest or ""))
        return _join(f"input_blocks.{i}.1", rest)
    if kind == "downsamplers":
        return None
    if kind == "upsamplers":
        if layer != 0:
            return None
        j = 2 if block in up_blocks_with_attention else 1
        return _join(f"output_blocks.{block * per + per - 1}.{j}", rest)
    i = block * per + layer
    if kind == "resnets":
        return _join(f"output_blocks.{i}.0", _resnet_to_ldm(rest or ""))
    return _join(f"output_blocks.{i}.1", rest)


def is_ldm_unet(keys: Iterable[str]) -> bool:
    """Whether a checkpoint holds an SD 1.x/2.x/XL UNet in the original LDM layout."""
    return any(k.startswith(LDM_UNET_PREFIX + "input_blocks.") for k in keys)


def ldm_unet_map(keys: Iterable[str]) -> dict[str, str]:
    """``{diffusers module name: LDM module name}`` for the UNet of a single-file SD checkpoint.

    Args:
        keys: the checkpoint's tensor names (``model.diffusion_model.input_blocks.1.1.proj_in.weight``...).

    Returns:
        Every UNet module that has a ``.weight``, e.g. ``"down_blocks.0.attentions.0.proj_in":
        "model.diffusion_model.input_blocks.1.1.proj_in"``; the LDM names keep their prefix.
    """
    names = [m[len(LDM_UNET_PREFIX) :] for m in weight_modules(keys) if m.startswith(LDM_UNET_PREFIX)]
    per = ldm_layers_per_block(names)
    out: dict[str, str] = {}
    for n in names:
        d = ldm_to_diffusers_unet(n, per)
        if d is not None:
            out[d] = LDM_UNET_PREFIX + n
    return out


def diffusers_unet_map(keys: Iterable[str]) -> dict[str, str]:
    """``{LDM module name (without prefix): diffusers module name}`` for a diffusers UNet's modules.

    For kohya SDXL files, which sd-scripts names after its own LDM-layout UNet
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), merged into a diffusers UNet.
    ``layers_per_block`` is the number of resnets in ``down_blocks.0``.
    """
    mods = weight_modules(keys)
    resnets = {int(m.split(".")[3]) for m in mods if m.startswith("down_blocks.0.resnets.")}
    per = len(resnets) or 1
    with_attn = {int(m.split(".")[1]) for m in mods if m.startswith("up_blocks.") and ".attentions." in m}
    out: dict[str, str] = {}
    for m in mods:
        ldm = diffusers_to_ldm_unet(m, per, with_attn)
        if ldm is not None:
            out[ldm] = m
    return out


# ------------------------------------------------------------------------------------------------
# transformers CLIPTextModel -> OpenCLIP (SD 2.x text encoder, SDXL's second one, in single files)
# ------------------------------------------------------------------------------------------------
_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_OPENCLIP = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPENCLIP_FUSED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def clip_to_openclip(name: str) -> str | None:
    """The OpenCLIP module (under its root) of a transformers CLIP text module, or None.

    diffusers ``convert_open_clip_checkpoint`` / sd-scripts ``model_util.convert_ldm_clip_checkpoint_v2``:
    layer i's ``self_attn.out_proj`` is ``transformer.resblocks.i.attn.out_proj``, ``mlp.fc1`` /
    ``mlp.fc2`` are ``mlp.c_fc`` / ``mlp.c_proj``. q/k/v are rows of the fused ``attn.in_proj_weight``
    (:data:`OPENCLIP_FUSED`): no module of their own.
    """
    m = _CLIP_LAYER.match(name)
    if not m or m[2] not in _OPENCLIP:
        return None
    return f"transformer.resblocks.{m[1]}.{_OPENCLIP[m[2]]}"
