"""The sampler's speed paths against plain references: inverse-CDF token draws and the shared-prompt
decode attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models.qwen2_5_vl.model import decode_attention
from vlm_jax.rl import draw, sampler

# ---- inverse_cdf --------------------------------------------------------------------------------


def test_inverse_cdf_hits_each_token_with_its_probability():
  # V = 10: blocks of 4 tokens (the last one padded), zero weights at a block start, a block end,
  # a whole block and the vocab end. M evenly spaced uniforms: token i is hit by the uniforms in
  # [cum_{i-1}, cum_i) / total, i.e. round(M * w_i / total) of them, up to one at each edge.
  w = np.array([[0, 1, 2, 0, 0, 0, 0, 0, 3, 0], [5, 0, 0, 1, 0, 0, 2, 0, 0, 0]], np.float32)
  M = 4000
  u = (np.arange(M) + 0.5) / M
  uniforms = jnp.asarray(np.repeat(u[:, None], 2, 1).reshape(-1))  # rows alternate 0, 1
  weights = jnp.asarray(np.tile(w, (M, 1)))
  tok = np.asarray(draw.inverse_cdf(uniforms, weights)).reshape(M, 2)
  for r in range(2):
    counts = np.bincount(tok[:, r], minlength=10)
    np.testing.assert_allclose(counts, M * w[r] / w[r].sum(), atol=1.0, err_msg=f"row {r}")
    # the uniforms are sorted, so the tokens come in vocabulary order
    assert (np.diff(tok[:, r]) >= 0).all()


def test_inverse_cdf_never_returns_a_zero_weight_token():
  # uniforms at the top of [0, 1): round-off can put the target past the last cumulative sum
  top = np.float32(1.0) - np.finfo(np.float32).epsneg
  w = np.zeros((3, 37), np.float32)
  w[0, 0] = 1.0                        # only the first token
  w[1, [3, 20]] = [1e-30, 1.0]         # a tiny weight early, the rest later
  w[2, :30] = np.linspace(1, 2, 30)    # zeros after token 29 (and in the padding)
  for u in (0.0, 0.5, top):
    tok = np.asarray(draw.inverse_cdf(jnp.full((3,), u, jnp.float32), jnp.asarray(w)))
    assert all(w[r, t] > 0 for r, t in enumerate(tok)), (u, tok)
  tok = np.asarray(draw.inverse_cdf(jnp.full((3,), top, jnp.float32), jnp.asarray(w)))
  np.testing.assert_array_equal(tok, [0, 20, 29])  # the last token with weight


def test_sample_token_logprob_is_temperature_one():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 3, jnp.float32)
  sp = sampler.SamplingParams(jnp.int32(1), jnp.float32(0.3), jnp.float32(1.0), jnp.int32(0))
  tok, logp = draw.sample_token(jnp.asarray([0.1, 0.4, 0.7, 0.99]), logits, sp, greedy=False,
                                   filtered=False)
  want = np.asarray(jax.nn.log_softmax(logits, -1))[np.arange(4), np.asarray(tok)]
  np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)
  greedy, glogp = draw.sample_token(None, logits, sp, greedy=True, filtered=False)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(logits).argmax(-1))
  np.testing.assert_allclose(np.asarray(glogp), np.asarray(jax.nn.log_softmax(logits, -1)).max(-1), atol=1e-5)


# ---- decode attention ---------------------------------------------------------------------------


def test_decode_attention_equals_softmax_over_prompt_and_own_tokens():
  B, G, K, Hg, E, L, T, slot = 3, 2, 2, 3, 8, 5, 4, 2
  N = B * G
  rng = np.random.default_rng(1)
  q = rng.normal(size=(N, K, Hg, E)).astype(np.float32)
  pk, pv = (rng.normal(size=(B, L, K, E)).astype(np.float32) for _ in range(2))
  gk, gv = (rng.normal(size=(N, T, K, E)).astype(np.float32) for _ in range(2))
  prompt_mask = np.ones((B, L), bool)
  prompt_mask[0, :2] = False  # left padding
  prompt_mask[2, :4] = False
  gen_valid = np.arange(T) <= slot
  out = decode_attention(
      jnp.asarray(q), jnp.asarray(pk.transpose(0, 2, 3, 1)), jnp.asarray(pv.transpose(0, 2, 1, 3)),
      jnp.asarray(prompt_mask), jnp.asarray(gk.transpose(0, 2, 3, 1)), jnp.asarray(gv.transpose(0, 2, 1, 3)),
      jnp.asarray(gen_valid), G)
  for n in range(N):
    b = n // G  # samples of one prompt are consecutive rows
    keys = np.concatenate([pk[b][prompt_mask[b]], gk[n][gen_valid]])      # [S, K, E]
    values = np.concatenate([pv[b][prompt_mask[b]], gv[n][gen_valid]])
    for k in range(K):
      for h in range(Hg):
        s = keys[:, k] @ q[n, k, h] / np.sqrt(E)
        p = np.exp(s - s.max())
        np.testing.assert_allclose(np.asarray(out[n, k, h]), p @ values[:, k] / p.sum(), atol=1e-5,
                                   err_msg=f"row {n} kv head {k} query head {h}")
