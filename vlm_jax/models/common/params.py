"""Hugging Face tensor names <-> vlm_jax parameter paths, the part both families share.

A `TensorSpec` says which file tensor feeds a JAX parameter and how it is laid out: `"copy"` (same
layout), `"linear"` (torch Linear [out, in] -> kernel [in, out]) or `"patch"` (Conv3d
[V, C, T, p, p] -> kernel [C*T*p*p, V]). A family's `params.py` names the file tensors of each path.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


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


def tensor_map(param_paths: list[str], cfg, names: Callable[[str], tuple[tuple[str, ...], str]]
               ) -> dict[str, TensorSpec]:
    """TensorSpec for every JAX parameter path; `names(path)` gives (accepted file names, preferred
    first; layout). The patch kernel folds back into the vision config's Conv3d shape."""
    v = cfg.vision
    conv_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out = {}
    for path in param_paths:
        accepted, layout = names(path)
        out[path] = TensorSpec(names=accepted, layout=layout, file_shape=conv_shape if layout == "patch" else None)
    return out
