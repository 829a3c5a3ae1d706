"""Hugging Face tensor names <-> vlm_jax parameter paths for Qwen2.5-VL.

Layouts as in `vlm_jax.models.common.params.TensorSpec`. Both legacy file names (`visual.*`,
`model.layers.*`) and transformers-5 in-memory names (`model.visual.*`, `model.language_model.*`)
are accepted.
"""

from __future__ import annotations

import re

from vlm_jax.models.common import params as common
from vlm_jax.models.common.params import TensorSpec
from vlm_jax.models.qwen2_5_vl.config import Qwen25VLConfig

__all__ = ["TensorSpec", "tensor_map"]


def _legacy_to_v5(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    return name


def _hf_name(path: str) -> tuple[str, str]:
    """Maps a JAX param path (dot-joined) to (legacy HF name, layout)."""
    p = path
    if p == "visual.patch_embed.kernel":
        return "visual.patch_embed.proj.weight", "patch"
    if p == "language_model.embed_tokens":
        return "model.embed_tokens.weight", "copy"
    if p.startswith("language_model."):
        p = "model." + p[len("language_model.") :]
    p = re.sub(r"\.mlp_(\d)\.", r".mlp.\1.", p)
    if p.endswith(".kernel"):
        return p[: -len(".kernel")] + ".weight", "linear"
    return p, "copy"


def tensor_map(param_paths: list[str], cfg: Qwen25VLConfig) -> dict[str, TensorSpec]:
    """TensorSpec for every JAX parameter path (legacy file names preferred, v5 names accepted)."""

    def names(path):
        legacy, layout = _hf_name(path)
        return (legacy, _legacy_to_v5(legacy)), layout

    return common.tensor_map(param_paths, cfg, names)
