"""GRPO math checked against numbers worked out by hand in each test."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.rl import grpo
from vlm_jax.rl.grpo import GRPOLossConfig

REWARDS = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # two groups of G=4


def close(actual, expected, atol=1e-5):
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(actual), expected, atol=atol)


# --- advantages


def test_grpo_advantages_unbiased_group_std():
    # group 1 [1,0,0,1]: mean .5, sum sq dev 4*.25 = 1, var 1/(4-1) = 1/3, std .57735
    #   -> +-.5 / .57735 = +-.866025 (= sqrt(3)/2)
    # group 2 [1,1,1,0]: mean .75, sum sq dev 3*.0625 + .5625 = .75, var .75/3 = .25, std .5
    #   -> .25/.5 = .5, -.75/.5 = -1.5
    s = math.sqrt(3) / 2
    expected = [s, -s, -s, s, 0.5, 0.5, 0.5, -1.5]
    close(grpo.compute_advantages(REWARDS, 4), expected)
    close(grpo.compute_advantages(REWARDS, 4, estimator="grpo", scaling="group"), expected)


def test_grpo_advantages_population_std_option():
    # ddof=0: group 1 std = sqrt(1/4) = .5 -> +-1; group 2 std = sqrt(.75/4) = .4330127
    #   -> .25/.4330127 = .5773503, -.75/.4330127 = -1.7320508
    adv = grpo.compute_advantages(REWARDS, 4, std_ddof=0)
    close(adv, [1, -1, -1, 1, 0.5773503, 0.5773503, 0.5773503, -1.7320508])


def test_dr_grpo_is_grpo_without_std():
    expected = [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]
    close(grpo.compute_advantages(REWARDS, 4, estimator="dr_grpo"), expected)
    close(grpo.compute_advantages(REWARDS, 4, estimator="grpo", scaling="none"), expected)


def test_rloo_is_leave_one_out_mean():
    # group 1, row 0: r=1, others [0,0,1] mean 1/3 -> 2/3; row 1: r=0, others [0,1,1] -> -2/3
    # group 2, rows 0-2: r=1, others [1,1,0] mean 2/3 -> 1/3; row 3: r=0, others [1,1,1] -> -1
    expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0]
    close(grpo.compute_advantages(REWARDS, 4, estimator="rloo"), expected)


def test_reinforce_pp_batch_baseline_and_whitening():
    # batch mean 5/8 = .625; dev of a 1 is .375, of a 0 is -.625
    # sum sq dev 5*.140625 + 3*.390625 = 1.875, unbiased var 1.875/7 = .2678571, std .5175492
    # -> .375/.5175492 = .7245688, -.625/.5175492 = -1.2076147
    hi, lo = 0.7245688, -1.2076147
    adv = grpo.compute_advantages(REWARDS, 4, estimator="reinforce_pp")
    close(adv, [hi, lo, lo, hi, hi, hi, hi, lo])
    close(adv.mean(), 0.0)


def test_reinforce_pp_whitens_over_valid_tokens_like_verl():
    # EasyR1/verl: returns = the row's reward on each of its valid tokens (gamma 1), then
    # masked_whiten over the batch's valid tokens (unbiased variance over the token count).
    rewards = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 0.0], np.float32)
    lengths = np.array([3, 9, 1, 5, 2, 7])
    T = 10
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    returns = rewards[:, None].astype(np.float64) * mask
    n = mask.sum()
    mean = (returns * mask).sum() / (n + 1e-8)
    var = (((returns - mean) ** 2) * mask).sum() / (n + 1e-8) * n / (n - 1)
    want_BT = (returns - mean) / np.sqrt(var + 1e-8)
    adv = np.asarray(grpo.compute_advantages(rewards, 3, estimator="reinforce_pp", lengths_B=lengths))
    for b in range(len(rewards)):  # one value per row: the token-level advantage on its valid tokens
        np.testing.assert_allclose(want_BT[b, : lengths[b]], adv[b], rtol=1e-5, atol=1e-6)
    # a response-level normalisation (the old one) differs by far more than round-off here
    flat = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-6)
    assert np.abs(flat - adv).max() > 0.05
    # equal lengths: token weights equal, only the Bessel count differs from one-per-response
    eq = np.asarray(grpo.compute_advantages(rewards, 3, estimator="reinforce_pp", lengths_B=np.ones(6)))
    np.testing.assert_allclose(eq, flat, rtol=1e-4, atol=1e-5)


def test_grpo_with_batch_scaling_divides_group_centred_rewards_by_batch_std():
    # group-centred rewards of test_dr_grpo divided by the batch std .5175492 from above
    adv = grpo.compute_advantages(REWARDS, 4, estimator="grpo", scaling="batch")
    close(adv, np.array([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]) / 0.5175492)


@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
def test_all_equal_group_gets_zero_advantage_without_nan(estimator):
    rewards = jnp.array([2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 0.0, 1.0])
    adv = grpo.compute_advantages(rewards, 4, estimator=estimator)
    assert np.isfinite(np.asarray(adv)).all()
    if estimator != "reinforce_pp":  # batch baseline: a flat group differs from the batch mean
        close(adv[:4], np.zeros(4))
    all_equal = grpo.compute_advantages(jnp.ones(8), 4, estimator=estimator)
    close(all_equal, np.zeros(8))


def test_advantages_jit_and_bad_inputs():
    static = ("group_size", "estimator", "scaling")
    jitted = jax.jit(grpo.compute_advantages, static_argnames=static)
    close(jitted(REWARDS, group_size=4, estimator="rloo")[:4], [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        grpo.compute_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="dr_grpo"):
        grpo.compute_advantages(REWARDS, 4, estimator="dr_grpo", scaling="group")
    with pytest.raises(ValueError, match="rloo"):
        grpo.compute_advantages(REWARDS, 1, estimator="rloo")
    with pytest.raises(ValueError, match="group_size > 1"):
        grpo.compute_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="estimator='ppo'"):
        grpo.compute_advantages(REWARDS, 4, estimator="ppo")
    with pytest.raises(ValueError, match="scaling='global'"):
        grpo.compute_advantages(REWARDS, 4, scaling="global")


# --- masks


def test_response_mask_lengths_and_truncation():
    lengths = jnp.array([2, 0, 3])
    truncated = jnp.array([False, False, True])
    expected = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(grpo.response_mask(lengths, 3), expected)
    # truncation is ignored unless mask_truncated
    np.testing.assert_array_equal(grpo.response_mask(lengths, 3, truncated_B=truncated), expected)
    expected[2] = False
    np.testing.assert_array_equal(
        grpo.response_mask(lengths, 3, truncated_B=truncated, mask_truncated=True), expected
    )
    with pytest.raises(ValueError, match="truncated_B"):
        grpo.response_mask(lengths, 3, mask_truncated=True)


# --- ratio

LOGP = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -1.0, 0.0]])
OLD = jnp.array([[-1.5, -2.0, -9.0], [-1.0, -3.0, 5.0]])
MASK = jnp.array([[1, 1, 0], [1, 0, 0]], bool)


def test_token_ratio_values_and_padding_zeroed():
    # valid diffs: row 0 -> .5, 0; row 1 -> .5; padding -> 0 (ratio 1)
    close(grpo.importance_ratio(LOGP, OLD, MASK), [[0.5, 0.0, 0.0], [0.5, 0.0, 0.0]])


def test_sequence_ratio_value_is_masked_sequence_mean():
    # row 0: (.5 + 0) / 2 = .25 on both valid tokens; row 1: .5 / 1
    log_ratio = grpo.importance_ratio(LOGP, OLD, MASK, level="sequence")
    close(log_ratio, [[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]])


def test_sequence_ratio_gradient_is_per_token():
    # GSPO-token: d log_ratio[b,t] / d logp[b,t'] = 1 if t == t' (valid), else 0 - unlike the plain
    # sequence mean whose gradient would be spread as 1/|y| over the row.
    weights = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])

    def weighted(logp, old):
        return jnp.sum(weights * grpo.importance_ratio(logp, old, MASK, level="sequence"))

    g_logp, g_old = jax.grad(weighted, argnums=(0, 1))(LOGP, OLD)
    close(g_logp, [[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    close(g_old, np.zeros((2, 3)))  # old log-probs are constants


def test_gspo_token_with_seq_mean_aggregation_matches_gspo_gradient():
    # GSPO objective: L = -mean_b A_b * s_b with s_b = exp(masked mean of logp - old); ratios here
    # (e^.25, e^.5) are inside the clip range so clipping plays no part.
    adv = jnp.array([1.0, -2.0])

    def gspo_token(logp):
        lr = grpo.importance_ratio(logp, OLD, MASK, level="sequence")
        loss, _ = grpo.policy_loss_BT(lr, adv, clip_low=0.9, clip_high=9.0, clip_c=None)
        return grpo.aggregate_loss(loss, MASK, mode="seq_mean_token_mean")

    def gspo_reference(logp):
        m = MASK.astype(jnp.float32)
        s = jnp.exp(jnp.sum((logp - OLD) * m, axis=1) / m.sum(axis=1))
        return -jnp.mean(adv * s)

    close(gspo_token(LOGP), gspo_reference(LOGP))
    # by hand: row 0: -A s / (2 rows * 2 tokens) = -e^.25/4 = -.3210064 on each valid token
    #          row 1: +2 e^.5 / (2 * 1) = 1.6487213
    expected = [[-0.3210064, -0.3210064, 0.0], [1.6487213, 0.0, 0.0]]
    close(jax.grad(gspo_token)(LOGP), expected)
    close(jax.grad(gspo_reference)(LOGP), expected)


# --- policy loss

# Bounds [.75, 1.25] are exact in float32, and exp(log(x)) round-trips exactly for these ratios.
RATIOS = jnp.array([1.0, 1.25, 1.5, 0.75, 0.5])
BOUNDS = dict(clip_low=0.25, clip_high=0.25)


def test_ppo_clip_values_and_flags_at_boundaries():
    log_ratio = jnp.log(jnp.stack([RATIOS, RATIOS]))
    loss, clipped = grpo.policy_loss_BT(log_ratio, jnp.array([1.0, -1.0]), **BOUNDS, clip_c=None)
    # A = +1: l1 = -r, l2 = -clip(r): r=1.5 -> max(-1.5, -1.25) = -1.25 clipped;
    #         r=.5 -> max(-.5, -.75) = -.5 unclipped; on the bounds l1 == l2 -> not clipped
    # A = -1: l1 = r, l2 = clip(r): r=1.5 -> 1.5 unclipped; r=.5 -> max(.5, .75) = .75 clipped
    close(loss, [[-1.0, -1.25, -1.25, -0.75, -0.5], [1.0, 1.25, 1.5, 0.75, 0.75]])
    np.testing.assert_array_equal(
        clipped, [[False, False, True, False, False], [False, False, False, False, True]]
    )


def test_ppo_clip_gradient_zero_when_clipped_full_on_bound():
    adv = jnp.array([1.0, -1.0])
    grad = jax.grad(
        lambda lr: grpo.policy_loss_BT(lr, adv, **BOUNDS, clip_c=None)[0].sum()
    )(jnp.log(jnp.stack([RATIOS, RATIOS])))
    # d(-A r)/d log r = -A r where unclipped (the bound included), 0 where clipped
    close(grad, [[-1.0, -1.25, 0.0, -0.75, -0.5], [1.0, 1.25, 1.5, 0.75, 0.0]])


def test_dual_clip_caps_negative_advantage_loss():
    ratios = jnp.array([2.0, 3.0, 4.0, 20.0])
    log_ratio = jnp.log(jnp.stack([ratios, ratios]))
    adv = jnp.array([-2.0, 2.0])
    loss, clipped = grpo.policy_loss_BT(log_ratio, adv, **BOUNDS, clip_c=3.0)
    # A = -2: l1 = 2r = [4, 6, 8, 40], l2 = 2*1.25 = 2.5, max = l1; cap -A*c = 6 -> [4, 6, 6, 6];
    #         r = 3 sits exactly on the cap -> not clipped
    # A = +2: dual clip does not apply; max(-2r, -2.5) = -2.5, clipped for every r > 1.25
    close(loss, [[4.0, 6.0, 6.0, 6.0], [-2.5, -2.5, -2.5, -2.5]])
    np.testing.assert_array_equal(clipped, [[False, False, True, True], [True] * 4])
    no_dual, no_dual_clipped = grpo.policy_loss_BT(log_ratio, adv, **BOUNDS, clip_c=None)
    close(no_dual[0], [4.0, 6.0, 8.0, 40.0])
    assert not bool(no_dual_clipped[0].any())


def test_policy_loss_clamps_log_ratio_before_exp():
    loss, _ = grpo.policy_loss_BT(jnp.array([[100.0, -100.0]]), jnp.array([-1.0]), clip_c=None)
    # log ratio clamped to +-20: l = max(e^20, clip) = e^20 ; max(e^-20, .8) = .8
    close(loss, [[math.exp(20.0), 0.8]], atol=1e3)
    assert np.isfinite(np.asarray(loss)).all()


def test_policy_loss_rejects_bad_clip_values():
    lr, adv = jnp.zeros((1, 2)), jnp.ones(1)
    with pytest.raises(ValueError, match="clip_c=1.0"):
        grpo.policy_loss_BT(lr, adv, clip_c=1.0)
    with pytest.raises(ValueError, match="clip_low=1.0"):
        grpo.policy_loss_BT(lr, adv, clip_low=1.0)
    with pytest.raises(ValueError, match="adv"):
        grpo.policy_loss_BT(lr, jnp.ones(2))


# --- KL


def test_kl_estimators_by_hand():
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    ref = jnp.array([[-1.5, -1.0, -0.5]])
    # d = logp - ref = [.5, -1, 0]
    close(grpo.kl_penalty(logp, ref, estimator="k1"), [[0.5, -1.0, 0.0]])
    close(grpo.kl_penalty(logp, ref, estimator="k2"), [[0.125, 0.5, 0.0]])
    # k3 with x = ref - logp = [-.5, 1, 0]: e^x - x - 1 = [.6065307 - .5, 2.7182818 - 2, 0]
    close(grpo.kl_penalty(logp, ref, estimator="k3"), [[0.1065307, 0.7182818, 0.0]])
    # d k3 / d logp = 1 - e^(ref - logp) = 1 - e^-.5 = .3934693 at the first token; ref is constant
    g_logp, g_ref = jax.grad(
        lambda a, b: grpo.kl_penalty(a, b, estimator="k3")[0, 0], argnums=(0, 1)
    )(logp, ref)
    close(g_logp[0, 0], 0.3934693)
    close(g_ref, np.zeros((1, 3)))


def test_k3_is_clamped_to_ten():
    # d = -30: x = 30 -> clamp 20 -> e^20 - 21 -> clamp 10; d = 30: x = -20 -> e^-20 + 19 -> 10
    kl = grpo.kl_penalty(jnp.array([[-31.0, 29.0]]), jnp.array([[-1.0, -1.0]]), estimator="k3")
    close(kl, [[10.0, 10.0]])


# --- aggregation

AGG_LOSS = jnp.array([[1.0, 2.0, 3.0, 1e3], [10.0, 1e3, 1e3, 1e3], [5.0, 5.0, 5.0, 5.0]])
AGG_MASK = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)


def test_aggregation_modes_with_ragged_masks():
    # token_mean: (1 + 2 + 3 + 10) / 4 tokens = 4
    close(grpo.aggregate_loss(AGG_LOSS, AGG_MASK, mode="token_mean"), 4.0)
    # seq_mean_token_mean: row means 2 and 10, empty row 2 skipped -> 6
    close(grpo.aggregate_loss(AGG_LOSS, AGG_MASK, mode="seq_mean_token_mean"), 6.0)
    # sum_norm, L = 4: row sums 6/4, 10/4, 0 -> mean over 3 rows = 4/3
    close(
        grpo.aggregate_loss(AGG_LOSS, AGG_MASK, mode="seq_mean_token_sum_norm", norm_length=4),
        4.0 / 3.0,
    )


def test_aggregation_ignores_nan_in_padding_and_gradient_weights():
    loss = AGG_LOSS.at[1, 2].set(jnp.nan)
    close(grpo.aggregate_loss(loss, AGG_MASK), 4.0)
    # token_mean gradient: 1/4 per valid token; seq_mean_token_mean: 1/(2 rows * 3) and 1/(2 * 1)
    close(jax.grad(grpo.aggregate_loss)(AGG_LOSS, AGG_MASK), AGG_MASK / 4.0)
    g = jax.grad(lambda l: grpo.aggregate_loss(l, AGG_MASK, mode="seq_mean_token_mean"))(AGG_LOSS)
    close(g, [[1 / 6, 1 / 6, 1 / 6, 0], [0.5, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("mode", grpo.LOSS_AGGS)
def test_aggregation_all_masked_is_zero_with_finite_gradient(mode):
    mask = jnp.zeros((2, 3), bool)
    agg = lambda l: grpo.aggregate_loss(l, mask, mode=mode, norm_length=3)  # noqa: E731
    close(agg(jnp.ones((2, 3))), 0.0)
    close(jax.grad(agg)(jnp.ones((2, 3))), np.zeros((2, 3)))


def test_sum_norm_needs_norm_length():
    with pytest.raises(ValueError, match="norm_length"):
        grpo.aggregate_loss(AGG_LOSS, AGG_MASK, mode="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="mode='sum'"):
        grpo.aggregate_loss(AGG_LOSS, AGG_MASK, mode="sum")


# --- entropy


def test_entropy_by_hand_and_stable():
    logits = jnp.array(
        [
            [[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e30, -1e30]],
            [[1e4, 1e4, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]],
        ]
    )
    mask = jnp.array([[1, 1], [1, 0]], bool)
    # uniform over 4: ln 4; p = [.25, .75]: .25 ln 4 + .75 ln(4/3) = .5623351; [1e4, 1e4, ...]: ln 2
    expected = [[math.log(4.0), 0.5623351], [math.log(2.0), 0.0]]
    close(grpo.entropy_from_logits(logits, mask), expected)


# --- grpo_loss

G_LOGP = jnp.array([[-1.0, -2.0], [-1.0, -1.0]])
G_OLD = jnp.array([[-1.0 - math.log(1.5), -2.0], [-1.0, -jnp.inf]])  # -inf padding must not leak
G_REF = jnp.array([[-1.5, -2.3], [-0.5, -jnp.inf]])
G_ADV = jnp.array([1.0, -1.0])
G_MASK = jnp.array([[1, 1], [1, 0]], bool)
G_CFG = GRPOLossConfig(clip_low=0.2, clip_high=0.3, clip_c=3.0, kl_coef=0.1, kl_estimator="k1")


def test_grpo_loss_values_and_metrics_by_hand():
    loss, m = jax.jit(grpo.grpo_loss, static_argnames="cfg")(
        G_LOGP, G_OLD, G_REF, G_ADV, G_MASK, cfg=G_CFG
    )
    # ratios: 1.5, 1 | 1. pg per token: A=1: -clip(1.5, .8, 1.3) = -1.3, -1; A=-1: +1
    # pg = (-1.3 - 1 + 1) / 3 = -.4333333; k1 = [.5, .3, -.5] -> .3/3 = .1
    # loss = -.4333333 + .1 * .1 = -.4233333
    close(m["pg_loss"], -1.3 / 3)
    close(m["kl"], 0.1)
    close(loss, -1.3 / 3 + 0.01)
    close(m["loss"], loss)
    close(m["clip_frac"], 1 / 3)
    close(m["ratio/mean"], 3.5 / 3)
    close(m["ratio/max"], 1.5)
    close(m["ratio/min"], 1.0)


def test_grpo_loss_gradient_by_hand_and_sign():
    grad = jax.grad(lambda lp: grpo.grpo_loss(lp, G_OLD, G_REF, G_ADV, G_MASK, G_CFG)[0])(G_LOGP)
    # token-mean over 3 tokens; k1 adds kl_coef/3 = .0333 to every valid token
    # (0,0) clipped -> pg 0; (0,1) -A r/3 = -1/3; (1,0) -A r/3 = +1/3; padding 0
    close(grad, [[0.1 / 3, -1 / 3 + 0.1 / 3], [1 / 3 + 0.1 / 3, 0.0]])
    # raising logp of the positive-advantage unclipped token lowers the loss
    assert grad[0, 1] < 0 and grad[1, 0] > 0


def test_grpo_loss_without_reference_and_kl_zero():
    cfg = GRPOLossConfig(kl_coef=0.0)
    loss, m = grpo.grpo_loss(G_LOGP, G_OLD, None, G_ADV, G_MASK, cfg)
    close(m["kl"], 0.0)
    close(loss, -1.3 / 3)  # default clip_high .3 as above
    # kl_coef 0 with a reference: KL is logged (k3 by default) but not in the loss
    loss2, m2 = grpo.grpo_loss(G_LOGP, G_OLD, G_REF, G_ADV, G_MASK, cfg)
    close(loss2, loss)
    assert float(m2["kl"]) > 0
    with pytest.raises(ValueError, match="ref_logp_BT"):
        grpo.grpo_loss(G_LOGP, G_OLD, None, G_ADV, G_MASK, G_CFG)


@pytest.mark.parametrize("loss_agg", grpo.LOSS_AGGS)
@pytest.mark.parametrize("ratio_level", grpo.RATIO_LEVELS)
def test_grpo_loss_all_masked_rows_stay_finite(loss_agg, ratio_level):
    cfg = GRPOLossConfig(loss_agg=loss_agg, ratio_level=ratio_level, norm_length=2)
    for mask in (jnp.array([[1, 1], [0, 0]], bool), jnp.zeros((2, 2), bool)):
        loss, m = grpo.grpo_loss(G_LOGP, G_OLD, G_REF, G_ADV, mask, cfg)
        grad = jax.grad(lambda lp: grpo.grpo_loss(lp, G_OLD, G_REF, G_ADV, mask, cfg)[0])(G_LOGP)
        assert all(np.isfinite(np.asarray(v)) for v in m.values()), m
        assert np.isfinite(np.asarray(grad)).all()
        close(grad[1], np.zeros(2))  # the empty row gets no gradient
    close(loss, 0.0)
    close(m["ratio/mean"], 1.0)


def test_grpo_loss_config_validation():
    with pytest.raises(ValueError, match="norm_length"):
        GRPOLossConfig(loss_agg="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="clip_c"):
        GRPOLossConfig(clip_c=0.5)
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        GRPOLossConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="ratio_level='seq'"):
        GRPOLossConfig(ratio_level="seq")
    assert hash(GRPOLossConfig()) == hash(GRPOLossConfig())
