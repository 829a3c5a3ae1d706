"""Hugging Face tensor names <-> vlm_jax parameter paths for Qwen3-VL.

Hub Qwen3-VL files (and transformers-5 `save_pretrained`) use the in-memory names
(`model.visual.*`, `model.language_model.*`, `lm_head.weight`); names without the `model.` /
`language_model.` level (`visual.*`, `model.layers.*`) are accepted too. Layouts as in
`vlm_jax.models.common.params.TensorSpec`.
"""

from __future__ import annotations

from vlm_jax.models.common import params as common
from vlm_jax.models.common.params import TensorSpec
from vlm_jax.models.qwen3_vl.config import Qwen3VLConfig


def _hf_name(path: str) -> tuple[str, str]:
    """JAX param path (dot-joined) -> (HF name, layout)."""
    special = {
        "visual.patch_embed.kernel": ("model.visual.patch_embed.proj.weight", "patch"),
        "visual.patch_embed.bias": ("model.visual.patch_embed.proj.bias", "copy"),
        "visual.pos_embed": ("model.visual.pos_embed.weight", "copy"),
        "language_model.embed_tokens": ("model.language_model.embed_tokens.weight", "copy"),
    }
    if path in special:
        return special[path]
    name = path if path.startswith("lm_head") else "model." + path
    if name.endswith(".kernel"):
        return name[: -len(".kernel")] + ".weight", "linear"
    return name, "copy"


def _legacy(name: str) -> str:
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def tensor_map(param_paths: list[str], cfg: Qwen3VLConfig) -> dict[str, TensorSpec]:
    """TensorSpec for every JAX parameter path (in-memory names preferred, legacy accepted)."""

    def names(path):
        name, layout = _hf_name(path)
        return (name, _legacy(name)), layout

    return common.tensor_map(param_paths, cfg, names)
