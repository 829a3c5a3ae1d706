"""The memory-at-scale paths compute what the plain ones do: chunked attention and log-probs,
remat, micro-batched gradient accumulation (SFT and GRPO), batch-split activations, and the
precision policy (fp32 storage keeps a 1e-6 update)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hf_reference import build_reference, make_batch, random_rollout_batch
from vlm_jax import config as config_lib
from vlm_jax import models, sharding
from vlm_jax.config import MeshConfig, OptimizerConfig
from vlm_jax.rl import grpo
from vlm_jax.rl.policy import grpo_step, response_logprobs
from vlm_jax.sft import SFTBatch, sft_loss, sft_loss_weights, sft_step
from vlm_jax.train_state import apply_gradients, init_state, make_optimizer

PLAIN = dict(attention_chunk=0, logits_chunk=0, remat="none")
ALL = ("vision", "merger", "language_model")


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale_ref")
    build_reference(path, seed=1)
    return path


def make_env(ref_dir, patch=14):
    model, params = models.from_pretrained(ref_dir, options=PLAIN)
    # images of two sizes, a text-only row, several images in one row
    batch = make_batch([[(4, 4)], [], [(4, 4), (2, 6)], [(6, 4)]], padding="right", seed=5, patch=patch)
    inputs = model.prepare(batch)
    valid = np.asarray(batch["attention_mask"]).astype(bool)
    mask = np.zeros(valid.shape, np.float32)
    for b, n in enumerate((3, 2, 4, 5)):
        last = int(valid[b].sum())
        mask[b, last - n : last] = 1.0
    return SimpleNamespace(model=model, params=params, batch=batch, inputs=inputs, loss_mask=mask)


@pytest.fixture(scope="module")
def env(ref_dir):
    return make_env(ref_dir)


@pytest.fixture(scope="module")
def qwen3_env(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale_ref_qwen3")
    build_reference(path, seed=1, family="qwen3_vl")
    return make_env(path, patch=16)


def sft_value_and_grad(model, params, inputs, loss_mask, normalize="token"):
    w = sft_loss_weights(jnp.asarray(loss_mask[:, 1:]), normalize)
    f = jax.jit(jax.value_and_grad(sft_loss), static_argnums=1)
    return f(params, model.graphdef, inputs, w)


def assert_trees_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "options",
    [
        # each path alone runs with -m slow (the suite's time budget); the combinations stay quick
        pytest.param(dict(attention_chunk=4), marks=pytest.mark.slow),  # a remainder-free divisor of L
        pytest.param(dict(logits_chunk=3), marks=pytest.mark.slow),
        pytest.param(dict(remat="full"), marks=pytest.mark.slow),
        pytest.param(dict(remat="save_dots"), marks=pytest.mark.slow),  # quick in the Qwen3-VL test
        dict(attention_chunk=5, logits_chunk=2, remat="full"),
        dict(scan_layers=True, attention_chunk=5, remat="full"),
    ],
)
def test_memory_saving_paths_equal_the_plain_computation(env, options):
    check_paths_equal_plain(env, options)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(attention_chunk=5, logits_chunk=2, remat="full"), marks=pytest.mark.slow),
        dict(remat="save_dots"),
        # DeepStack layers 0, 1 in the loop, layer 2 scanned (slow: the suite's time budget)
        pytest.param(dict(scan_layers=True, remat="save_dots"), marks=pytest.mark.slow),
    ],
)
def test_qwen3_memory_saving_paths_equal_the_plain_computation(qwen3_env, options):
    """The same for Qwen3-VL (DeepStack features through remat'd vision blocks and decoder layers)."""
    check_paths_equal_plain(qwen3_env, options)


def check_paths_equal_plain(env, options):
    loss0, g0 = sft_value_and_grad(env.model, env.params, env.inputs, env.loss_mask)
    model = env.model.with_options(**options)
    assert model.graphdef != env.model.graphdef
    loss1, g1 = sft_value_and_grad(model, env.params, env.inputs, env.loss_mask)
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
    assert_trees_close(g1, g0, atol=2e-6)
    assert float(optax_norm(g0)) > 1e-2  # the comparison is not between zeros


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("which", ["qwen2_5_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def test_scanned_layers_equal_the_layer_loop_in_prefill_and_with_bf16_compute(env, qwen3_env, which):
    """The sampler's prefill (dense mask, written caches) and a bf16-compute forward give the same
    hidden states and per-layer caches through the layer scan as through the loop."""
    e = env if which == "qwen2_5_vl" else qwen3_env
    inputs = e.inputs
    B, L = inputs.input_ids_BL.shape
    valid = jnp.asarray(inputs.attention_mask_BL) > 0
    causal = jnp.tril(jnp.ones((L, L), bool))[None] & valid[:, None, :]

    def prefill(options, dtype=None):
        model = e.model.with_options(**options)
        m = model.merge(e.params)
        x = m.embed(jnp.asarray(inputs.input_ids_BL), inputs.vision)
        cache = m.init_cache(B, L, valid)
        return m.decode(x, jnp.asarray(inputs.positions_3BL), causal, cache, 0)

    h0, (k0, v0) = jax.jit(lambda: prefill({}))()
    h1, (k1, v1) = jax.jit(lambda: prefill(dict(scan_layers=True)))()
    assert len(k1) == len(k0) == e.model.config.text.num_hidden_layers
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h0), atol=1e-5, rtol=0)  # fp32 round-off
    assert_trees_close((k1, v1), (k0, v0), atol=1e-5)
    if which == "qwen3_vl":
        return  # the bf16 check below is family-independent (the stack's cast); once is enough
    # bf16 compute over fp32 weights (the stack is cast to bf16): as close to fp32 as the loop is
    logits = lambda **o: np.asarray(models.forward(e.model.with_options(**o), e.params, e.batch), np.float32)
    ref = logits()
    err = lambda a: np.linalg.norm(a - ref) / np.linalg.norm(ref)
    err_loop, err_scan = err(logits(compute_dtype="bfloat16")), err(logits(compute_dtype="bfloat16", scan_layers=True))
    assert 0 < err_scan < 2e-2 and err_scan < 1.5 * err_loop, (err_scan, err_loop)


def test_chunked_attention_equals_dense_masked_attention_in_the_logits(env):
    dense = np.asarray(models.forward(env.model, env.params, env.batch))
    chunked = np.asarray(models.forward(env.model.with_options(attention_chunk=3), env.params, env.batch))
    valid = env.batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(chunked[valid], dense[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("normalize", ["sequence"])  # the weights of "token" are its special case
def test_micro_batched_sft_step_equals_one_batch(ref_dir, env, normalize):
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=1), devices=jax.devices()[:2])
    model, params = models.from_pretrained(ref_dir, mesh=mesh, options=PLAIN)
    opt = make_optimizer(OptimizerConfig(name="sgd", lr=0.5, weight_decay=0.0), 10, ALL)
    batch = SFTBatch(models.place_inputs(model, model.prepare(env.batch)),
                     sharding.shard_batch(env.loss_mask, mesh))
    out = {}
    for micro in (0, 2):
        state = init_state(params, opt)
        state, m = sft_step(state, batch, graphdef=model.graphdef, optimizer=opt, normalize=normalize,
                            micro_batch=micro, mesh=mesh)
        out[micro] = (jax.device_get(state.params), {k: float(v) for k, v in m.items()})
    for micro in (2,):
        np.testing.assert_allclose(out[micro][1]["loss"], out[0][1]["loss"], rtol=1e-6)
        np.testing.assert_allclose(out[micro][1]["grad_norm"], out[0][1]["grad_norm"], rtol=1e-5)
        assert_trees_close(out[micro][0], out[0][0], atol=1e-6)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(jax.device_get(params))))
    assert moved > 1e-3  # the update did something


