"""`scripts/estimate_tpu.py`'s length distribution: the capped gamma(2) response lengths whose mean
and truncated share the whole-iteration estimate rests on, and its replay of the sampler's decode loops."""

import importlib.util
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("estimate_tpu", ROOT / "scripts" / "estimate_tpu.py")
est = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(est)


def test_capped_mean_is_the_hand_computed_integral():
    # E[min(X, c)] = int_0^c P(X > x) dx = theta (2 - e^{-c/theta} (2 + c/theta)) for gamma(2, theta);
    # theta 500, c 2048: 949.28; the sum over whole tokens adds half a step, (1 - P(X > c)) / 2 = 0.449
    theta, cap = 500.0, 2048
    integral = theta * (2 - math.exp(-cap / theta) * (2 + cap / theta))
    assert abs(integral - 949.28) < 0.01
    assert abs(est.mean_length(theta, cap) - (integral + (1 - est.survival(cap, theta)) / 2)) < 0.01
    assert abs(est.mean_length(theta, cap) - 949.74) < 0.01


def test_scale_solved_for_the_papers_means_and_the_longest_row():
    for mean in (900, 450):
        theta = est.theta_for(mean, 2048)
        assert abs(est.mean_length(theta, 2048) - mean) < 1e-6
        drawn = est.draw_lengths(theta, 2048, 20_000)
        assert drawn.min() >= 1 and drawn.max() == 2048 and abs(drawn.mean() - mean) < 0.02 * mean
        # the share at the cap is P(X > 2047)
        assert abs((drawn == 2048).mean() - float(est.survival(2047, theta))) < 0.01
    theta = est.theta_for(900, 2048)
    # a 64-prompt x 5 call almost surely holds a row at the cap: its loop runs to the cap
    assert est.draw_lengths(theta, 2048, 320).max() == 2048


def test_decode_schedule_replays_the_sampler_loops():
    """Rows of 1, 3, 2 and 5 tokens (the first from the prefill). One loop: 4 iterations of all 4
    rows, slot t filled at iteration t. Two refilled slots, by hand: the 3- and 2-token rows start;
    after iteration 1 the 2-token row is done and its slot takes the 5-token row; after iteration 2
    the 3-token row is done and nothing waits; the 5-token row runs 3 more iterations alone."""
    live, filled = est.decode_schedule(np.array([1, 3, 2, 5]))
    assert live.tolist() == [4, 4, 4, 4] and filled.tolist() == [1, 2, 3, 4]
    live, filled = est.decode_schedule(np.array([1, 3, 2, 5]), slots=2)
    assert live.tolist() == [2, 2, 1, 1, 1] and filled.tolist() == [1, 2, 2, 3, 4]


def test_sampler_roofline_reads_the_views_and_the_slots_prompts():
    """KV positions read, by hand, for one call of 2 prompts x 2 samples (lengths 1, 3, 2, 5), prompt
    bucket 8, generation buffer 4, one chip. The whole buffer: 4 iterations x (4 rows x 4 slots + 2
    prompts x 8) = 128. Views (2, 4): filled 1, 2, 3, 4 read 2, 2, 4, 4 slots: 4 rows x 12 + 64 =
    112. Two refilled slots, 5 iterations: each slot gathers its prompt (2 x 8 x 5 = 80) and both
    (the empty one too) read views 2, 2, 2, 4, 4 (2 x 14 = 28): 108."""
    from types import SimpleNamespace as NS

    text = NS(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
              num_hidden_layers=1, vocab_size=32)
    cfg = NS(model=NS(dtype="float32"))
    st = NS(grpo=NS(num_samples=2, rollout_tensor=0))
    per_position = 1 * 2 * 1 * 4 * est.BF16
    lengths = np.array([1, 3, 2, 5])

    def kv(views, refill=0):
        r = est.sampler_work(text, cfg, st, lengths, 1, "v5p", 2, 8, 4, 0.0, refill=refill, views=views)
        return r["kv_bytes_read_per_chip"] / per_position, r

    assert kv((4,))[0] == 4 * 4 * 4 + 2 * 8 * 4
    assert kv((2, 4))[0] == 4 * (2 + 2 + 4 + 4) + 2 * 8 * 4
    got, r = kv((2, 4), refill=2)
    assert got == 2 * (2 + 2 + 2 + 4 + 4) + 2 * 8 * 5
    assert r["decode_steps"] == 5 and r["decode_slot_utilisation"] == 7 / 10
