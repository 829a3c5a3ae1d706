"""Train state, optimizers with frozen modules and per-module learning rates, guarded updates.

Parameters are labelled by module: `vision` (the vision tower without its mergers), `merger` (the
patch merger, and Qwen3-VL's DeepStack mergers) and
`language_model` (decoder, embeddings and `lm_head`). A stage trains a subset; frozen parameters get
zero updates (and no optimizer moments).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

MODULES = ("vision", "merger", "language_model")


def train_compiler_options() -> dict[str, str]:
    """XLA compile options of the training programs (`sft_step`, `grpo_step`, `score_responses`).

    On a CPU, JAX 0.10's XLA hands each matmul to YNNPACK; with its fusion type set to `DOT`, a dot
    takes its operands' transposes into its own fusion instead of XLA first copying the [tokens,
    features] activations into the transposed layout the weight gradients need (XLA's own transposes
    ran at ~0.2 GB/s: ~0.9 s of a 7.9 s SFT step on the ~50M model of `scripts/bench_mfu.py`).
    Measured on 2 cores, 2026-12-03: SFT step 1.18x faster (same process, both compiles
    alternating); MFU of the SFT step / GRPO update 42% / 36% -> 56% / 53%; no measurable change on
    `scripts/bench_grpo.py`'s 19.5M model. Not set for the sampler: its small decode-step matmuls
    ran 5-7% slower with it (same-process A/B). The option is a field of XLA's DebugOptions on
    every backend (the GPU and TPU compilers ignore it; libtpu 0.0.52 accepts it); it is named
    only for the JAX 0.10 line, where it exists and was measured, since an unknown option fails
    every compile."""
    import jaxlib

    if tuple(int(x) for x in jaxlib.__version__.split(".")[:2]) != (0, 10):
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


MERGER_KEYS = ("merger", "deepstack_merger_list")  # children of `visual` labelled `merger`


class TrainState(NamedTuple):
    params: Any  # nnx.State of arrays
    opt_state: Any
    step: jax.Array  # int32: optimizer steps taken in this stage (updates applied or skipped)
    skipped: jax.Array  # int32: updates skipped because the loss or a gradient was not finite


def module_of(path: tuple) -> str:
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys and keys[0] == "visual":
        return "merger" if len(keys) > 1 and keys[1] in MERGER_KEYS else "vision"
    return "language_model"


def module_labels(params) -> Any:
    """Same structure as `params`, each leaf its module label."""
    return jax.tree_util.tree_map_with_path(lambda p, _: module_of(p), params)


def schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    lr, warm = opt_cfg.lr, opt_cfg.warmup_steps
    if opt_cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif opt_cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1))
    else:
        main = optax.linear_schedule(lr, 0.0, max(total_steps - warm, 1))
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def _base(opt_cfg, lr) -> optax.GradientTransformation:
    if opt_cfg.name == "adamw":
        return optax.adamw(
            lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay
        )
    if opt_cfg.name == "sgd":
        return optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay), optax.sgd(lr))
    return optax.adafactor(lr, weight_decay_rate=opt_cfg.weight_decay or None)


class GradNormState(NamedTuple):
    grad_norm: jax.Array  # global norm of the last update's trainable gradients (before clipping)


def record_grad_norm() -> optax.GradientTransformation:
    """Identity that keeps the global norm of what it sees in its state, so `apply_gradients` can
    report the norm of the gradients that are actually trained (frozen modules' already zeroed)."""

    def init(params):
        del params
        return GradNormState(jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del state, params
        return updates, GradNormState(optax.global_norm(updates).astype(jnp.float32))

    return optax.GradientTransformation(init, update)


def make_optimizer(opt_cfg, total_steps: int, trainable: tuple[str, ...]) -> optax.GradientTransformation:
    """The stage optimizer (see `_make_optimizer`). A constant schedule does not use the stage
    length, so it is left out of the cache key: stages of different lengths with the same settings
    share one optimizer object, hence one compiled step (the optimizer is a static argument)."""
    if opt_cfg.schedule == "constant":
        total_steps = 0
    return _make_optimizer(opt_cfg, total_steps, tuple(trainable))


@functools.lru_cache(maxsize=64)
def _make_optimizer(opt_cfg, total_steps: int, trainable: tuple[str, ...]) -> optax.GradientTransformation:
    """Frozen modules' gradients zeroed, the remaining (trainable) gradients' norm recorded for the
    `grad_norm` metric, then global-norm clipping (so only trainable gradients count in the norm: a
    frozen tower's large gradient must not shrink the trained modules' update), then the configured
    optimizer per trainable module (with its lr multiplier); frozen modules get
    `set_to_zero` (no optimizer moments).

    Cached on its (hashable) arguments: the optimizer is a static argument of the jitted steps, so
    stages (and resumed runs) with the same optimizer settings reuse the compiled step."""
    unknown = set(trainable) - set(MODULES)
    if unknown:
        raise ValueError(f"trainable: unknown modules {sorted(unknown)}; valid: {MODULES}")
    mult = dict(opt_cfg.lr_multipliers)
    sched = schedule(opt_cfg, total_steps)
    transforms = {}
    for m in MODULES:
        if m in trainable:
            scale = float(mult.get(m, 1.0))
            transforms[m] = _base(opt_cfg, lambda count, s=scale: s * sched(count))
        else:
            transforms[m] = optax.set_to_zero()
    keep_trainable = optax.multi_transform(
        {m: optax.identity() if m in trainable else optax.set_to_zero() for m in MODULES}, module_labels
    )
    chain = [keep_trainable, record_grad_norm()]
    if opt_cfg.max_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(opt_cfg.max_grad_norm))
    return optax.chain(*chain, optax.multi_transform(transforms, module_labels))


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def state_shardings(state_abstract: TrainState, params) -> TrainState | None:
    """Shardings for a `TrainState` whose arrays mirror `params`: the parameters' own shardings for
    the parameters and for every optimizer leaf that is a parameter-shaped moment (its tree path
    ends with a parameter's path and the shapes agree), the parameters' mesh replicated for the rest
    (counters, scalars). None when the parameters are not placed with `NamedSharding`s."""
    by_path = {}
    mesh = None
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        sh = getattr(x, "sharding", None)
        if not isinstance(sh, jax.sharding.NamedSharding):
            return None
        mesh = sh.mesh
        spec = list(sh.spec)
        while spec and spec[-1] is None:  # the form the steps' outputs come back in (no recompile)
            spec.pop()
        sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        by_path[tuple(_key(k) for k in path)] = (tuple(x.shape), sh)
    if mesh is None:
        return None
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(path, x):
        keys = tuple(_key(k) for k in path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(place, state_abstract)


@functools.lru_cache(maxsize=64)
def _init_fn(optimizer: optax.GradientTransformation, out_shardings=None):
    # Copy the parameters: the steps donate the state, which must not delete the caller's arrays.
    return jax.jit(
        lambda p: TrainState(jax.tree.map(jnp.copy, p), optimizer.init(p), jnp.int32(0), jnp.int32(0)),
        out_shardings=None if out_shardings is None else out_shardings.unflatten(),
    )


def init_fn(params, optimizer: optax.GradientTransformation):
    """The jitted optimizer init for `params` (arrays or abstract arrays with shardings): its
    outputs are placed explicitly, moments sharded like their parameters (left to the compiler,
    AdamW moments came out replicated, and the first step then compiled a second time when it
    returned them sharded)."""
    abstract = jax.eval_shape(
        lambda p: TrainState(p, optimizer.init(p), jnp.int32(0), jnp.int32(0)), params
    )
    shardings = state_shardings(abstract, params)
    if shardings is None:
        return _init_fn(optimizer)
    leaves, treedef = jax.tree.flatten(shardings)
    return _init_fn(optimizer, _Hashable(treedef, tuple(leaves)))


class _Hashable(NamedTuple):
    """A sharding tree as a hashable cache key (jit accepts it back via `unflatten`)."""

    treedef: Any
    leaves: tuple

    def unflatten(self):
        return jax.tree.unflatten(self.treedef, list(self.leaves))


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """Fresh optimizer state, built in one jit with every leaf placed on the parameters' mesh
    (moments like their parameters), so the step functions see the same shardings on every call
    and compile once."""
    return init_fn(params, optimizer)(params)


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def apply_gradients(state: TrainState, grads, loss, optimizer) -> tuple[TrainState, dict]:
    """One optimizer update, or none (state unchanged, `skipped` + 1) when the loss or any gradient
    is not finite, so a NaN never reaches the parameters or a checkpoint."""
    ok = jnp.isfinite(loss) & all_finite(grads)
    safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, 0), grads)
    updates, new_opt = optimizer.update(safe_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(
        keep(new_params, state.params),
        keep(new_opt, state.opt_state),
        state.step + 1,
        state.skipped + (~ok).astype(jnp.int32),
    )
    # the norm `record_grad_norm` saw (trainable modules only); an optimizer without it: all grads
    norms = optax.tree_utils.tree_get_all_with_path(new_opt, "grad_norm")
    grad_norm = norms[0][1] if norms else optax.global_norm(safe_grads)
    metrics = {"grad_norm": grad_norm, "update_ok": ok.astype(jnp.float32)}
    return new_state, metrics