@pytest.mark.parametrize(
    "loss_agg", ["seq_mean_token_mean", pytest.param("seq_mean_token_sum_norm", marks=pytest.mark.slow)])
def test_micro_batched_grpo_step_equals_one_batch(env, loss_agg):
    G, T = 2, 6
    rb = random_rollout_batch(env.model.prepare(env.batch), G, T, np.random.default_rng(0))
    loss_cfg = grpo.GRPOLossConfig(kl_coef=0.05, loss_agg=loss_agg, norm_length=T)
    opt = make_optimizer(OptimizerConfig(name="sgd", lr=0.5, weight_decay=0.0), 10, ALL)
    out = {}
    for micro in (0, 2):
        state = init_state(env.params, opt)
        state, m = grpo_step(state, rb, jax.random.key(3), graphdef=env.model.graphdef, optimizer=opt,
                             group_size=G, loss_cfg=loss_cfg, mu=2, minibatch=4, micro_batch=micro)
        out[micro] = (jax.device_get(state.params), {k: float(v) for k, v in m.items()})
    for k in ("loss", "pg_loss", "kl", "clip_frac", "entropy", "ratio/max", "ratio/min", "grad_norm"):
        np.testing.assert_allclose(out[2][1][k], out[0][1][k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert_trees_close(out[2][0], out[0][0], atol=1e-6)
    assert out[0][1]["grad_norm"] > 1e-3


def test_activations_are_split_over_the_batch_axes_inside_the_compiled_step(ref_dir):
    """Under an FSDP mesh the weights split on the hidden dim; the hidden states, logits and
    response log-probs must split over the batch, not be replicated or split on features."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    model, params = models.from_pretrained(ref_dir, mesh=mesh, options=PLAIN)
    emb_spec = params["language_model"]["embed_tokens"].value.sharding.spec
    assert emb_spec == P(None, "fsdp")  # parameters: hidden dim split
    batch = make_batch([[]] * 8, seed=2)
    inputs = models.place_inputs(model, model.prepare(batch))
    T = 4
    responses = sharding.shard_batch(np.ones((8, T), np.int32), mesh)
    constrain = sharding.batch_constraint(mesh)

    def f(params, inputs, responses):
        m = nnx.merge(model.graphdef, params)
        h = m.hidden(inputs.input_ids_BL, inputs.attention_mask_BL, inputs.positions_3BL, None, constrain)
        logp, _ = response_logprobs(m, inputs, responses, jnp.arange(8), constrain=constrain)
        return h, logp

    compiled = jax.jit(f).lower(params, inputs, responses).compile()
    for sh in compiled.output_shardings:
        assert sh.spec[0] in (("data", "fsdp"), "fsdp"), sh.spec
        assert all(s is None for s in sh.spec[1:]), sh.spec
    # without the constraints the compiler keeps the features split (the layout the issue found)
    plain = jax.jit(lambda p, x: nnx.merge(model.graphdef, p).hidden(
        x.input_ids_BL, x.attention_mask_BL, x.positions_3BL)).lower(params, inputs).compile()
    assert plain.output_shardings.spec != compiled.output_shardings[0].spec


def test_precision_policy_keeps_an_lr_1e6_adamw_update(env):
    """The recipes store fp32 and compute bf16; 10 AdamW steps at lr 1e-6 move every weight that
    has a gradient. The same steps in bf16 storage (what the 7B recipe used) move almost none."""
    cfg = config_lib.load_config("configs/qwen2_5_vl_7b_tpu.py")
    assert cfg.model.dtype == "float32" and cfg.model.compute_dtype == "bfloat16"
    opt_cfg = cfg.stages[0].optimizer
    assert opt_cfg.lr == 1e-6
    opt = make_optimizer(opt_cfg, 100, ALL)

    def moved_fraction(dtype):
        params = jax.tree.map(lambda x: x.astype(dtype), env.params)
        state = init_state(params, opt)
        grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-3, x.dtype), params)
        step = jax.jit(lambda s, g: apply_gradients(s, g, jnp.float32(0), opt)[0])
        for _ in range(10):
            state = step(state, grads)
        w0 = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
        w1 = [np.asarray(x, np.float32) for x in jax.tree.leaves(state.params)]
        big = [np.abs(a) > 1e-2 for a in w0]  # weights of normal size
        changed = sum(int(((a != b) & m).sum()) for a, b, m in zip(w0, w1, big))
        return changed / sum(int(m.sum()) for m in big)

    assert moved_fraction(jnp.float32) == 1.0
    assert moved_fraction(jnp.bfloat16) < 0.05
    with pytest.raises(config_lib.ConfigError, match="model.dtype"):
        config_lib.load_config("configs/qwen2_5_vl_7b_tpu.py", ["--config.model.dtype=bfloat16"])


def test_layers_of_different_structures_are_not_scanned():
    """`scan_layers` stacks the layers' weights, so it needs one structure; a layer with an extra
    parameter (e.g. adapters on some layers only) sends the decoder back to the loop."""
    from vlm_jax.models.qwen2_5_vl.model import Dense, same_structure

    def make(bias, din=4):
        with nnx.use_eager_sharding(False):
            return Dense(din, 3, ("embed", "mlp"), bias=bias, dtype=jnp.float32, rngs=nnx.Rngs(0))

    assert same_structure([make(True), make(True), make(True)])
    assert not same_structure([make(True), make(False)])
    assert not same_structure([make(True), make(True, din=5)])
