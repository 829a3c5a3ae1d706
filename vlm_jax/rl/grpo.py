"""GRPO loss math as small pure JAX functions over arrays.

Everything here is jittable; configuration values (estimator names, clip bounds, modes) are static
Python arguments, checked eagerly so a bad value fails with a clear message before any compile.
The jitted train step that runs the model lives elsewhere and calls these functions.

Shape suffixes: ``B`` rows (B = n_prompts * group_size, rows of one group consecutive), ``T``
response tokens, ``V`` vocabulary. Masks may be bool or float; they are treated as ``mask != 0``.

Conventions follow the PyTorch frameworks the paper's recipe runs on (EasyR1 / verl), so that
hyper-parameters carry over unchanged:
  * group std is ``torch.std`` (unbiased, ``ddof=1``) -> ``std_ddof=1`` by default;
  * the log-ratio is clamped to [-20, 20] before ``exp``; k3 KL is clamped to [-10, 10];
  * a token counts as "clipped" only where clipping changes the loss (strict inequality; see
    :func:`policy_loss_BT`).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

Estimator = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
Scaling = Literal["group", "batch", "none"]
RatioLevel = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k2", "k3"]
LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]

ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
SCALINGS: tuple[str, ...] = ("group", "batch", "none")
RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
LOSS_AGGS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")

# Default divisor per estimator when ``scaling`` is not given.
DEFAULT_SCALING: dict[str, str] = {
    "grpo": "group",
    "dr_grpo": "none",
    "rloo": "none",
    "reinforce_pp": "batch",
}

LOG_RATIO_CLAMP = 20.0  # |log ratio| bound before exp (verl): exp(20) ~ 4.9e8, finite in fp32.
K3_CLAMP = 10.0  # verl's clamp on the low_var_kl value.


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def _as_mask(mask: jax.Array) -> jax.Array:
    """Float32 0/1 mask from a bool or numeric mask."""
    return (jnp.asarray(mask) != 0).astype(jnp.float32)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (no NaN in the value or the gradient)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def _std(x: jax.Array, axis: int | None, ddof: int) -> jax.Array:
    return jnp.std(x, axis=axis, ddof=ddof, keepdims=axis is not None)


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------


def compute_advantages(
    rewards_B: jax.Array,
    group_size: int,
    *,
    estimator: Estimator = "grpo",
    scaling: Scaling | None = None,
    eps: float = 1e-6,
    std_ddof: int = 1,
    lengths_B: jax.Array | None = None,
) -> jax.Array:
    """Outcome advantages, one per response: ``adv = (r - baseline) / divisor``.

    ``estimator`` picks the baseline, ``scaling`` the divisor; they compose freely except that
    ``dr_grpo`` means "no std" and therefore only allows ``scaling`` None/"none".

    Baselines (``mean_g`` = mean of the row's group of ``G = group_size`` rewards):
      * ``grpo``, ``dr_grpo``: ``r_i - mean_g``.
      * ``rloo``: ``r_i - mean_{j != i in group} r_j = G / (G - 1) * (r_i - mean_g)``
        (needs G >= 2).
      * ``reinforce_pp``: REINFORCE++ as EasyR1/verl compute it (``masked_whiten`` of the
        token-level returns): every response token carries its row's reward, and the baseline is
        the mean over the batch's valid tokens, i.e. the batch mean of ``r`` weighted by the
        response lengths ``lengths_B`` (None: one weight per response). With ``scaling="batch"``
        (its default) the divisor is ``sqrt(var + 1e-8)``, ``var`` the unbiased (Bessel over the
        token count) token-weighted variance, exactly ``masked_whiten``; the advantage is the same
        on every token of a row, so one value per row is returned.

    Divisors (standard deviations are of the raw rewards, ``ddof=std_ddof``):
      * ``"group"``: ``std_g + eps``; ``"batch"``: ``std_batch + eps``; ``"none"``: 1.

      Defaults (``scaling=None``): grpo -> group, dr_grpo -> none, rloo -> none,
      reinforce_pp -> batch. So ``dr_grpo == grpo`` with ``scaling="none"``.

    ``std_ddof=1`` matches ``torch.std`` as used by EasyR1/verl (unbiased). A group whose rewards
    are all equal gets advantage exactly 0 (numerator 0, divisor eps > 0): no NaN.

    Args:
      rewards_B: rewards [B], B a multiple of ``group_size``; groups are consecutive rows.
      group_size: responses per prompt (G).
      lengths_B: response tokens per row [B], stop token included (read by ``reinforce_pp`` only).
    Returns:
      float32 advantages, shape [B].
    """
    _check_choice("estimator", estimator, ESTIMATORS)
    if scaling is None:
        scaling = DEFAULT_SCALING[estimator]  # type: ignore[assignment]
    _check_choice("scaling", scaling, SCALINGS)
    if estimator == "dr_grpo" and scaling != "none":
        raise ValueError(f"estimator='dr_grpo' means no std scaling; got scaling={scaling!r}")
    rewards_B = jnp.asarray(rewards_B, jnp.float32)
    if rewards_B.ndim != 1:
        raise ValueError(f"rewards_B must be 1-D, got shape {rewards_B.shape}")
    (batch,) = rewards_B.shape
    if group_size < 1 or batch % group_size != 0:
        raise ValueError(
            f"batch size {batch} is not a positive multiple of group_size={group_size}"
        )
    if estimator == "rloo" and group_size < 2:
        raise ValueError("estimator='rloo' needs group_size >= 2 (leave-one-out over the group)")
    if scaling == "group" and group_size <= std_ddof:
        raise ValueError(f"scaling='group' with std_ddof={std_ddof} needs group_size > {std_ddof}")
    if scaling == "batch" and batch <= std_ddof:
        raise ValueError(f"scaling='batch' with std_ddof={std_ddof} needs batch size > {std_ddof}")

    rewards_NG = rewards_B.reshape(batch // group_size, group_size)
    group_mean_N1 = rewards_NG.mean(axis=1, keepdims=True)
    if estimator in ("grpo", "dr_grpo"):
        centred_NG = rewards_NG - group_mean_N1
    elif estimator == "rloo":
        centred_NG = group_size / (group_size - 1) * (rewards_NG - group_mean_N1)
    else:  # reinforce_pp: token-level whitening over the batch's valid tokens (verl masked_whiten)
        weights_B = (jnp.ones_like(rewards_B) if lengths_B is None
                     else jnp.asarray(lengths_B, jnp.float32).reshape(batch))
        n_tokens = weights_B.sum()
        mean = (weights_B * rewards_B).sum() / (n_tokens + 1e-8)
        centred_NG = rewards_NG - mean
        if scaling == "batch":
            var = (weights_B * jnp.square(rewards_B - mean)).sum() / (n_tokens + 1e-8)
            var = jnp.where(n_tokens > 1, var * n_tokens / jnp.maximum(n_tokens - 1, 1e-8), var)
            return (centred_NG * jax.lax.rsqrt(var + 1e-8)).reshape(batch)

    if scaling == "group":
        adv_NG = centred_NG / (_std(rewards_NG, 1, std_ddof) + eps)
    elif scaling == "batch":
        adv_NG = centred_NG / (_std(rewards_B, None, std_ddof) + eps)
    else:
        adv_NG = centred_NG
    return adv_NG.reshape(batch)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def response_mask(
    lengths_B: jax.Array,
    T: int,
    *,
    truncated_B: jax.Array | None = None,
    mask_truncated: bool = False,
) -> jax.Array:
    """Bool mask [B, T]: ``mask[b, t] = t < lengths[b]``.

    With ``mask_truncated`` (DAPO overlong filtering), rows flagged in ``truncated_B`` (generation
    hit the length limit without a stop token) are zeroed entirely so they contribute no gradient.
    """
    lengths_B = jnp.asarray(lengths_B)
    if lengths_B.ndim != 1:
        raise ValueError(f"lengths_B must be 1-D, got shape {lengths_B.shape}")
    mask_BT = jnp.arange(T)[None, :] < lengths_B[:, None]
    if mask_truncated:
        if truncated_B is None:
            raise ValueError("mask_truncated=True needs truncated_B")
        truncated_B = jnp.asarray(truncated_B)
        if truncated_B.shape != lengths_B.shape:
            raise ValueError(
                f"truncated_B shape {truncated_B.shape} != lengths_B shape {lengths_B.shape}"
            )
        mask_BT = mask_BT & ~(truncated_B.astype(bool)[:, None])
    return mask_BT


# ----------------------------------------------------------------------------------------------
# Importance ratio, policy loss, KL
# ----------------------------------------------------------------------------------------------


def importance_ratio(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    level: RatioLevel = "token",
) -> jax.Array:
    """Log importance ratio per token, ``log_ratio_BT`` (exp it to get the ratio).

    * ``"token"`` (PPO/GRPO): ``logp - old_logp``.
    * ``"sequence"`` (GSPO-token, Zheng et al. 2025): with
      ``s_b = sum_t mask*(logp - old_logp) / sum_t mask`` (the log of the length-normalised
      sequence ratio), ``log_ratio = sg(s_b) + logp - sg(logp)``. Its value is ``s_b`` on every
      token; its gradient w.r.t. ``logp[b, t]`` is 1 (only that token), as in token-level PPO, so
      gradients flow per token while clipping acts on the whole sequence. With equal advantages
      inside a sequence and per-sequence token-mean aggregation this equals GSPO's gradient.

    Padding positions (mask 0) get log-ratio 0 (ratio 1), so garbage there cannot become inf/NaN.
    """
    _check_choice("level", level, RATIO_LEVELS)
    if logp_BT.shape != old_logp_BT.shape or logp_BT.shape != mask_BT.shape:
        raise ValueError(
            f"shape mismatch: logp {logp_BT.shape}, old_logp {old_logp_BT.shape}, "
            f"mask {mask_BT.shape}"
        )
    logp_BT = logp_BT.astype(jnp.float32)
    old_logp_BT = jax.lax.stop_gradient(old_logp_BT.astype(jnp.float32))
    valid_BT = jnp.asarray(mask_BT) != 0
    token_BT = jnp.where(valid_BT, logp_BT - old_logp_BT, 0.0)
    if level == "token":
        return token_BT
    n_tokens_B = valid_BT.sum(axis=1).astype(jnp.float32)
    seq_B = _safe_div(token_BT.sum(axis=1), n_tokens_B)
    log_ratio_BT = jax.lax.stop_gradient(seq_B)[:, None] + logp_BT - jax.lax.stop_gradient(logp_BT)
    return jnp.where(valid_BT, log_ratio_BT, 0.0)


def policy_loss_BT(
    log_ratio_BT: jax.Array,
    adv_B: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float | None = 3.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token PPO-clip loss (to minimise) with asymmetric bounds and dual clip.

    With ``r = exp(clamp(log_ratio, -20, 20))`` and ``A`` the row's advantage:
      ``l1 = -A * r``, ``l2 = -A * clip(r, 1 - clip_low, 1 + clip_high)``, ``l = max(l1, l2)``;
      dual clip (Ye et al. 2020), only where ``A < 0``: ``l = min(l, -A * clip_c)``, which caps the
      loss of a negative-advantage token whose ratio exploded (r > clip_c); ``clip_c=None``
      disables it.

    ``clipped_BT`` is True where clipping changes the loss, i.e. ``l2 > l1`` (strict; verl's
    ``pg_clipfrac``) or the dual clip binds (``max(l1, l2) > -A * clip_c`` with A < 0). A ratio
    exactly on a bound (r == 1 + clip_high) is therefore *not* clipped; tokens with A == 0 never
    are.
    Where a flag is True the gradient w.r.t. the ratio is zero; elsewhere (bounds included) it is
    the unclipped ``-A``.
    """
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low={clip_low} must be in [0, 1)")
    if clip_high < 0.0:
        raise ValueError(f"clip_high={clip_high} must be >= 0")
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"clip_c={clip_c} must be > 1 (or None to disable dual clip)")
    if adv_B.ndim != 1 or log_ratio_BT.ndim != 2 or adv_B.shape[0] != log_ratio_BT.shape[0]:
        raise ValueError(
            f"need log_ratio [B, T] and adv [B]; got {log_ratio_BT.shape}, {adv_B.shape}"
        )
    log_ratio_BT = jnp.clip(log_ratio_BT.astype(jnp.float32), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_BT = jnp.exp(log_ratio_BT)
    adv_B1 = jnp.asarray(adv_B, jnp.float32)[:, None]
    loss1_BT = -adv_B1 * ratio_BT
    loss2_BT = -adv_B1 * jnp.clip(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    # where() instead of max()/min(): identical values, but on a tie (ratio exactly on a bound) the
    # gradient is the unclipped one in full, consistent with the flag saying "not clipped".
    clipped_BT = loss2_BT > loss1_BT
    loss_BT = jnp.where(clipped_BT, loss2_BT, loss1_BT)
    if clip_c is not None:
        loss3_B1 = -adv_B1 * clip_c
        dual_BT = (adv_B1 < 0) & (loss_BT > loss3_B1)
        loss_BT = jnp.where(dual_BT, loss3_B1, loss_BT)
        clipped_BT = clipped_BT | dual_BT
    return loss_BT, clipped_BT


def kl_penalty(
    logp_BT: jax.Array, ref_logp_BT: jax.Array, *, estimator: KLEstimator = "k3"
) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman's k1/k2/k3).

    With ``d = logp - ref_logp``:
      * ``k1 = d`` (unbiased, high variance, can be negative);
      * ``k2 = d**2 / 2`` (verl "mse");
      * ``k3 = exp(-d) - (-d) - 1`` (verl "low_var_kl"; >= 0), with ``-d`` clamped to [-20, 20]
        before exp and the result clamped to [-10, 10], as verl does.
    """
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    if logp_BT.shape != ref_logp_BT.shape:
        raise ValueError(f"shape mismatch: logp {logp_BT.shape}, ref_logp {ref_logp_BT.shape}")
    diff_BT = logp_BT.astype(jnp.float32) - jax.lax.stop_gradient(ref_logp_BT.astype(jnp.float32))
    if estimator == "k1":
        return diff_BT
    if estimator == "k2":
        return 0.5 * jnp.square(diff_BT)
    neg_BT = jnp.clip(-diff_BT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(neg_BT) - neg_BT - 1.0, -K3_CLAMP, K3_CLAMP)


# ----------------------------------------------------------------------------------------------
# Aggregation, entropy
# ----------------------------------------------------------------------------------------------


def aggregate_loss(
    loss_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    mode: LossAgg = "token_mean",
    norm_length: int | None = None,
) -> jax.Array:
    """Reduce a per-token loss to a scalar over valid tokens (masked positions never contribute).

    * ``token_mean``: ``sum(l * m) / sum(m)`` - every token weighs the same (DAPO).
    * ``seq_mean_token_mean``: per-sequence token mean, then mean over sequences that have at
      least one token (GRPO paper).
    * ``seq_mean_token_sum_norm`` (Dr.GRPO): ``sum_t(l * m) / norm_length`` per sequence, then mean
      over all B rows; ``norm_length`` is a constant (the max response length), so no length bias.

    Nothing valid at all -> 0 (finite, zero gradient).
    """
    _check_choice("mode", mode, LOSS_AGGS)
    if loss_BT.shape != mask_BT.shape:
        raise ValueError(f"shape mismatch: loss {loss_BT.shape}, mask {mask_BT.shape}")
    valid_BT = jnp.asarray(mask_BT) != 0
    mask_f_BT = valid_BT.astype(jnp.float32)
    masked_BT = jnp.where(valid_BT, loss_BT.astype(jnp.float32), 0.0)
    if mode == "token_mean":
        return _safe_div(masked_BT.sum(), mask_f_BT.sum())
    if mode == "seq_mean_token_mean":
        n_tokens_B = mask_f_BT.sum(axis=1)
        seq_B = _safe_div(masked_BT.sum(axis=1), n_tokens_B)
        has_tokens_B = (n_tokens_B > 0).astype(jnp.float32)
        return _safe_div((seq_B * has_tokens_B).sum(), has_tokens_B.sum())
    if norm_length is None or norm_length <= 0:
        raise ValueError(f"mode='seq_mean_token_sum_norm' needs norm_length > 0, got {norm_length}")
    return (masked_BT.sum(axis=1) / norm_length).mean()


def aggregate_weights(
    mask_BT: jax.Array, *, mode: LossAgg = "token_mean", norm_length: int | None = None
) -> jax.Array:
    """Per-token weights [B, T] with ``aggregate_loss(l, mask, mode) == sum(l * weights)``: what
    lets a batch's loss be summed over micro-batches (each takes its rows' weights, computed once
    over the whole batch) and equal the one-batch loss."""
    _check_choice("mode", mode, LOSS_AGGS)
    mask_f_BT = (jnp.asarray(mask_BT) != 0).astype(jnp.float32)
    if mode == "token_mean":
        return _safe_div(mask_f_BT, mask_f_BT.sum())
    if mode == "seq_mean_token_mean":
        n_tokens_B = mask_f_BT.sum(axis=1, keepdims=True)
        has_tokens = (n_tokens_B > 0).astype(jnp.float32).sum()
        return _safe_div(_safe_div(mask_f_BT, n_tokens_B), has_tokens)
    if norm_length is None or norm_length <= 0:
        raise ValueError(f"mode='seq_mean_token_sum_norm' needs norm_length > 0, got {norm_length}")
    return mask_f_BT / (norm_length * mask_f_BT.shape[0])


def masked_mean(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Mean of ``x`` over valid positions; 0 when none is valid."""
    return aggregate_loss(x_BT, mask_BT, mode="token_mean")


def entropy_from_logits(logits_BTV: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Per-token entropy ``H = -sum_v p_v log p_v`` [B, T] in float32, 0 at masked positions.

    Uses ``log_softmax`` (max-subtracted), so very large logits stay finite. Materialises [B, T, V]
    float32; callers with a large vocabulary may want to call it per chunk of T.
    """
    if logits_BTV.shape[:2] != mask_BT.shape:
        raise ValueError(f"shape mismatch: logits {logits_BTV.shape}, mask {mask_BT.shape}")
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
    return jnp.where(jnp.asarray(mask_BT) != 0, entropy_BT, 0.0)


# ----------------------------------------------------------------------------------------------
# Composed loss
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """Static GRPO loss settings (hashable: pass as a static jit argument).

    Defaults are the paper's recipe (EasyR1): clip 0.2 / 0.3, dual clip 3, k3 KL with coef 1e-2,
    token-mean aggregation. ``norm_length`` is required for ``seq_mean_token_sum_norm``.
    """

    clip_low: float = 0.2
    clip_high: float = 0.3
    clip_c: float | None = 3.0
    ratio_level: RatioLevel = "token"
    kl_coef: float = 1e-2
    kl_estimator: KLEstimator = "k3"
    loss_agg: LossAgg = "token_mean"
    norm_length: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"GRPOLossConfig.clip_low={self.clip_low} must be in [0, 1)")
        if self.clip_high < 0.0:
            raise ValueError(f"GRPOLossConfig.clip_high={self.clip_high} must be >= 0")
        if self.clip_c is not None and self.clip_c <= 1.0:
            raise ValueError(f"GRPOLossConfig.clip_c={self.clip_c} must be > 1 or None")
        _check_choice("GRPOLossConfig.ratio_level", self.ratio_level, RATIO_LEVELS)
        if self.kl_coef < 0.0:
            raise ValueError(f"GRPOLossConfig.kl_coef={self.kl_coef} must be >= 0")
        _check_choice("GRPOLossConfig.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("GRPOLossConfig.loss_agg", self.loss_agg, LOSS_AGGS)
        if self.loss_agg == "seq_mean_token_sum_norm" and (
            self.norm_length is None or self.norm_length <= 0
        ):
            raise ValueError(
                "GRPOLossConfig.norm_length must be a positive int for "
                f"loss_agg='seq_mean_token_sum_norm', got {self.norm_length}"
            )


LOSS_METRICS = ("loss", "pg_loss", "kl", "clip_frac", "ratio/mean", "ratio/max", "ratio/min")


def grpo_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    ref_logp_BT: jax.Array | None,
    adv_B: jax.Array,
    mask_BT: jax.Array,
    cfg: GRPOLossConfig,
    *,
    weights_BT: jax.Array | None = None,
    token_weights_BT: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO objective: ``agg(policy_loss) + kl_coef * agg(kl)``, plus metrics.

    ``logp_BT`` are the current policy's log-probs of the sampled tokens (differentiable);
    ``old_logp_BT`` the sampler's/behaviour policy's and ``ref_logp_BT`` the frozen reference's
    (both treated as constants). ``ref_logp_BT`` may be None only when ``cfg.kl_coef == 0``; when it
    is given with ``kl_coef == 0`` the KL is computed for logging only.

    Metrics (scalars): ``loss``, ``pg_loss``, ``kl`` (aggregated like the loss; 0 without a
    reference), ``clip_frac`` (masked mean of clipped tokens), ``ratio/mean|max|min`` over valid
    tokens (1 when no token is valid).

    For a micro-batch of a larger batch, ``weights_BT`` (``aggregate_weights`` of the whole batch,
    these rows) and ``token_weights_BT`` (the same for ``token_mean``) replace the aggregation over
    these rows alone: the loss and the mean metrics are then this micro-batch's share, and their sums
    over the micro-batches equal the one-batch values.
    """
    if ref_logp_BT is None and cfg.kl_coef > 0:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs ref_logp_BT")
    log_ratio_BT = importance_ratio(logp_BT, old_logp_BT, mask_BT, level=cfg.ratio_level)
    pg_BT, clipped_BT = policy_loss_BT(
        log_ratio_BT, adv_B, clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_c=cfg.clip_c
    )
    valid_BT = jnp.asarray(mask_BT) != 0
    if weights_BT is None:
        agg = lambda l: aggregate_loss(l, mask_BT, mode=cfg.loss_agg, norm_length=cfg.norm_length)  # noqa: E731
        mean = lambda x: masked_mean(x, valid_BT)  # noqa: E731
    else:
        agg = lambda l: jnp.sum(jnp.where(valid_BT, l.astype(jnp.float32), 0.0) * weights_BT)  # noqa: E731
        mean = lambda x: jnp.sum(jnp.where(valid_BT, x, 0.0) * token_weights_BT)  # noqa: E731
    pg_loss = agg(pg_BT)
    if ref_logp_BT is None:
        kl = jnp.zeros((), jnp.float32)
    else:
        kl = agg(kl_penalty(logp_BT, ref_logp_BT, estimator=cfg.kl_estimator))
    loss = pg_loss + cfg.kl_coef * kl if cfg.kl_coef > 0 else pg_loss

    any_valid = valid_BT.any()
    ratio_BT = jax.lax.stop_gradient(
        jnp.exp(jnp.clip(log_ratio_BT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    )
    metrics = {
        "loss": loss,
        "pg_loss": pg_loss,
        "kl": jax.lax.stop_gradient(kl),
        "clip_frac": mean(clipped_BT.astype(jnp.float32)),
        "ratio/mean": jnp.where(any_valid, mean(ratio_BT), 1.0 if weights_BT is None else 0.0),
        "ratio/max": jnp.where(any_valid, jnp.max(jnp.where(valid_BT, ratio_BT, -jnp.inf)), 1.0),
        "ratio/min": jnp.where(any_valid, jnp.min(jnp.where(valid_BT, ratio_BT, jnp.inf)), 1.0),
    }
    return loss, metrics
