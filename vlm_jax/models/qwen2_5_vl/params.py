"""Hugging Face tensor names <-> vlm_jax parameter paths for Qwen2.5-VL.

A `TensorMap` entry says which file tensor feeds a JAX parameter and how it is laid out:
`"copy"` (same layout), `"linear"` (torch Linear [out, in] -> kernel [in, out]) or `"patch"`
(Conv3d [V, C, T, p, p] -> kernel [C*T*p*p, V]). Both legacy file names (`visual.*`, `model.layers.*`)
and transformers-5 in-memory names (`model.visual.*`, `model.language_model.*`) are accepted.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from vlm_jax.models.qwen2_5_vl.config import Qwen25VLConfig


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    names: tuple[str, ...]  # accepted file names, preferred (written on save) first
    layout: str  # "copy" | "linear" | "patch"
    file_shape: tuple[int, ...] | None = None  # needed to fold a "patch" kernel back into Conv3d

    def jax_shape(self, file_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.layout == "linear":
            return tuple(reversed(file_shape))
        if self.layout == "patch":
            return (int(np.prod(file_shape[1:])), file_shape[0])
        return tuple(file_shape)

    def to_jax(self, array: np.ndarray) -> np.ndarray:
        if self.layout == "linear":
            return array.T
        if self.layout == "patch":
            return array.reshape(array.shape[0], -1).T
        return array

    def from_jax(self, array: np.ndarray) -> np.ndarray:
        if self.layout == "linear":
            return np.ascontiguousarray(array.T)
        if self.layout == "patch":
            return np.ascontiguousarray(array.T.reshape(self.file_shape))
        return np.ascontiguousarray(array)

    def read_slice(self, get_slice, index: tuple[slice, ...]) -> np.ndarray:
        """Reads only the part of the file tensor that the JAX-layout `index` covers."""
        if self.layout == "copy":
            return get_slice[index]
        if self.layout == "linear":
            return get_slice[index[1], index[0]].T
        rows, cols = index  # patch: rows index C*T*p*p, cols index V
        block = get_slice[cols]
        return block.reshape(block.shape[0], -1).T[rows]


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
    """TensorSpec for every JAX parameter path."""
    v = cfg.vision
    conv_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out = {}
    for path in param_paths:
        legacy, layout = _hf_name(path)
        out[path] = TensorSpec(
            names=(legacy, _legacy_to_v5(legacy)),
            layout=layout,
            file_shape=conv_shape if layout == "patch" else None,
        )
    return out
