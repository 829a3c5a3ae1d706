"""The shared-prompt path (`grpo.share_prompt`: each distinct prompt runs through the decoder once
and its completions attend to its keys/values, `vlm_jax.rl.policy.shared_response_logprobs`)
computes what the [prompt + completion] rows do: per-token log-probs, the GRPO loss and metrics,
the gradient of every parameter, the update, and the reference scoring, in fp32 with left-padded
prompts of different lengths, image and text-only rows mixed and G > 1; through remat, the layer
scan, chunked attention / log-probs, micro-batches, shuffled mini-batches, scoring chunks and a
2-device batch mesh."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_reference import build_reference, make_batch, random_rollout_batch
from vlm_jax import models, sharding
from vlm_jax.models import lora
from vlm_jax.config import MeshConfig, OptimizerConfig
from vlm_jax.rl import grpo, sampler
from vlm_jax.rl.policy import (RolloutBatch, distinct_prompts, grpo_step, response_logprobs, score_responses,
                               shared_response_logprobs)
from vlm_jax.train_state import init_state, make_optimizer

ROWS = [[(4, 4)], [], [(4, 4), (2, 6)], []]  # one image, text, two images, text: 4 prompt lengths
G, T = 3, 5
PLAIN = dict(attention_chunk=0, logits_chunk=0, remat="none")
ALL = ("vision", "merger", "language_model")
# completions of one micro-batch-like subset: shuffled, duplicates of some prompts, one prompt absent
SUBSET = np.asarray([7, 0, 2, 8, 6, 1, 11])  # prompts 2, 0, 0, 2, 2, 0, 3


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def env(tmp_path_factory, request):
    family = request.param
    path = tmp_path_factory.mktemp(f"share_{family}")
    build_reference(path, seed=3, family=family)  # Qwen3-VL: 3 layers, DeepStack after layers 0 and 1
    model, params = models.from_pretrained(path, options=PLAIN)
    batch = make_batch(ROWS, padding="left", seed=4, patch=16 if family == "qwen3_vl" else 14)
    prompt = jax.tree.map(jnp.asarray, sampler.prepare_prompts(model, batch))
    rng = np.random.default_rng(5)
    N = len(ROWS) * G
    rb = random_rollout_batch(prompt, G, T, rng)
    return SimpleNamespace(family=family, path=path, model=model, params=params, prompt=prompt, rb=rb,
                           weights=jnp.asarray(rng.standard_normal((N, T)), jnp.float32))


def assert_trees_rel_close(got, want, rtol=1e-5):
    """Every leaf within rtol of its own largest magnitude (fp32 round-off; gradients of different
    modules differ by orders of magnitude)."""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        scale = float(np.abs(a).max())
        assert scale > 0, jax.tree_util.keystr(path)  # every parameter gets a gradient here
        np.testing.assert_allclose(b, a, rtol=0, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


def logprobs_and_grads(env, options, share):
    """(log-probs [n, T], entropy, gradient of sum(weights * log-probs)) of the SUBSET completions."""
    model = env.model.with_options(**options)
    rows = jnp.asarray(SUBSET)

    def f(params):
        m = nnx.merge(model.graphdef, params)
        resp = env.rb.responses_NT[rows]
        if share:
            logp, ent = shared_response_logprobs(m, env.prompt, resp, (rows // G)[None], 1, num_prompts=3,
                                                 entropy=True)
        else:
            logp, ent = response_logprobs(m, env.prompt, resp, rows // G, entropy=True)
        return jnp.sum(logp * env.weights[rows]), (logp, ent)

    (_, (logp, ent)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(env.params)
    return np.asarray(logp), np.asarray(ent), grads


SCAN = dict(attention_chunk=4, logits_chunk=2, remat="full", scan_layers=True)


@pytest.mark.parametrize(
    "env, options",
    [
        ("qwen2_5_vl", {}),
        # chunked attention (several query chunks of the prompt and of the response), chunked
        # log-probs, remat; DeepStack features added to the prompt rows
        pytest.param("qwen3_vl", dict(attention_chunk=4, logits_chunk=2, remat="full"), marks=pytest.mark.slow),
        # the layer scan (Qwen3-VL: the DeepStack layers 0, 1 loop, layer 2 is scanned)
        pytest.param("qwen2_5_vl", SCAN, marks=pytest.mark.slow),
        pytest.param("qwen3_vl", SCAN, marks=pytest.mark.slow),
        pytest.param("qwen2_5_vl", dict(remat="save_dots"), marks=pytest.mark.slow),
    ],
    indirect=["env"],
)
def test_shared_prompt_logprobs_and_gradients_equal_the_full_rows(env, options):
    lp0, ent0, g0 = logprobs_and_grads(env, options, share=False)
    lp1, ent1, g1 = logprobs_and_grads(env, options, share=True)
    np.testing.assert_allclose(lp1, lp0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent1, ent0, rtol=1e-5, atol=1e-6)
    assert_trees_rel_close(g1, g0)


def test_distinct_prompt_bounds():
    # contiguous blocks of 2 completions in groups of 3: [0, 2) one prompt, [2, 4) two, [4, 6) one
    assert distinct_prompts(2, 6, 3, contiguous=True) == 2
    assert distinct_prompts(3, 6, 3, contiguous=True) == 1
    assert distinct_prompts(6, 12, 3, contiguous=True) == 2
    assert distinct_prompts(12, 12, 3, contiguous=True) == 4
    assert distinct_prompts(4, 12, 3, contiguous=False) == 4  # any 4 completions: up to 4 prompts
    assert distinct_prompts(8, 12, 3, contiguous=False) == 4  # never more than the shard's prompts


def on_mesh(env):
    """The env's model, parameters and rollout batch on a 2-device batch mesh (data=2)."""
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=1), devices=jax.devices()[:2])
    model, params = models.from_pretrained(env.path, mesh=mesh, options=PLAIN)
    place = lambda a: sharding.shard_batch(np.asarray(a), mesh)  # noqa: E731
    prompt = sampler.prepare_prompts(model, make_batch(ROWS, padding="left", seed=4,
                                                       patch=16 if env.family == "qwen3_vl" else 14))
    rb = RolloutBatch(models.place_inputs(model, prompt), *(place(a) for a in env.rb[1:]))
    return SimpleNamespace(**{**vars(env), "model": model, "params": params, "rb": rb, "mesh": mesh})


