"""kohya / sd-scripts single-file LoRA (also LyCORIS LoRA/LoCon, A1111, ComfyUI): one ``.safetensors``.

Keys, per module (sd-scripts ``networks/lora.py``, ``LoRAModule``): ``<lora_name>.lora_down.weight``
(A: [r, in], conv [r, in, kh, kw]), ``<lora_name>.lora_up.weight`` (B: [out, r], conv [out, r, 1, 1]) and
``<lora_name>.alpha`` (a scalar). ``lora_name`` is a prefix (``lora_unet_``, ``lora_te_``, ``lora_te1_``,
``lora_te2_``, ``lora_te3_``, ``lora_transformer_``) followed by the module's path with ``.`` replaced by
``_`` (see :mod:`.sd_names`).

Scale (``LoRAModule.__init__``): ``alpha / r``; a missing alpha, or alpha 0 (sd-scripts and LyCORIS:
"if alpha == 0 or None, alpha is rank"), means alpha = r, scale 1. There is no rsLoRA rule: the writer
folds an rsLoRA scale into alpha (alpha' = s · r).

Module names read: ``<component>.<dotted path>`` (``unet.down_blocks.0.attentions.0.proj_in``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``) without a base. With a base at hand
(``ReadOptions.base_keys``) the dots are placed where the base's real module names have them and the
module is named by the base module it adapts, so that the merge finds the tensor as is: ``conv_in``
in a diffusers UNet folder, ``model.diffusion_model.input_blocks.1.1.proj_in`` in a single-file Stable
Diffusion checkpoint (through the diffusers → LDM UNet map of :mod:`.sd_names`). The kohya names read
are kept in ``Adapter.config["kohya_names"]``
so that writing the adapter back gives the same keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, LoraModule
from ..errors import FormatError, InputError
from ..io.files import loads_json
from . import alpha_value, sd_names

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Collection

    import torch

    from . import ReadOptions, WriteOptions

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
_KEY = re.compile(r"^(?P<name>lora_(?:unet|transformer|te[123]?)_[^.]+)\.(?P<part>.+)$")
# LyCORIS LoCon parts that are not plain LoRA (Tucker / CP conv decomposition, learned scalar)
_REFUSED_PARTS = {
    "lora_mid.weight": "LoCon with Tucker (CP) decomposition (lora_mid)",
    "scalar": "LoCon with a learned scalar (use_scalar)",
}
#: PEFT-style config keys that would misdescribe a kohya file to a loader reading its header
_FOREIGN_METADATA = ("lora_adapter_metadata", "peft_config")
NAMES_KEY = "kohya_names"


def detect(keys: list[str], metadata: dict[str, str]) -> bool:
    """kohya keys: ``lora_unet_…`` / ``lora_te…_`` / ``lora_transformer_…`` with ``.lora_down.weight``,
    ``.lora_up.weight`` or ``.alpha``."""
    return any((m := _KEY.match(k)) is not None and m["part"] in (DOWN, UP, ALPHA) for k in keys)


# ------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------
class KohyaNamer:
    """Turns kohya module names (``lora_unet_down_blocks_0_…``) into loractl module names.

    Args:
        base_keys: the base's tensor names, or None (then :func:`sd_names.split_flat` decides).
        source: the adapter file, for error messages.
    """

    def __init__(self, base_keys: Collection[str] | None, source: Path) -> None:
        self.source = source
        self.base_keys = base_keys
        self._indexes: dict[str, tuple[str, str, sd_names.FlatIndex] | None] = {}
        self._generic: dict[bool, sd_names.FlatIndex] = {}
        self._modules: list[str] = sd_names.weight_modules(base_keys) if base_keys is not None else []

    def _rooted(self, component: str) -> tuple[str, str, sd_names.FlatIndex] | None:
        """``(root, layout, index)`` when the base is a single-file checkpoint holding ``component``."""
        if component in self._indexes:
            return self._indexes[component]
        found = None
        for root, layout in sd_names.SINGLE_FILE_ROOTS.get(component, ()):
            under = [m[len(root) :] for m in self._modules if m.startswith(root)]
            if not under:
                continue
            if layout == "ldm" and not any(m.startswith("input_blocks.") for m in under):
                continue
            aliases: dict[str, str] = {}
            if layout == "hf":
                # transformers 5 drops CLIPTextModel's "text_model." level; older files have it
                aliases = {
                    (m[len("text_model.") :] if m.startswith("text_model.") else "text_model." + m): m
                    for m in under
                }
            if layout == "ldm":  # kohya SD 1.x/2.x names are diffusers', sd-scripts' SDXL ones are LDM's
                aliases = {
                    d: ldm[len(root) :]
                    for d, ldm in sd_names.ldm_unet_map(root + m + ".weight" for m in under).items()
                }
            # only whole names under the root: no suffix matching across components
            found = (root, layout, sd_names.FlatIndex(under, aliases, suffixes=False))
            break
        self._indexes[component] = found
        return found

    def _ambiguous(self, lora_name: str, names: list[str]) -> InputError:
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        return InputError(
            f"{self.source}: kohya module {lora_name!r} matches several base modules: {shown}",
            hint="the base has module names that differ only in '.' versus '_'; "
            "rename the adapter's keys or convert the base to diffusers layout",
        )

    def name(self, lora_name: str) -> str:
        """The loractl module name of kohya module ``lora_name``.

        Raises:
            InputError: with a base, the name matches several base modules (exit 2), or the module
                targets rows of a fused OpenCLIP ``in_proj_weight``.
        """
        split = sd_names.split_prefix(lora_name)
        if split is None:
            raise FormatError(f"{self.source}: tensor prefix of {lora_name!r} is not a kohya prefix")
        _, component, flat = split
        if self.base_keys is None:
            return f"{component}.{sd_names.split_flat(flat)}"
        rooted = self._rooted(component)
        if rooted is not None:
            root, layout, index = rooted
            if layout == "openclip":
                return self._openclip(lora_name, root, flat)
            hits = sorted({real for _, real in index.candidates(flat)})
            if len(hits) > 1:
                raise self._ambiguous(lora_name, [root + h for h in hits])
            if hits:
                return root + hits[0]
            # not in the base: a name the merge will report as unmatched, never another component's tensor
            return root + sd_names.split_flat(flat)
        unet = component == "unet"
        if unet not in self._generic:
            # sd-scripts names SDXL UNet modules after its LDM-layout UNet: accept those for a diffusers UNet too
            aliases = sd_names.diffusers_unet_map(self.base_keys) if unet else None
            self._generic[unet] = sd_names.FlatIndex(self._modules, aliases)
        hits = self._generic[unet].candidates(flat)
        if not hits and component.startswith("text_encoder") and flat.startswith("text_model_"):
            # transformers 5 drops CLIPTextModel's "text_model." level from the names it saves
            hits = self._generic[unet].candidates(flat[len("text_model_") :])
        spellings = sorted({dotted for dotted, _ in hits})
        if len(spellings) > 1:
            raise self._ambiguous(lora_name, spellings)
        if not spellings:
            return f"{component}.{sd_names.split_flat(flat)}"
        reals = {real for _, real in hits}
        # one real module: its own name, which the merge finds as is (``unet.conv_in`` would not resolve
        # in a diffusers UNet folder); several (a spelling under several roots): the merge decides
        return reals.pop() if len(reals) == 1 else f"{component}.{spellings[0]}"

    def _openclip(self, lora_name: str, root: str, flat: str) -> str:
        hf = sd_names.split_flat(flat)
        if not hf.startswith("text_model."):
            hf = "text_model." + hf  # names from transformers 5, which drops that level
        mapped = sd_names.clip_to_openclip(hf)
        if mapped is None and hf.endswith(sd_names.OPENCLIP_FUSED):
            raise InputError(
                f"{self.source}: kohya module {lora_name!r} ({hf}) updates rows of the fused tensor "
                f"{root}…attn.in_proj_weight of this single-file checkpoint, which loractl cannot merge into",
                hint="merge into the diffusers layout of the model (its text_encoder folder) instead",
            )
        return root + (mapped or hf)


def kohya_name(module: str, te_prefixes: tuple[str, str], clip: bool = False) -> str:
    """The sd-scripts name of a loractl module: ``lora_unet_`` + path with ``.`` → ``_`` and so on.

    Args:
        module: a module name (``unet.down_blocks.0…``, ``text_encoder.text_model…``, a bare
            diffusers UNet path, a single-file checkpoint path).
        te_prefixes: the prefixes for the first and second text encoder (``lora_te_``/``lora_te2_``,
            or ``lora_te1_``/``lora_te2_`` when the adapter has both, as sd-scripts' SDXL networks).
        clip: bare module names are a CLIP text encoder's (the base is one), not a UNet's.
    """
    by_component = {
        "unet": "lora_unet_",
        "transformer": "lora_transformer_",
        "text_encoder": te_prefixes[0],
        "text_encoder_2": te_prefixes[1],
        "text_encoder_3": "lora_te3_",
    }
    head, _, rest = module.partition(".")
    if rest and head in by_component:
        return by_component[head] + _te_path(head, rest)
    for component, roots in sd_names.SINGLE_FILE_ROOTS.items():
        for root, _layout in roots:
            if module.startswith(root):
                return by_component[component] + _te_path(component, module[len(root) :])
    if module.startswith("text_model.") or (clip and module.startswith(_CLIP_TOP)):
        return te_prefixes[0] + _te_path("text_encoder", module)
    return "lora_unet_" + sd_names.flatten(module)


_CLIP_TOP = ("encoder.layers.", "embeddings.", "final_layer_norm")


def _te_path(component: str, path: str) -> str:
    """A CLIP text encoder path as sd-scripts writes it: with the ``text_model.`` level that
    transformers 4 had (A1111 and ComfyUI look for ``lora_te_text_model_encoder_…``)."""
    if component in ("text_encoder", "text_encoder_2") and path.startswith(_CLIP_TOP):
        path = "text_model." + path
    return sd_names.flatten(path)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _alpha(t: torch.Tensor, lora_name: str, rank: int, source: Path) -> float:
    """sd-scripts' ``LoRAModule``: ``alpha = lora_dim if alpha is None or alpha == 0``."""
    value = alpha_value(t, f"{lora_name}.alpha", source)
    return float(rank) if value == 0 else value


def read(
    path: Path,
    weights: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    options: ReadOptions,
) -> Adapter:
    """A kohya file: modules grouped by kohya name, named as described in the module docstring.

    Raises:
        FormatError: a key that is not kohya's, a module without ``lora_down``/``lora_up``, ranks or
            shapes that disagree, a non-scalar alpha, a LyCORIS part that is not plain LoRA.
        InputError: with a base, a name that matches several base modules.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise FormatError(f"{weights}: tensor {key!r} is not a key of a kohya LoRA file")
        part = m["part"]
        if part in _REFUSED_PARTS:
            raise FormatError(
                f"{weights}: a LyCORIS {_REFUSED_PARTS[part]} adapter (tensor {key!r}), not plain LoRA",
                hint="merge it with LyCORIS itself",
            )
        if part not in (DOWN, UP, ALPHA):
            raise FormatError(
                f"{weights}: tensor {key!r} is not a kohya LoRA part (lora_down, lora_up, alpha)"
            )
        parts.setdefault(m["name"], {})[part] = t
    namer = KohyaNamer(options.base_keys, weights)
    modules: dict[str, LoraModule] = {}
    names: dict[str, str] = {}
    for lora_name, p in sorted(parts.items()):
        down, up = p.get(DOWN), p.get(UP)
        if down is None or up is None:
            missing = DOWN if down is None else UP
            raise FormatError(
                f"{weights}: kohya module {lora_name!r} has no {missing} tensor",
                hint="the file is incomplete",
            )
        kind, down, up = _shapes(lora_name, down, up, weights)
        rank = int(down.shape[0])
        alpha = _alpha(p[ALPHA], lora_name, rank, weights) if ALPHA in p else float(rank)
        name = namer.name(lora_name)
        if name in modules:
            raise InputError(
                f"{weights}: kohya modules {names[name]!r} and {lora_name!r} both name base module {name!r}",
                hint="the base holds one component (e.g. one text encoder) that both fit; merge into a "
                "single-file checkpoint holding every component, or keep only the wanted modules",
            )
        modules[name] = LoraModule(name=name, kind=kind, down=down, up=up, alpha=alpha)
        names[name] = lora_name
    return Adapter(
        path=path,
        format="kohya",
        modules=modules,
        config={NAMES_KEY: names},
        metadata=dict(metadata),
        files=[weights],
    )


def _shapes(
    lora_name: str, down: torch.Tensor, up: torch.Tensor, source: Path
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``(kind, down, up)``: linear [r, in] / [out, r]; conv [r, in, kh, kw] / [out, r, 1, 1]
    (an up stored [out, r] beside a conv down is reshaped, as ComfyUI does)."""
    if down.dim() == 2 and up.dim() == 2:
        kind = "linear"
    elif down.dim() in (3, 4, 5) and up.dim() == down.dim() and all(s == 1 for s in up.shape[2:]):
        kind = "conv"
    elif down.dim() in (3, 4, 5) and up.dim() == 2:
        kind = "conv"
        up = up.reshape(*up.shape, *([1] * (down.dim() - 2)))
    else:
        raise FormatError(
            f"{source}: kohya module {lora_name!r}: lora_down {list(down.shape)} and lora_up "
            f"{list(up.shape)} are neither a linear nor a conv LoRA"
        )
    if down.shape[0] != up.shape[1]:
        raise FormatError(
            f"{source}: kohya module {lora_name!r}: lora_down {list(down.shape)} and lora_up "
            f"{list(up.shape)} do not have the same rank"
        )
    return kind, down, up


def dylora_unit(adapter: Adapter) -> int | None:
    """The DyLoRA unit of a kohya ``networks.dylora`` file, or None for any other adapter.

    sd-scripts ``networks/dylora.py`` ``create_network``: ``unit`` comes from ``--network_args
    unit=N`` (stored as strings in the ``ss_network_args`` JSON header entry) and defaults to 1;
    the file holds an ordinary LoRA of the maximum rank, trained so its first k·unit components work alone.

    Raises:
        FormatError: ``ss_network_args`` is not JSON, or its unit is not a positive integer.
    """
    if not adapter.metadata.get("ss_network_module", "").endswith("dylora"):
        return None
    raw = adapter.metadata.get("ss_network_args") or "{}"
    args = loads_json(raw, f"{adapter.path}: header entry ss_network_args")
    value = args.get("unit", args.get("block_size", 1)) if isinstance(args, dict) else 1
    try:
        unit = int(value) if not isinstance(value, bool) else 0
    except (TypeError, ValueError, OverflowError):
        unit = 0
    if unit < 1:
        raise FormatError(
            f"{adapter.path}: DyLoRA unit {value!r} in ss_network_args is not a positive integer"
        )
    return unit


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def alpha_for_scale(scale: float, rank: int) -> float:
    """The alpha whose ``alpha / rank`` is closest to ``scale`` in float64: ``scale · rank`` or a neighbour.

    kohya has no rsLoRA rule, so an rsLoRA module's scale ``alpha / sqrt(r)`` is folded into alpha.
    ``alpha / rank`` hits ``scale`` exactly for most values; division by ``rank`` skips some doubles,
    and then the scale read back is within one ulp of the original.
    """
    best = scale * rank
    cands = [best]
    for direction in (math.inf, -math.inf):
        a = best
        for _ in range(3):
            a = math.nextafter(a, direction)
            cands.append(a)
    return min(cands, key=lambda a: (abs(a / rank - scale), cands.index(a)))


def _alpha_tensor(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha as sd-scripts stores it (``register_buffer("alpha", torch.tensor(alpha))``, cast to the
    save dtype): in the factors' dtype when that holds it exactly, else float32, else float64."""
    import torch

    for dt in dict.fromkeys([dtype, torch.float32, torch.float64]):
        if not dt.is_floating_point:
            continue
        t = torch.tensor(alpha, dtype=dt)
        if float(t) == alpha:
            return t
    return torch.tensor(alpha, dtype=torch.float64)


def kohya_tensors(adapter: Adapter, base_config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under sd-scripts' key names, such that ``alpha / r · up · down`` is each
    module's update ``s · B · A`` (exactly; a folded rsLoRA scale within one ulp, see :func:`alpha_for_scale`).

    Names: those read, for an adapter read from a kohya file; else :func:`kohya_name`.

    Args:
        adapter: what to write.
        base_config: the base's ``config.json``; a CLIP text model's makes bare names text-encoder names.

    Raises:
        FormatError: a module kohya files cannot hold (embedding, DoRA, ``lora_bias``, fan_in_fan_out),
            ``modules_to_save``, or two modules that get the same kohya name.
    """
    import torch

    src = adapter.path
    if adapter.modules_to_save:
        first = next(iter(adapter.modules_to_save))
        raise FormatError(
            f"{src}: has modules_to_save ({first!r}), which a kohya LoRA file cannot hold",
            hint="merge the adapter, or convert to peft",
        )
    components = {m.partition(".")[0] for m in adapter.modules}
    both = "text_encoder_2" in components or any(
        n.startswith("lora_te1_") for n in adapter.config.get(NAMES_KEY, {}).values()
    )
    te = ("lora_te1_", "lora_te2_") if both else ("lora_te_", "lora_te2_")
    known: dict[str, str] = adapter.config.get(NAMES_KEY, {}) if adapter.format == "kohya" else {}
    cfg = base_config or {}
    archs = " ".join(str(a) for a in cfg.get("architectures") or [])
    clip = str(cfg.get("model_type", "")).startswith("clip_text") or "CLIPText" in archs
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for name, m in sorted(adapter.modules.items()):
        problem = (
            "an embedding LoRA"
            if m.kind == "embedding"
            else "DoRA (lora_magnitude_vector)"
            if m.is_dora
            else "lora_bias (lora_B.bias)"
            if m.bias is not None
            else "fan_in_fan_out (GPT-2 Conv1D)"
            if m.fan_in_fan_out
            else None
        )
        if problem:
            raise FormatError(
                f"{src}: module {name!r} is {problem}; kohya files hold plain linear and conv LoRA only",
                hint="convert to peft instead",
            )
        lora_name = known.get(name) or kohya_name(name, te, clip)
        if lora_name in owner:
            raise FormatError(
                f"{src}: modules {owner[lora_name]!r} and {name!r} both become kohya {lora_name!r}"
            )
        owner[lora_name] = name
        alpha = m.alpha if not m.rslora else alpha_for_scale(m.scale, m.rank)
        down, up = m.down, m.up
        out[f"{lora_name}.{DOWN}"] = down.contiguous()
        out[f"{lora_name}.{UP}"] = up.contiguous()
        out[f"{lora_name}.{ALPHA}"] = _alpha_tensor(
            alpha, up.dtype if up.dtype == down.dtype else torch.float32
        )
    return out


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str, bytes]:
    """sd-scripts' ``sshs_model_hash`` and ``sshs_legacy_hash``, and the serialized file they hash.

    sd-scripts ``library/train_util.py`` ``precalculate_safetensors_hashes(tensors, metadata)``
    (kohya-ss/sd-scripts @ 48d368fa): serialize with ``safetensors.torch.save(tensors, metadata)``
    keeping only the ``ss_*`` metadata; ``addnet_hash_safetensors``: sha256 of the bytes after the
    8-byte length and the header; ``addnet_hash_legacy``: sha256 of the 0x10000 bytes from offset
    0x100000, first 8 hex digits (of nothing, for a file shorter than 1 MiB).
    """
    from safetensors.torch import save

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save(tensors, ss)
    n = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + n :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash, blob


def _data_hash(path: Path) -> str | None:
    """sha256 of a safetensors file's bytes after its header (``addnet_hash_safetensors`` of the file)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
            return h.hexdigest()
    except OSError:
        return None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def kohya_metadata(adapter: Adapter, options: WriteOptions) -> dict[str, str]:
    """The header to write: the input's own (all of it when it was kohya), loractl's provenance,
    and ``ss_network_module`` / ``ss_network_dim`` / ``ss_network_alpha`` that describe the modules
    written ("Dynamic" when they vary, as sd-scripts' ``resize_lora.py``)."""
    meta = {
        k: v
        for k, v in adapter.metadata.items()
        if not k.startswith("loractl.") and k not in _FOREIGN_METADATA
    }
    meta.update(options.metadata)
    mods = list(adapter.modules.values())
    if not mods:
        return meta
    ranks = {m.rank for m in mods}
    alphas = {m.alpha if not m.rslora else alpha_for_scale(m.scale, m.rank) for m in mods}
    meta.setdefault("ss_network_module", "networks.lora")
    if len(ranks) > 1:
        meta["ss_network_dim"] = "Dynamic"
    elif _number(meta.get("ss_network_dim")) != float(next(iter(ranks))):
        meta["ss_network_dim"] = str(next(iter(ranks)))
    if len(alphas) > 1:
        meta["ss_network_alpha"] = "Dynamic"
    elif _number(meta.get("ss_network_alpha")) != next(iter(alphas)):
        meta["ss_network_alpha"] = repr(next(iter(alphas)))
    return meta


def write(adapter: Adapter, out: Path, options: WriteOptions) -> None:
    """One kohya ``.safetensors`` at ``out``, laid out as ``safetensors.torch.save`` lays it out, with
    ``sshs_model_hash`` / ``sshs_legacy_hash`` recomputed as sd-scripts does (so they describe this file).

    ``modelspec.hash_sha256`` (a hash over the tensors in the trainer's order) is kept only when the
    tensors are byte-identical to the kohya file read; otherwise it is dropped rather than left stale.
    """
    from ..io.safetensors import write_file

    tensors = kohya_tensors(adapter, options.base_config)
    meta = kohya_metadata(adapter, options)
    model_hash, legacy_hash, blob = sshs_hashes(tensors, meta)
    if "modelspec.hash_sha256" in meta:
        same = (
            adapter.format == "kohya" and bool(adapter.files) and _data_hash(adapter.files[0]) == model_hash
        )
        if not same:
            del meta["modelspec.hash_sha256"]
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    n = int.from_bytes(blob[:8], "little")
    header: dict[str, Any] = json.loads(blob[8 : 8 + n])
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    del blob
    write_file(out, {k: tensors[k] for k in order}, meta)
