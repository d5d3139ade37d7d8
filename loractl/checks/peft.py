"""What PEFT (``PeftModel.from_pretrained``) accepts: a folder with adapter_config.json and
adapter_model.*, whose config builds a ``LoraConfig`` the way ``PeftConfig.from_pretrained`` does
(``PeftConfigMixin.from_peft_type``).

Rules, in order: ``peft-layout`` (:data:`LAYOUT`), ``peft-config`` and ``peft-unavailable``
(:func:`config`).
"""

from __future__ import annotations

import warnings

from .findings import Context, Finding
from .runtime import layout, peft_folder

#: ``peft-layout`` (error): PEFT loads a folder with adapter_config.json and adapter_model.*.
LAYOUT = layout("peft-layout", "PeftModel.from_pretrained", "adapter_config.json + adapter_model.safetensors")


def config(ctx: Context) -> list[Finding]:
    """``peft-config`` (error; warning for ignored keys): the config must build a ``LoraConfig``:
    unknown keys are dropped with a warning (a config from a newer PEFT), anything else ``LoraConfig``
    rejects is an error. ``peft-unavailable`` (info): peft is not a dependency of loractl; without it
    the config is not tried. Nothing to try when the adapter is not a PEFT folder (:data:`LAYOUT`)."""
    a = ctx.adapter
    if peft_folder(a) is not None:
        return []
    try:
        import peft
    except ImportError:
        return [
            Finding(
                "peft-unavailable",
                "info",
                None,
                "peft is not installed, so adapter_config.json was not loaded with peft.LoraConfig (pip install peft)",
            )
        ]
    cfg = dict(a.config)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        return [
            Finding("peft-config", "error", None, f"{a.path}/adapter_config.json: peft_type is {cfg['peft_type']!r}, not LORA")
        ]
    cfg.setdefault("peft_type", "LORA")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft.LoraConfig.from_peft_type(**cfg)
        except Exception as e:  # LoraConfig raises TypeError/ValueError/others for bad values
            return [
                Finding(
                    "peft-config",
                    "error",
                    None,
                    f"{a.path}/adapter_config.json does not load in peft {peft.__version__}: {type(e).__name__}: {e}",
                )
            ]
    return [
        Finding(
            "peft-config",
            "warning",
            None,
            f"{a.path}/adapter_config.json: peft {peft.__version__} ignores some keys: {str(w.message).split('. ')[0]}",
        )
        for w in caught
        if "Unexpected keyword arguments" in str(w.message)
    ]


RULES = [LAYOUT, config]
