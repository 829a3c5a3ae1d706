"""Building blocks both model families share: layers (`Dense`, `RMSNorm`, `LayerNorm`, `GatedMLP`), the
rotary helper, how computation runs (`ModelOptions`, remat policies, layers as one scan, blocks in
runs of one kind).

Parameters carry logical axis names (`sharding_names`); `vlm_jax.sharding` maps them onto the mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

NEG_INF = -1e30  # finite: fully-masked rows (padding) stay NaN-free

REMAT_POLICIES = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model computes (static; part of the graphdef, so a change recompiles).

    `compute_dtype`: activations and matmuls (None: the stored parameters' dtype); parameters are
    cast to it where they are used, so fp32 storage with bf16 compute works. `remat`: per decoder
    layer and vision block, "none", "full" (recompute everything in the backward pass) or
    "save_dots" (keep matmul outputs, recompute the rest). `attention_chunk`: training / prefill
    attention over query chunks of this many tokens with masks computed per chunk (memory linear in
    the sequence; 0 = one dense block). `logits_chunk`: log-probs, entropy and cross-entropy over
    sequence chunks of this many tokens, each chunk's [tokens, vocab] logits recomputed in the
    backward pass (0 = all at once). `scan_layers`: the decoder layers of training, scoring and
    prefill (and the vision blocks, per run of one kind: `run_blocks`) run as one `jax.lax.scan`
    over their parameters stacked at call time (`scan_layers`
    below), so the program holds one layer body and compile time stops growing with depth (layers
    of different structures, e.g. adapters on some layers only, run in the loop)."""

    compute_dtype: str | None = None
    remat: str = "none"
    attention_chunk: int = 512
    logits_chunk: int = 256
    scan_layers: bool = False

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention_chunk < 0 or self.logits_chunk < 0:
            raise ValueError("attention_chunk and logits_chunk must be >= 0")


