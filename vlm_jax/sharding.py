"""Mesh construction and logical-axis sharding.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, ...); one rules table (in the config)
maps each name to a mesh axis (or several, or None). Batches shard over (`data`, `fsdp`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]

log = logging.getLogger(__name__)


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh from a `MeshConfig`-like object (None: all devices on `data`)."""
    from vlm_jax.config import MeshConfig

    devices = jax.devices() if devices is None else list(devices)
    shape = (mesh_cfg or MeshConfig()).shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def default_rules() -> tuple:
    from vlm_jax.config import LOGICAL_AXIS_RULES  # the one rules table lives with the config

    return tuple(LOGICAL_AXIS_RULES)


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules | None = None
) -> P:
    """PartitionSpec for one array. A dim whose size the mesh axes do not divide, or a mesh axis
    already used by an earlier dim, stays replicated (logged once per name)."""
    table = dict(default_rules() if rules is None else rules)
    used: set[str] = set()
    out = []
    for name, size in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
        n = math.prod(mesh.shape[a] for a in axes)
        if axes and size % n:
            log.info("dim %s of size %d is not divisible by mesh axes %s; replicated", name, size, axes)
            axes = ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def param_specs(abstract_state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """PartitionSpecs for an abstract (eval_shape) parameter state, from its logical axis names."""

    def spec(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return logical_to_spec(names, var.shape, mesh, rules)

    return jax.tree.map(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(abstract_state, mesh, rules),
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_spec(ndim: int, batch_axis: int = 0) -> P:
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return P(*spec)


def batch_constraint(mesh: Mesh | None):
    """A function that pins an array's leading (batch) dim to the batch axes (data, fsdp) inside a
    jit, the rest replicated; identity without a mesh or when the axes do not divide the batch."""
    if mesh is None or mesh.shape["data"] * mesh.shape["fsdp"] == 1:
        return lambda x: x
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def constrain(x):
        if x.ndim == 0 or x.shape[0] % n:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec(x.ndim)))

    return constrain


def shard_batch(tree, mesh: Mesh, batch_axis_of=lambda path, x: 0):
    """Places numpy arrays on the mesh, batch dim over (data, fsdp) when it divides, else replicated.

    Each array is the global value, the same on every process; each process fills only its own
    devices' slices (no cross-process copy or equality check, so it works with several processes)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(path, x):
        x = np.asarray(x)
        axis = batch_axis_of(path, x)
        if axis is None or x.ndim == 0 or x.shape[axis] % n:
            spec = P()
        else:
            spec = batch_spec(x.ndim, axis)
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    return jax.tree_util.tree_map_with_path(put, tree)


def to_host(tree):
    """Numpy copies of a tree of arrays; arrays spread over several processes are gathered (a
    collective: every process must call it)."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)
