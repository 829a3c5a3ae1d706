"""Sampling in a decoding layout (`grpo.rollout_tensor`): the policy resharded once per rollout from
the training (FSDP) mesh to a (data, fsdp=1, tensor) mesh over the same 8 devices gives the same
rollout, its decode step stops moving whole-batch partial products between devices, and bad sizes
are refused before any compile.

One tiny model with 4 KV heads (so tensor = 2 and 4 both split whole heads), loaded FSDP over the
8 fake CPU devices as the 7B recipe loads over its 64 chips.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import models, startup
from vlm_jax.config import ConfigError, GRPOConfig, MeshConfig
from vlm_jax.data.processor import Processor
from vlm_jax.models.tiny import TinySpec, build_tiny_model
from vlm_jax.plan import loop_collectives
from vlm_jax.rl import decode_layout, sampler
from vlm_jax.rl.rollout import SpecialTokens, collect_rollout
from vlm_jax.sharding import make_mesh

G = 2      # samples per prompt
NEW = 6    # greedy tokens (gen bucket 16)
PROMPTS = ["Count the dots.", "Which shape is red?", "Name a colour.", "Is the circle on the left?"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  path = build_tiny_model(tmp_path_factory.mktemp("decode_tiny"), spec=TinySpec(num_key_value_heads=4))
  proc = Processor.from_pretrained(path)
  mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))  # the recipes' FSDP layout
  model, params = models.from_pretrained(path, mesh=mesh)
  return SimpleNamespace(proc=proc, model=model, params=params)


def rollout(env, tensor: int, temperature: float = 0.0):
  """A GRPO rollout (8 prompts x G) with `grpo.rollout_tensor=tensor` (greedy by default)."""
  cfg = GRPOConfig(num_samples=G, max_new_tokens=NEW, temperature=temperature, kl_coef=0.0,
                   rollout_tensor=tensor)
  batch = {**env.proc(PROMPTS * 2, None), "answer": ["1"] * 8, "task": ["t"] * 8,
           "answer_type": ["number"] * 8}
  reward = lambda texts, answers, **_: (np.arange(len(texts), dtype=np.float32), {})  # noqa: E731
  with jax.default_matmul_precision("highest"):
    rb, graded, _ = collect_rollout(
        env.model, env.params, env.params, iter([batch]), cfg=cfg, tokenizer=env.proc.tokenizer,
        reward_fn=reward, rng=jax.random.key(0),
        tokens=SpecialTokens((), env.proc.pad_token_id, env.proc.image_token_id), batch_size=8)
  return rb, graded


@pytest.fixture(scope="module")
def training_layout(env):
  """temperature -> the FSDP-layout rollout, computed when first asked for."""
  runs = {}
  return lambda t: runs[t] if t in runs else runs.setdefault(t, rollout(env, 0, t))


@pytest.mark.parametrize("tensor,temperature", [(2, 0.0), (4, 0.0), (2, 1.0)])
def test_decoding_layout_rollout_equals_the_training_layout(env, training_layout, tensor, temperature):
  """Greedy, and sampled from the same uniforms (the token draw's blocks stay inside each device's
  part of the vocabulary; only the sums' rounding could move a draw, far from it here)."""
  want_rb, want = training_layout(temperature)
  before = jax.tree.map(lambda x: x.sharding, env.params)
  got_rb, got = rollout(env, tensor, temperature)
  np.testing.assert_array_equal(got.rollout.tokens, want.rollout.tokens)
  np.testing.assert_array_equal(got.rollout.lengths, want.rollout.lengths)
  np.testing.assert_allclose(got.rollout.logprobs, want.rollout.logprobs, atol=1e-5, rtol=0)
  # the rollout batch for the update is in the training layout, like the parameters it left alone
  assert got_rb.responses_NT.sharding == want_rb.responses_NT.sharding
  assert jax.tree.map(lambda x: x.sharding, env.params) == before
  # the comparison can fail: the prompts' greedy continuations differ from one another
  assert len({tuple(t) for t in want.rollout.tokens}) > 1


def test_decode_layout_places_weights_and_cache_over_heads(env):
  model, params = decode_layout.decode_layout(env.model, env.params, 2)
  assert dict(model.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert set(model.mesh.devices.flat) == set(env.model.mesh.devices.flat)
  layer = params["language_model"]["layers"][0]
  q = layer["self_attn"]["q_proj"]["kernel"][...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")  # heads split, hidden whole
  assert q.sharding.shard_shape(q.shape) == (64, 32)
  down = layer["mlp"]["down_proj"]["kernel"][...]
  assert down.sharding.spec == jax.sharding.PartitionSpec("tensor", None)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(env.params["language_model"]["layers"][0]
                                                          ["self_attn"]["q_proj"]["kernel"][...]))
  # the sampler's KV cache: batch over `data`, KV heads over `tensor`
  module = model.merge(params)
  for axes in (module.DECODE_K_AXES, module.DECODE_V_AXES, module.KV_AXES):
    spec = sampler.shd.logical_to_spec(axes, (8 * G, 4, 16, 16), model.mesh)
    assert spec[0] == "data" and spec[axes.index("kv_heads")] == "tensor", (axes, spec)


def decode_step_collectives(env, tensor: int):
  """(collectives of one decode step, rows per device) of the compiled greedy sampler."""
  model, params = env.model, env.params
  if tensor:
    model, params = decode_layout.decode_layout(model, params, tensor)
  inputs = models.place_inputs(model, sampler.prepare_prompts(model, env.proc(PROMPTS * 2, None), pad_id=0))
  sp = sampler.SamplingParams(jnp.int32(NEW), jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0))
  text = sampler._generate.lower(model.graphdef, params, inputs, jax.random.key(0), sp, gen_len=16,
                                 num_samples=G, greedy=True, filtered=False, eos_ids=(1,), pad_id=0,
                                 mesh=model.mesh).compile().as_text()
  return loop_collectives(text), 8 * G // (model.mesh.shape["data"] * model.mesh.shape["fsdp"])


def test_decode_step_moves_only_its_own_rows_activations(env):
  """Per token, the decoding layout's collectives are the tensor-parallel ones over each device's
  own rows (an all-reduce of [rows, hidden] after the attention and MLP outputs, a tiny argmax
  exchange), and no all-gather of a parameter. The FSDP layout instead splits each weight on its
  hidden dim and all-reduces partial products over every row of the batch at every token, the
  [rows, vocab] logits included: over 10x the bytes here."""
  spec = TinySpec(num_key_value_heads=4)
  V, D = 1024, spec.hidden_size
  param_shapes = {tuple(x.shape) for x in jax.tree.leaves(env.params)}
  fsdp, fsdp_rows = decode_step_collectives(env, 0)
  tp, tp_rows = decode_step_collectives(env, 2)
  assert fsdp_rows == 2 and tp_rows == 4
  nbytes = lambda cs: sum(math.prod(s) * 4 for _, _, s in cs)  # noqa: E731  (f32 / s32 here)
  assert tp, "the decoding layout still all-reduces its tensor-parallel outputs"
  for op, _, shape in tp:
    assert shape[0] == tp_rows, (op, shape)  # only this device's rows
    assert not (op == "all-gather" and shape in param_shapes), (op, shape)
  assert ("all-reduce", "f32", (tp_rows, D)) in tp
  assert ("all-reduce", "f32", (8 * G, V)) in fsdp  # every row's logits, every token
  assert nbytes(fsdp) > 10 * nbytes(tp), (fsdp, tp)


def test_bad_rollout_tensor_is_refused_before_compiling(env):
  with pytest.raises(ConfigError, match="rollout_tensor"):
    GRPOConfig(rollout_tensor=-1)
  with pytest.raises(ConfigError, match=r"grpo.rollout_tensor: 3 does not divide the 8 devices"):
    decode_layout.decode_layout(env.model, env.params, 3)
  with pytest.raises(ConfigError, match=r"grpo.rollout_tensor: 8 does not divide the model's 4 KV heads"):
    decode_layout.decode_layout(env.model, env.params, 8)
  stage = lambda n: SimpleNamespace(objective="grpo", grpo=GRPOConfig(rollout_tensor=n))  # noqa: E731
  cfg = SimpleNamespace(stages=[stage(2), stage(0), stage(3)])
  with pytest.raises(ConfigError, match=r"stages.2.grpo.rollout_tensor: 3 does not divide the 8 devices"):
    startup.check_rollout_layouts(cfg, env.model.config, env.model.mesh)


def test_lora_policy_is_resharded_with_its_adapters(env):
  """A LoRA stage's policy (base + adapters, applied): the base resharded by the rules, the
  adapters replicated on the decoding mesh, the same greedy tokens as the training layout."""
  from vlm_jax.models import lora

  adapters = lora.init_adapters(env.params, ("attention",), 4, jax.random.key(1), env.model.mesh)
  adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # b != 0: the adapters change the outputs
  policy = lora.LoraParams(env.params, adapters, 2.0)
  model, params = decode_layout.decode_layout(env.model, policy, 2)
  assert isinstance(params, lora.LoraParams) and params.scale == 2.0
  a = jax.tree.leaves(params.adapters)[0]
  assert a.sharding.mesh.shape == model.mesh.shape and a.sharding.is_fully_replicated
  kw = dict(max_new_tokens=4, temperature=0.0, num_samples=1, rng=jax.random.key(0), eos_token_ids=(),
            pad_token_id=env.proc.pad_token_id)
  batch = env.proc(PROMPTS * 2, None)
  with jax.default_matmul_precision("highest"):
    want = sampler.generate(env.model, policy, batch, **kw)
    got = sampler.generate(model, params, batch, **kw)
    base = sampler.generate(model, params.base, batch, **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
  assert np.abs(base.logprobs - got.logprobs).max() > 1e-3  # the adapters were really applied
