"""Length-grouped scoring and update (`grpo.length_groups`, `vlm_jax.rl.grouped`) compute what the
padded path does: log-probs on every response token, the GRPO loss and metrics, the update of every
parameter, with micro-batches of completions sorted by length, each cut to its own response bucket
and its prompts to their own prompt bucket; both families, image and text-only rows, LoRA, a mesh,
`share_prompt`, shuffled mini-batches; each bucket compiles once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_share_prompt import ALL, G, T, env, lora_start, on_mesh  # noqa: F401  (env: the fixture)
from vlm_jax.config import OptimizerConfig
from vlm_jax.rl import grouped, grpo
from vlm_jax.rl.policy import grpo_step, score_responses
from vlm_jax.train_state import init_state, make_optimizer

SMALL_BUCKETS = (8, 12, 16, 24, 32, 48, 64)  # prompt buckets small enough to cut the test's prompts


def lengths(rb) -> np.ndarray:
    return np.asarray(jax.device_get(rb.mask_NT)).sum(1).astype(int)


def test_plan_groups_sorts_within_shards_and_buckets():
    lens = np.array([5, 3, 1, 2, 8, 7, 1, 4])  # 2 shards of 4 rows, G = 2 -> 2 prompts per shard
    plan = grouped.plan_groups(lens, np.array([10, 30, 20, 5]), np.broadcast_to(np.arange(4), (2, 4)), 2,
                               group_size=2, cap=8, L=32, prompt_buckets=SMALL_BUCKETS)
    (i0, t0, l0), (i1, t1, l1) = plan
    np.testing.assert_array_equal(i0, [[0, 1], [0, 1]])  # each shard's two longest
    np.testing.assert_array_equal(i1, [[3, 2], [3, 2]])
    assert (t0, t1) == (8, 4)
    assert (l0, l1) == (24, 32)  # prompt 0 of each shard (10, 20 tokens) / prompt 1 (30, 5)
    assert grouped.length_bucket(1, 2048) == 256 and grouped.length_bucket(257, 2048) == 512
    assert grouped.length_bucket(2048, 2048) == 2048 and grouped.length_bucket(3, 5) == 3


def run(env, *, grouped_groups=0, share=False, mu=1, minibatch=0, lora_rank=0, mesh=None):
    opt = make_optimizer(OptimizerConfig(name="sgd", lr=0.5, weight_decay=0.0, max_grad_norm=0.0), 10, ALL)
    frozen, params = None, jax.tree.map(jnp.copy, env.params)
    if lora_rank:
        from vlm_jax.models import lora

        frozen, params = lora.Frozen(env.params, 2.0), lora_start(env, lora_rank)
    state = init_state(params, opt)
    loss_cfg = grpo.GRPOLossConfig(kl_coef=0.05, loss_agg="seq_mean_token_mean", norm_length=T)
    kw = dict(graphdef=env.model.graphdef, optimizer=opt, group_size=G, loss_cfg=loss_cfg, mu=mu, minibatch=minibatch,
              mesh=mesh, frozen=frozen, share_prompt=share)
    if grouped_groups:
        state, m = grouped.grpo_step_grouped(state, env.rb, jax.random.key(3), lengths(env.rb), groups=grouped_groups,
                                             prompt_buckets=SMALL_BUCKETS, **kw)
    else:
        state, m = grpo_step(state, env.rb, jax.random.key(3), micro_batch=0, **kw)
    return state, {k: float(v) for k, v in m.items()}, (frozen, params)


def check_equal(env, **kw):
    s0, m0, (_, start) = run(env, **{**kw, "grouped_groups": 0})
    s1, m1, _ = run(env, **kw)
    for k in ("loss", "pg_loss", "kl", "clip_frac", "entropy", "ratio/max", "ratio/min", "grad_norm"):
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, atol=1e-7, err_msg=k)
    before, p0, p1 = (jax.device_get(p) for p in (start, s0.params, s1.params))
    for (path, a), b, c in zip(jax.tree_util.tree_flatten_with_path(p0)[0], jax.tree.leaves(p1), jax.tree.leaves(before)):
        step, param = float(np.abs(np.asarray(a) - c).max()), float(np.abs(c).max())
        assert step > 0, jax.tree_util.keystr(path)  # every parameter moved: its gradient is compared
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * step + 2e-7 * param,
                                   err_msg=jax.tree_util.keystr(path))
    assert m0["grad_norm"] > 1e-3


@pytest.mark.parametrize("env, share", [("qwen2_5_vl", True),
                                        pytest.param("qwen2_5_vl", False, marks=pytest.mark.slow),
                                        pytest.param("qwen3_vl", True, marks=pytest.mark.slow),
                                        pytest.param("qwen3_vl", False, marks=pytest.mark.slow)],
                         indirect=["env"])
def test_grouped_update_equals_the_padded_one_and_compiles_once_per_bucket(env, share):
    """3 length groups of 4 completions (prompts with one, two or no image, left-padded, cut to
    their own bucket): loss, metrics and the update of every parameter equal the padded step's;
    a second step compiles nothing."""
    check_equal(env, grouped_groups=3, share=share)
    before = grouped._micro_grad._cache_size()
    run(env, grouped_groups=3, share=share)
    assert grouped._micro_grad._cache_size() == before


@pytest.mark.slow
@pytest.mark.parametrize("env", ["qwen2_5_vl"], indirect=True)
def test_grouped_update_with_lora_shuffled_minibatches(env):
    check_equal(env, grouped_groups=2, share=True, lora_rank=2, mu=2, minibatch=6)


@pytest.mark.slow
@pytest.mark.parametrize("env", ["qwen2_5_vl"], indirect=True)
def test_grouped_update_on_a_mesh(env):
    """A 2-device batch mesh, 2 shuffled mini-batches of 6: per shard 3 rows, cut into 3 groups."""
    m = on_mesh(env)
    check_equal(m, grouped_groups=3, share=True, minibatch=6, mesh=m.mesh)


@pytest.mark.parametrize("env, share", [("qwen2_5_vl", False), ("qwen3_vl", True),
                                        pytest.param("qwen2_5_vl", True, marks=pytest.mark.slow),
                                        pytest.param("qwen3_vl", False, marks=pytest.mark.slow)],
                         indirect=["env"])
def test_grouped_scoring_equals_the_padded_one(env, share):
    args = (env.model.graphdef, env.params, env.prompt, env.rb.responses_NT)
    want = np.asarray(score_responses(*args, group_size=G))
    got = np.asarray(grouped.score_grouped(*args, lengths(env.rb), groups=4, group_size=G,
                                           prompt_buckets=SMALL_BUCKETS, share_prompt=share))
    mask = np.asarray(env.rb.mask_NT) != 0
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-6)
    assert (got[~mask] == 0).sum() > 0  # positions past a group's bucket are not computed


@pytest.mark.slow
@pytest.mark.parametrize("env", ["qwen2_5_vl"], indirect=True)
def test_grouped_scoring_on_a_mesh(env):
    args = (env.model.graphdef, env.params, env.prompt, env.rb.responses_NT)
    want = np.asarray(score_responses(*args, group_size=G))
    m = on_mesh(env)
    got = np.asarray(grouped.score_grouped(m.model.graphdef, m.params, m.rb.prompt, m.rb.responses_NT,
                                           lengths(env.rb), groups=2, group_size=G, prompt_buckets=SMALL_BUCKETS,
                                           mesh=m.mesh, share_prompt=True))
    mask = np.asarray(env.rb.mask_NT) != 0
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-6)