def remat(fn, policy: str):
    """`fn` under `jax.checkpoint` with the named policy ("none": `fn` itself)."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def same_structure(layers) -> bool:
    """Whether `layers` can run as one scan: the same modules and parameter shapes in each, and no
    LoRA adapters attached (they are attributes, not parameters, so the stacked state would miss
    them: a LoRA forward runs the layers in the loop)."""
    if any(getattr(m, "lora", None) is not None for layer in layers for _, m in nnx.iter_graph(layer)):
        return False  # adapters attached for one forward (`lora.bind`) are not in the split state
    first = nnx.split(layers[0])
    shapes = lambda st: jax.tree.map(lambda a: (a.shape, a.dtype), st)  # noqa: E731
    return all(
        gd == first[0] and shapes(st) == shapes(first[1]) for gd, st in (nnx.split(layer) for layer in layers[1:])
    )


def scan_layers(layers, body, x, xs=None, *, policy: str = "none", dtype=None):
    """Runs `body(layer, x, xs_i) -> (x, ys_i)` over `layers` (modules of one structure) as one
    `jax.lax.scan`: the layers' parameters are stacked at call time into [n, ...] arrays (cast to
    `dtype` first when given, so a bf16-compute stack of fp32 weights costs half their bytes) and
    each iteration merges its slice back into a layer. Storage stays per layer (checkpoints, HF
    import/export, sharding rules and adapters are unchanged); the stack is a transient copy, split
    like the parameters (a stack of FSDP-sharded arrays is sharded the same way, locally). The
    body runs under the remat `policy`. Returns (x, stacked ys)."""
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.split(layer)[1] for layer in layers]

    def cast(a):
        return a.astype(dtype) if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating) else a

    stacked = jax.tree.map(lambda *a: jnp.stack([cast(b) for b in a]), *states)

    def step(carry, inputs):
        state_i, xs_i = inputs
        return body(nnx.merge(graphdef, state_i), carry, xs_i)

    return jax.lax.scan(remat(step, policy), x, (stacked, xs))


def run_blocks(blocks, x, call, *, kinds=None, cuts=(), scan: bool = False, policy: str = "none", dtype=None,
               after=None):
    """`x` through `blocks` with `call(block, x, i) -> x` (`i`: the index of the block, or of the
    first block of its segment: `call` may only depend on `kinds[i]`). Without `scan`, a loop with
    each block under the remat `policy`. With `scan`, each run of consecutive blocks of one kind
    (`kinds`, e.g. window vs full attention) not crossing a cut (an index after which `after(i, x)`
    needs the output, e.g. a DeepStack tap) is one `scan_layers`, so the program holds one body per
    segment, not per block. `after(i, x)` runs after block i for every i in `cuts`."""
    n = len(blocks)
    kinds = kinds or [None] * n
    starts = [0] + [i for i in range(1, n) if kinds[i] != kinds[i - 1] or (i - 1) in cuts]
    for a, b in zip(starts, starts[1:] + [n]):
        seg = list(blocks)[a:b]
        if scan and same_structure(seg):
            x, _ = scan_layers(seg, lambda blk, x_, _, i=a: (call(blk, x_, i), None), x, policy=policy, dtype=dtype)
        else:
            for i, blk in enumerate(seg, start=a):
                x = remat(lambda x_, blk=blk, i=i: call(blk, x_, i), policy)(x)
        if after is not None and (b - 1) in cuts:
            after(b - 1, x)
    return x


def init_param(rngs: nnx.Rngs, shape, scale: float, dtype):
    """A random [shape] initial value: N(0, 1) * scale (parameters are loaded over it)."""
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (a transposed torch Linear weight)."""

    def __init__(
        self, din: int, dout: int, axes: tuple[str | None, str | None], *, bias: bool, dtype, rngs: nnx.Rngs
    ):
        self.kernel = nnx.Param(init_param(rngs, (din, dout), din**-0.5, dtype), sharding_names=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype), sharding_names=(axes[1],)) if bias else None

    # Low-rank adapter (a [in, r], b [r, out], scale) or None: set only on a transient module bound
    # by `vlm_jax.models.lora.bind` (never part of the parameters); applied, not merged.
    lora = None

    def __call__(self, x):
        y = x @ self.kernel[...].astype(x.dtype)
        if self.lora is not None:
            a, b, scale = self.lora
            y = y + ((x @ a.astype(x.dtype)) @ b.astype(x.dtype)) * scale
        return y + self.bias[...].astype(x.dtype) if self.bias is not None else y

    def weight(self):
        """The effective kernel [in, out] (the adapter merged in, when one is bound)."""
        w = self.kernel[...]
        if self.lora is None:
            return w
        a, b, scale = self.lora
        return (w.astype(jnp.float32) + (a.astype(jnp.float32) @ b.astype(jnp.float32)) * scale).astype(w.dtype)


class RMSNorm(nnx.Module):
    """Normalise in fp32, cast back to the input dtype, then multiply by the weight (as transformers)."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), sharding_names=("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch LayerNorm: statistics and affine in fp32, result cast to the input dtype."""

    def __init__(self, dim: int, eps: float, *, dtype, axis_name: str = "norm"):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), sharding_names=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), sharding_names=(axis_name,))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class GatedMLP(nnx.Module):
    """down(silu(gate(x)) * up(x)); the vision tower's has biases, the decoder's does not."""

    def __init__(self, d: int, i: int, axes: tuple[str, str], *, bias: bool, dtype, rngs):
        inner, outer = axes  # logical names of the hidden (d) and intermediate (i) dims
        self.gate_proj = Dense(d, i, (inner, outer), bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(d, i, (inner, outer), bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(i, d, (outer, inner), bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x, gate_up_D2I=None):
        """`gate_up_D2I`: the gate and up kernels stacked (`fused`), for a one-token decode step:
        one matmul instead of two (the same values)."""
        if gate_up_D2I is None:
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        gu = jnp.einsum("nd,dci->nci", x, gate_up_D2I.astype(x.dtype))
        return self.down_proj(jax.nn.silu(gu[:, 0]) * gu[:, 1])

    def fused(self):
        """The gate and up kernels stacked [D, 2, I] (adapters merged in), built once per generation."""
        return jnp.stack([self.gate_proj.weight(), self.up_proj.weight()], axis=1)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    """NeoX rotary: x * cos + rotate_half(x) * sin (cos/sin broadcast against x)."""
    return x * cos + rotate_half(x) * sin
