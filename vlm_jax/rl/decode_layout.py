"""The sampler's decoding layout (`grpo.rollout_tensor`): a mesh over the same devices with the
model's heads, KV heads and MLP split over `tensor` and nothing over `fsdp`, and a copy of the
parameters resharded onto it once per rollout (docs/scale.md)."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import PartitionSpec as P

from vlm_jax import sharding as shd
from vlm_jax.models import lora


def check_decode_layout(model_config, n_devices: int, tensor: int, key: str = "grpo.rollout_tensor") -> None:
    """Raises `ConfigError` (naming `key`) unless `tensor` divides the device count and the model's
    KV heads (each decoding shard then holds whole KV heads with their query heads)."""
    from vlm_jax.config import ConfigError

    kv = model_config.text.num_key_value_heads
    if n_devices % tensor:
        raise ConfigError(f"{tensor} does not divide the {n_devices} devices", key)
    if kv % tensor:
        raise ConfigError(f"{tensor} does not divide the model's {kv} KV heads", key)


def decode_mesh(mesh, tensor: int):
    """The decoding mesh over `mesh`'s devices: (data = devices / tensor, fsdp = 1, tensor)."""
    from vlm_jax.config import MeshConfig

    n = mesh.devices.size
    return shd.make_mesh(MeshConfig(data=n // tensor, fsdp=1, tensor=tensor), devices=list(mesh.devices.flat))


def decode_shardings(model, params, mesh, rules=None):
    """Shardings on `mesh` for every array of `params` (plain parameters or `lora.LoraParams`): the
    parameters by their logical axis names under `rules`, LoRA adapters replicated (they are small)."""
    from vlm_jax.models import abstract_model

    _, abstract = abstract_model(model.family, model.config, model.dtype, model.options)
    places = jax.tree.leaves(shd.param_shardings(abstract, mesh, rules),
                             is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))

    def like(tree):
        leaves, treedef = jax.tree.flatten(tree)
        if len(leaves) != len(places):
            raise ValueError(f"{len(leaves)} parameter arrays but the model has {len(places)}")
        return jax.tree.unflatten(treedef, places)

    if isinstance(params, lora.LoraParams):
        replicated = jax.sharding.NamedSharding(mesh, P())
        return lora.LoraParams(like(params.base), jax.tree.map(lambda _: replicated, params.adapters),
                               params.scale)
    return like(params)


def decode_layout(model, params, tensor: int, rules=None):
    """(model, params) for sampling in a decoding layout: the model on `decode_mesh(model.mesh,
    tensor)` and a copy of `params` resharded there once (heads, KV heads and MLP over `tensor`,
    nothing over `fsdp`), so each device decodes its own rows with its weight shards in place. With
    FSDP-sharded weights the compiler instead has every device compute all rows against its slice of
    each weight's hidden dim and all-reduce the partial products at every token (docs/scale.md).
    The copy is the caller's to drop."""
    if model.mesh is None:
        raise ValueError("a decoding layout needs a model on a mesh")
    check_decode_layout(model.config, model.mesh.devices.size, tensor)
    mesh = decode_mesh(model.mesh, tensor)
    resharded = jax.device_put(params, decode_shardings(model, params, mesh, rules))
    return dataclasses.replace(model, mesh=mesh), resharded