def lora_start(env, rank):
    """Adapters on every adaptable layer, b moved off zero so that a gets a gradient too."""
    params = lora.init_adapters(env.params, ("language", "vision", "merger"), rank, jax.random.key(1))
    return jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(a.size), a.shape, a.dtype), params)


def run_grpo(env, share, *, options=None, micro=0, mu=1, minibatch=0, lora_rank=0):
    model = env.model.with_options(**(options or {}))
    opt = make_optimizer(OptimizerConfig(name="sgd", lr=0.5, weight_decay=0.0, max_grad_norm=0.0), 10, ALL)
    frozen = None
    params = jax.tree.map(jnp.copy, env.params)
    if lora_rank:
        frozen, params = lora.Frozen(env.params, 2.0), lora_start(env, lora_rank)
    state = init_state(params, opt)
    loss_cfg = grpo.GRPOLossConfig(kl_coef=0.05, loss_agg="seq_mean_token_mean", norm_length=T)
    state, m = grpo_step(state, env.rb, jax.random.key(3), graphdef=model.graphdef, optimizer=opt, group_size=G,
                         loss_cfg=loss_cfg, mu=mu, minibatch=minibatch, micro_batch=micro,
                         mesh=getattr(env, "mesh", None), share_prompt=share, frozen=frozen)
    return state, {k: float(v) for k, v in m.items()}


def check_grpo_equal(env, **kw):
    s0, m0 = run_grpo(env, False, **kw)
    s1, m1 = run_grpo(env, True, **kw)
    for k in ("loss", "pg_loss", "kl", "clip_frac", "entropy", "ratio/max", "ratio/min", "grad_norm"):
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # the updates agree to 1e-5 of each tensor's largest step, up to the round-off of adding them
    # to parameters of magnitude ~1
    start = env.params if not kw.get("lora_rank") else lora_start(env, kw["lora_rank"])
    before, p0, p1 = (jax.device_get(p) for p in (start, s0.params, s1.params))
    for (path, a), b, c in zip(jax.tree_util.tree_flatten_with_path(p0)[0], jax.tree.leaves(p1), jax.tree.leaves(before)):
        step, param = float(np.abs(np.asarray(a) - c).max()), float(np.abs(c).max())
        assert step > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * step + 2e-7 * param,
                                   err_msg=jax.tree_util.keystr(path))
    assert m0["grad_norm"] > 1e-3
    return s1


@pytest.mark.parametrize("env", ["qwen2_5_vl"], indirect=True)  # one family: the decoder path is shared
def test_grpo_step_with_shared_prompts_equals_full_rows_and_does_not_recompile(env):
    """Two micro-batches of 6 completions (2 prompts each, G = 3): loss, metrics and the update of
    every parameter equal; a second step of the same shapes compiles nothing."""
    check_grpo_equal(env, micro=6)
    before = grpo_step._cache_size()
    run_grpo(env, True, micro=6)
    assert grpo_step._cache_size() == before


@pytest.mark.slow
def test_grpo_step_shared_with_shuffled_minibatches_remat_scan_and_a_mesh(env):
    """mu = 2 passes of 2 shuffled mini-batches of 6, micro-batches of 3 (any 3 prompts; per
    shard of the 2-device mesh, 2 rows of any prompts of the shard)."""
    check_grpo_equal(on_mesh(env), options=SCAN, micro=3, mu=2, minibatch=6)


@pytest.mark.slow
@pytest.mark.parametrize("env", ["qwen2_5_vl"], indirect=True)  # one family: the decoder path is shared
def test_grpo_step_shared_with_lora_adapters(env):
    """A LoRA stage (adapters attached to the decoder's, the vision tower's and the merger's linear
    layers, the layers run in the loop): the adapters' update equals the full rows'."""
    check_grpo_equal(env, micro=6, lora_rank=2)


@pytest.mark.parametrize("env", ["qwen2_5_vl"], indirect=True)  # one family: the decoder path is shared
def test_scoring_with_shared_prompts_equals_full_rows(env):
    """Reference scoring in chunks of 4 completions (chunks that cut groups of 3)."""
    args = (env.model.graphdef, env.params, env.prompt, env.rb.responses_NT)
    want = np.asarray(score_responses(*args, group_size=G, chunk=4))
    got = np.asarray(score_responses(*args, group_size=G, chunk=4, share_prompt=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("env", ["qwen2_5_vl"], indirect=True)  # one family: the decoder path is shared
def test_scoring_with_shared_prompts_on_a_mesh_equals_full_rows(env):
    """Whole and chunked scoring on a 2-device batch mesh (gathers within each shard)."""
    args = (env.model.graphdef, env.params, env.prompt, env.rb.responses_NT)
    want = np.asarray(score_responses(*args, group_size=G))
    m = on_mesh(env)
    for chunk in (0, 4):  # per shard: 6 completions, 2 prompts; chunk 4 = 2 per shard (cuts a group)
        got = score_responses(m.model.graphdef, m.params, m.rb.prompt, m.rb.responses_NT, group_size=G, chunk=chunk,
                              mesh=m.mesh, share_prompt=True)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6, err_msg=f"mesh, chunk {chunk}")
