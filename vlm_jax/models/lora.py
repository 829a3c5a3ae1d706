"""Low-rank adapters (LoRA) over the linear layers of both towers and the merger.

The adapters live apart from the model's parameters, as a nested dict that mirrors the parameter
paths down to each adapted `Dense` module: `{"language_model": {"layers": {"0": {"self_attn":
{"q_proj": {"lora_a": [in, r], "lora_b": [r, out]}}}}}}` (fp32). `LoraParams(base, adapters, scale)`
stands wherever plain parameters do (sampler, scoring, evaluation, the steps' forward): `bind`
builds the module from the frozen base and attaches each adapter to its `Dense`, which then computes
`x @ W + scale * (x @ a) @ b` (applied, not merged: no second copy of the weights; the sampler's fused
decode projections merge them into the copies they make anyway). Only the adapters are a step's
trained parameters, so gradients and optimizer moments exist for them alone.

Initialisation follows PEFT (a: Kaiming-uniform, bound 1/sqrt(in); b: zeros; scale alpha / rank), so
an adapted model starts equal to its base, and `peft_state` writes the adapters in PEFT's format.

Why not qwix (`qwix.LoraProvider`): qwix adds its adapters by intercepting the modules' matmuls
while tracing the model, as new variables inside the modules. This model's sampler reads the q/k/v
and gate/up kernels directly to fuse them into one projection per layer (`decode_weights`), which
interception does not see, and the trainer's parameter tree (HF name mapping, logical-axis sharding,
checkpoints, module labels of the optimizer) would change shape. Adapters as a separate tree keep all
of that as it is; so no QLoRA (nf4 base) either.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

# `targets` aliases (full-match regexes over the dotted module path, e.g. "visual.blocks.3.attn.qkv")
ALIASES = {
    "language": r"language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    "attention": r"language_model\.layers\.\d+\.self_attn\.[qkvo]_proj",
    "vision": r"visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.\w+)",
    "merger": r"visual\.(merger|deepstack_merger_list\.\d+)\.\w+",
}
# the modules an adapter may sit on: linear layers of the decoder, the vision blocks and the mergers
# (not the embeddings, `lm_head` or the convolutional patch embedding)
ADAPTABLE = re.compile(r"language_model\.layers\.\d+\..+|visual\.(blocks\.\d+|merger|deepstack_merger_list\.\d+)\..+")


class LoraParams(struct.PyTreeNode):
    """A frozen base with its adapters; accepted wherever parameters are (see `bind`)."""

    base: Any
    adapters: Any
    scale: float = struct.field(pytree_node=False)


class Frozen(struct.PyTreeNode):
    """What a LoRA step holds fixed: the base parameters and the adapters' scale (alpha / rank)."""

    params: Any
    scale: float = struct.field(pytree_node=False)


def with_adapters(frozen: Frozen | None, params):
    """The parameters a step's forward runs with: `params` itself (full training, `frozen` None) or
    the frozen base with `params` as its adapters."""
    return params if frozen is None else LoraParams(frozen.params, params, frozen.scale)


