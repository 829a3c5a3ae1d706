"""`scripts/estimate_tpu.py`'s length distribution: the capped gamma(2) response lengths whose mean,
truncated share and expected longest row the whole-iteration estimate rests on."""

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
    assert abs(est.expected_longest(theta, 2048, 1) - 900) < 1e-6  # one row: its own mean
    assert est.expected_longest(theta, 2048, 320) > 2047.99  # a 64-prompt call runs to the cap
    # two rows: E[max] = sum_n 1 - (1 - S(n))^2, by hand over the same terms
    s = est.survival(np.arange(2048), theta)
    assert abs(est.expected_longest(theta, 2048, 2) - float((2 * s - s * s).sum())) < 1e-6
