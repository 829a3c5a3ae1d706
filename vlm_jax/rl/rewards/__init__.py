r"""Verifiable rewards for GRPO and evaluation.

`get(name)` returns `fn(responses, answers, **fields) -> np.ndarray` (float32, one value per response)
for a builtin (`math`, `mcq`, `number`, `yes_no`, `iou`, `giou`, `detection`, `ocr`, `format`,
`overlong`, `auto`) or a user reward `path/to/file.py:function`. `build_reward(spec)` weights several
into one total plus per-component arrays (logged as `reward/<name>`). Rewards never raise on model
output; failures score 0 and are counted in `reward_errors()`.
"""

from vlm_jax.rl.rewards.combine import DEFAULT_SPEC, CombinedReward, RewardSpec, build_reward
from vlm_jax.rl.rewards.geometry import giou, greedy_detection_score, iou
from vlm_jax.rl.rewards.graders import ACCURACY_GRADERS, SAMPLE_GRADERS, anls, overlong_penalty
from vlm_jax.rl.rewards.parsing import extract_answer
from vlm_jax.rl.rewards.registry import (BUILTIN_NAMES, DEFAULT_MAX_RESPONSE_LENGTH, DEFAULT_OVERLONG_BUFFER,
                                         EasyR1Adapter, RewardFn, UserReward, check_reward, display_name, get, grade, load_user_reward, reset_reward_errors,
                                         reward_errors)

__all__ = [
    "ACCURACY_GRADERS", "BUILTIN_NAMES", "CombinedReward", "EasyR1Adapter", "check_reward", "display_name", "DEFAULT_MAX_RESPONSE_LENGTH",
    "DEFAULT_OVERLONG_BUFFER", "DEFAULT_SPEC", "RewardFn", "RewardSpec", "SAMPLE_GRADERS", "UserReward",
    "anls", "build_reward", "extract_answer", "get", "giou", "grade", "greedy_detection_score", "iou",
    "load_user_reward", "overlong_penalty", "reset_reward_errors", "reward_errors",
]