def _keys(path) -> tuple[str, ...]:
    """A parameter's path as strings (an `nnx.State` leaf's trailing `.value` dropped)."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path
                 if not isinstance(k, jax.tree_util.GetAttrKey))


def patterns(targets) -> list[str]:
    return [ALIASES.get(t, t) for t in targets]


def target_modules(params, targets) -> dict[str, tuple[int, int]]:
    """Dotted module path -> kernel shape (in, out) of every adaptable linear layer that a pattern of
    `targets` (aliases in `ALIASES`, or full-match regexes) matches. Raises ValueError naming a
    pattern that matches none."""
    pats = patterns(targets)
    compiled = []
    for t, p in zip(targets, pats):
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"lora.targets: {t!r} is not a valid regular expression ({e})") from None
    modules = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = _keys(path)
        if keys[-1] == "kernel" and len(leaf.shape) == 2:
            modules[".".join(keys[:-1])] = tuple(leaf.shape)
    adaptable = {m: s for m, s in modules.items() if ADAPTABLE.fullmatch(m)}
    out = {}
    for t, c in zip(targets, compiled):
        hit = {m: s for m, s in adaptable.items() if c.fullmatch(m)}
        if not hit:
            examples = ", ".join(sorted(adaptable)[:3] + sorted(adaptable)[-2:])
            raise ValueError(
                f"lora.targets: {t!r} matches no adaptable linear layer (full match over module paths "
                f"such as {examples}; aliases: {', '.join(ALIASES)})"
            )
        out.update(hit)
    return dict(sorted(out.items()))


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        keys = name.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return tree


def iter_adapters(adapters) -> Iterator[tuple[str, Any, Any]]:
    """(dotted module path, a, b) of every adapter in the tree."""

    def walk(node, prefix):
        if "lora_a" in node:
            yield ".".join(prefix), node["lora_a"], node["lora_b"]
            return
        for k in node:
            yield from walk(node[k], prefix + (k,))

    yield from walk(adapters, ())


def init_adapters(params, targets, rank: int, rng, mesh=None) -> dict:
    """Fresh adapters (fp32) for the modules `targets` selects: a Kaiming-uniform (PEFT's default,
    bound 1/sqrt(in)), b zeros, so the adapted model starts equal to its base. On `mesh` they are
    replicated (they are small)."""
    flat = {}
    for i, (name, (din, dout)) in enumerate(target_modules(params, targets).items()):
        bound = 1.0 / np.sqrt(din)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (din, rank), jnp.float32, -bound, bound)
        flat[name] = {"lora_a": a, "lora_b": jnp.zeros((rank, dout), jnp.float32)}
    tree = _nest(flat)
    if mesh is not None:
        tree = jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return tree


def abstract_adapters(params, targets, rank: int) -> dict:
    """The adapters' shapes (`jax.ShapeDtypeStruct`), without computing anything."""
    return jax.eval_shape(lambda: init_adapters(params, targets, rank, jax.random.key(0)))


def attach(model, adapters, scale: float) -> None:
    """Sets each adapter on its `Dense` module of `model` (a module built from the base for one
    forward; the attribute is not a parameter, see `Dense.lora`)."""
    for name, a, b in iter_adapters(adapters):
        node = model
        for k in name.split("."):
            node = node[int(k)] if k.isdigit() else getattr(node, k)
        object.__setattr__(node, "lora", (a, b, scale))


def bind(graphdef, params):
    """The module for `params`: plain parameters, or a `LoraParams` (base module, adapters attached)."""
    if isinstance(params, LoraParams):
        model = nnx.merge(graphdef, params.base)
        attach(model, params.adapters, params.scale)
        return model
    return nnx.merge(graphdef, params)


@jax.jit
def _merge(base, adapters, scale):
    deltas = {name: (a, b) for name, a, b in iter_adapters(adapters)}

    def one(path, w):
        keys = _keys(path)
        hit = deltas.get(".".join(keys[:-1])) if keys[-1] == "kernel" else None
        if hit is None:
            return w
        a, b = hit
        return (w.astype(jnp.float32) + (a @ b) * scale).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(one, base)


def merge(params: LoraParams, dtype=None):
    """Plain parameters equal to the adapted model: each adapted kernel + scale * a @ b (computed in
    fp32), stored as `dtype` (default: the base's dtype)."""
    merged = _merge(params.base, params.adapters, jnp.float32(params.scale))
    if dtype is not None:
        merged = jax.tree.map(lambda x: x.astype(dtype), merged)
    return merged


def cast(params, dtype):
    """The base stored as `dtype` (shardings kept); the same arrays when already so."""
    def one(x):
        if x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):  # an abstract base (a restore target)
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(one, params)


def num_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
