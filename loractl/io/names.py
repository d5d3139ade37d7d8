"""The file names of a base model's weights, as transformers and diffusers save them.

Shared by the reader of local folders (:mod:`loractl.io.base`) and the Hub resolver
(:mod:`loractl.io.hub`), which import this module and not each other's.
"""

from __future__ import annotations

#: the safetensors index of a sharded model, in the order they are looked for
INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
#: the one weights file of an unsharded model
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
