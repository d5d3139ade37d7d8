"""Mutations of JSON inputs: adapter_config.json, the base's config.json, model.safetensors.index.json.

Families:
    config       adapter_config.json: r, lora_alpha, patterns, target and saved modules, flags
    base-config  the base model's config.json
    index        model.safetensors.index.json: weight_map and metadata
A third of the mutations are textual (any JSON file): empty, null, a list, non-UTF-8, a BOM,
UTF-16, truncated, trailing garbage, deep nesting, duplicate keys, a huge string.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .values import Raw, dumps, nested, nested_obj, odd_value, short

CONFIG_VALUES: dict[str, list[Any]] = {
    "r": [0, 4, 16, -8, 8.0, 8.5, "8", None, True, 10**9, 2**63, Raw("1e400"), Raw("NaN")],
    "lora_alpha": [
        0,
        -16,
        0.0,
        1e308,
        "16",
        None,
        Raw("NaN"),
        Raw("Infinity"),
        Raw("-Infinity"),
        1e-320,
        True,
    ],
    "target_modules": [
        "all-linear",
        ".*q_proj",
        ".*",
        "[",
        [],
        ["nonexistent"],
        [1, 2],
        [None],
        "",
        ["q_proj", 5],
        {"q_proj": 1},
        ["model.layers.0.self_attn.q_proj"],
        [""],
    ],  # fmt: skip
    "modules_to_save": [
        ["lm_head"],
        ["embed_tokens"],
        "lm_head",
        [None],
        [5],
        [""],
        ["nonexistent"],
        {"a": 1},
    ],
    "rank_pattern": [
        {"q_proj": 4},
        {"q_proj": 0},
        {"q_proj": "x"},
        {".*": 16},
        {"model.layers.0.self_attn.q_proj": 2},
        {"q_proj": -1},
        [],
        "x",
        {"[": 4},
        {"q_proj": None},
        {"q_proj": 2**63},
    ],  # fmt: skip
    "alpha_pattern": [
        {"q_proj": 0},
        {"q_proj": -16},
        {"q_proj": Raw("NaN")},
        {".*": 1e308},
        {"q_proj": "x"},
        [],
        {"(": 2},
        {"q_proj": None},
    ],  # fmt: skip
    "use_rslora": [True, "yes", 1, None, []],
    "use_dora": [True, "true", 1, None],
    "peft_type": ["LOHA", "LOKR", "IA3", "ADALORA", "lora", "", None, 5, "X" * 1000, "VERA"],
    "fan_in_fan_out": [True, "x", 1],
    "layers_to_transform": [[0], [5], 0, "x", [-1], [], [0.5]],
    "layers_pattern": ["layers", "x", ["layers"], 5],
    "target_parameters": [["x"], "x", ["model.layers.0.mlp.gate_proj.weight"], [None], {}],
    "base_model_name_or_path": ["org/model", "/etc", "", None, 5, "../../../../", "/dev/urandom", "x" * 300],
    "task_type": ["x", None, 5, "SEQ_2_SEQ_LM"],
    "init_lora_weights": ["pissa", "olora", "corda", "eva", "loftq", False, "x"],
    "exclude_modules": ["q_proj", ["q_proj"], 5, [".*"]],
    "bias": ["all", "lora_only", "x", None],
    "lora_bias": [True, "x"],
    "use_qalora": [True],
    "trainable_token_indices": [[0, 1], {"embed_tokens": [0]}, "x", [-1], [10**9]],
    "layer_replication": [[[0, 1]], [[0, 5]], "x", [[1, 0]], [[-1, 2]]],
    "alora_invocation_tokens": [[1, 2], "x", []],
    "megatron_config": [{"a": 1}, "x"],
}

BASE_CONFIG_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rope_theta",
                    "tie_word_embeddings", "torch_dtype", "dtype", "max_position_embeddings", "rms_norm_eps",
                    "rope_scaling", "quantization_config", "bos_token_id")  # fmt: skip
BASE_CONFIG_VALUES: dict[str, list[Any]] = {
    "model_type": ["gpt2", "x", "", None, 5, "llama" * 100],
    "architectures": [[], ["X"], "LlamaForCausalLM", None, [5], ["GPT2LMHeadModel"]],
    "quantization_config": [
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        {"quant_method": "gptq"},
        "x",
    ],
    "rope_scaling": [{"rope_type": "x"}, {"type": "linear", "factor": 0}, "x", 5],
    "torch_dtype": ["float8", "x", 5, None],
    "dtype": ["float8", "x", 5, None],
}

INDEX_PATHS = ["", ".", "..", "../lora/adapter_model.safetensors", "/etc/passwd", "/dev/urandom", "/proc/self/mem",
               "nonexistent.safetensors", "x" * 300 + ".safetensors", "loractl.receipt", "model.safetensors.index.json",
               "config.json", "tokenizer.json", "sub/model.safetensors", "model-00001-of-00002.safetensors/",
               "a\u0000b.safetensors", "é.safetensors", "/", "../base/model-00001-of-00002.safetensors",
               "model-00001-of-00002.safetensors/../model-00002-of-00002.safetensors"]  # fmt: skip


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def text(rng: random.Random, path: Path) -> tuple[str, str]:
    """A textual corruption of any JSON file."""
    t = path.read_text()
    what = rng.choice(["empty", "null", "list", "number", "string", "nonutf8", "bom", "utf16", "truncated",
                       "trailing", "nesting", "nesting-object", "duplicate", "huge-string", "nan"])  # fmt: skip
    if what == "empty":
        data = b""
    elif what in ("null", "list", "number", "string"):
        data = {"null": b"null", "list": b"[]", "number": b"5", "string": b'"x"'}[what]
    elif what == "nonutf8":
        b = t.encode()
        i = rng.randrange(len(b))
        data = b[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]) + b[i:]
    elif what == "bom":
        data = b"\xef\xbb\xbf" + t.encode()
    elif what == "utf16":
        data = t.encode("utf-16")
    elif what == "truncated":
        data = t.encode()[: rng.randrange(len(t))]
    elif what == "trailing":
        data = t.encode() + rng.choice([b"x", b"}", b"\x00", b"\n{}"])
    elif what in ("nesting", "nesting-object"):
        depth = rng.choice([1000, 100_000])
        inner = nested(depth) if what == "nesting" else nested_obj(depth)
        data = dumps(
            {**_load(path), rng.choice(["r", "weight_map", "lora_alpha", "x", "hidden_size"]): inner}
        ).encode()
    elif what == "duplicate":
        obj = _load(path)
        k = rng.choice(sorted(obj)) if isinstance(obj, dict) and obj else "x"
        s = dumps(obj)
        data = (s[:-1] + ("," if obj else "") + dumps({k: odd_value(rng)})[1:]).encode()
    elif what == "huge-string":
        obj = _load(path)
        obj[rng.choice(sorted(obj))] = "x" * rng.choice([10**6, 10**7])
        data = dumps(obj).encode()
    else:  # nan
        obj = _load(path)
        obj[rng.choice(sorted(obj))] = Raw(rng.choice(["NaN", "Infinity", "-Infinity", "1e400"]))
        data = dumps(obj).encode()
    path.write_bytes(data)
    return f"text:{what}", f"{len(data)} bytes"


def config(rng: random.Random, path: Path) -> tuple[str, str]:
    if rng.random() < 0.3:
        return text(rng, path)
    c = _load(path)
    what = rng.choice(["value", "value", "value", "odd", "remove"])
    key = rng.choice(sorted(CONFIG_VALUES)) if what != "remove" else rng.choice(["r", "lora_alpha", "target_modules",
                                                                                  "peft_type", "rank_pattern"])  # fmt: skip
    if what == "remove":
        c.pop(key, None)
        v: Any = "(removed)"
    else:
        v = rng.choice(CONFIG_VALUES[key]) if what == "value" else odd_value(rng, c.get(key))
        c[key] = v
    path.write_text(dumps(c, indent=2))
    return f"{what}:{key}", short(v)


def base_config(rng: random.Random, path: Path) -> tuple[str, str]:
    if rng.random() < 0.3:
        return text(rng, path)
    c = _load(path)
    key = rng.choice(BASE_CONFIG_KEYS)
    if rng.random() < 0.15:
        c.pop(key, None)
        v: Any = "(removed)"
    else:
        v = (
            rng.choice(BASE_CONFIG_VALUES[key])
            if key in BASE_CONFIG_VALUES and rng.random() < 0.6
            else odd_value(rng, c.get(key))
        )
        c[key] = v
    path.write_text(dumps(c, indent=2))
    return f"key:{key}", short(v)


def index(rng: random.Random, path: Path) -> tuple[str, str]:
    if rng.random() < 0.25:
        return text(rng, path)
    ix = _load(path)
    wm = ix["weight_map"]
    keys = sorted(wm)
    shards = sorted(set(wm.values()))
    what = rng.choice(["path", "path", "path", "weight_map", "entry-value", "drop", "add", "other-shard", "metadata",
                       "toplevel", "duplicate"])  # fmt: skip
    k = rng.choice(keys)
    if what == "path":
        v: Any = rng.choice(INDEX_PATHS)
        if rng.random() < 0.5:  # every tensor of a shard
            old = rng.choice(shards)
            for kk in keys:
                if wm[kk] == old:
                    wm[kk] = v
            k = f"all of {old}"
        else:
            wm[k] = v
    elif what == "weight_map":
        ix["weight_map"] = v = rng.choice(
            [None, 5, [], "x", {}, [list(i) for i in wm.items()], nested(100_000)]
        )
    elif what == "entry-value":
        wm[k] = v = rng.choice([None, 5, [shards[0]], {}, True, Raw("NaN")])
    elif what == "drop":
        del wm[k]
        v = "(removed)"
    elif what == "add":
        k = rng.choice(
            ["model.layers.9.self_attn.q_proj.weight", "x", "", k + ".extra", "lm_head.weight.weight"]
        )
        wm[k] = v = rng.choice(shards)
    elif what == "other-shard":
        wm[k] = v = rng.choice([s for s in shards if s != wm[k]] or shards)
    elif what == "metadata":
        ix["metadata"] = v = rng.choice([None, 5, "x", [], {"total_size": "x"}, {"total_size": -1},
                                         {"total_size": Raw("1e400")}, {"total_size": 2**64}, {"total_size": 0}])  # fmt: skip
    elif what == "toplevel":
        v = rng.choice(["weight_map missing", "weight-map", "WEIGHT_MAP"])
        ix = (
            {("weight-map" if v == "weight-map" else "WEIGHT_MAP"): wm}
            if v != "weight_map missing"
            else {"metadata": {}}
        )
    else:  # duplicate: the same tensor in two shards, as two keys in the text
        s = dumps(ix, indent=2)
        other = rng.choice([x for x in shards if x != wm[k]] or shards)
        s = s.replace(
            '"weight_map": {', '"weight_map": {' + json.dumps(k) + ": " + json.dumps(other) + ",", 1
        )
        path.write_text(s)
        return "index:duplicate", f"{k} -> {other} and {wm[k]}"
    path.write_text(dumps(ix, indent=2))
    if what in ("weight_map", "metadata", "toplevel"):
        return f"index:{what}", short(v)
    return f"index:{what}", f"{short(k, 50)}: {short(v)}"
