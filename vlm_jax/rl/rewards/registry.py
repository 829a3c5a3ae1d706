"""Batch reward functions by name: builtins, `auto` (grader chosen per example), `overlong`, and user
rewards loaded from `path/to/file.py:function`.

A user reward is `fn(responses, answers, **fields) -> list/array of floats` (one per response;
`fields` holds per-response lists such as `answer_type`, `task`, `response_lengths`, and scalars
such as `max_response_length`; accept `**fields` and ignore what you do not use). An EasyR1-style
per-sample `compute_score(predict, ground_truth) -> float | {"overall": float, ...}` is selected
explicitly with the prefix `easyr1:` (`easyr1:path/to/file.py:compute_score`). `check_reward(name)`
calls a user reward once, unguarded, on an example (the trainer does this at start-up), so a wrong
signature stops the run with its traceback instead of scoring 0 for the whole run.

Every reward is `fn(responses, answers, **fields) -> np.ndarray` (float32, one value per response).
Rewards never raise on model output: a grader or user function that fails on a sample scores that
sample 0, logs the first failure per reward name with the sample, and counts every failed sample in
`reward_errors()` (also `fn.error_count`). Misuse by the caller (mismatched batch lengths, a missing
required field, an unknown `answer_type`) is a programming or data error and raises ValueError.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import logging
import re
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_jax.rl.rewards.graders import ACCURACY_GRADERS, SAMPLE_GRADERS, Grader, overlong_penalty

logger = logging.getLogger(__name__)

RewardFn = Callable[..., np.ndarray]

# Soft overlong penalty defaults, used only when the caller passes no `max_response_length` /
# `overlong_buffer` field: the paper's 2048-token response budget, penalised over its last quarter.
DEFAULT_MAX_RESPONSE_LENGTH = 2048
DEFAULT_OVERLONG_BUFFER = 512
# Characters of a failing sample shown in the warning.
LOG_SAMPLE_CHARS = 200

_USER_SPEC = re.compile(r"(?P<style>easyr1:)?(?P<path>.+\.py):(?P<fn>[A-Za-z_][A-Za-z0-9_]*)")
EASYR1_PREFIX = "easyr1:"

_lock = threading.Lock()
_error_counts: collections.Counter[str] = collections.Counter()
_logged: set[str] = set()


def reward_errors() -> dict[str, int]:
    """Failed samples (scored 0 because a grader or user reward failed) per reward name so far."""
    with _lock:
        return dict(_error_counts)


def reset_reward_errors() -> None:
    """Zero the error counters and re-arm the log-once warnings (for tests and new runs)."""
    with _lock:
        _error_counts.clear()
        _logged.clear()


def _truncate(text: Any) -> str:
    s = repr(text)
    return s if len(s) <= LOG_SAMPLE_CHARS else s[:LOG_SAMPLE_CHARS] + f"... [{len(s)} chars]"


def _record_error(name: str, exc: BaseException, sample: Any, count: int = 1) -> None:
    """Count `count` failed samples for reward `name`; log a warning with the sample the first time."""
    with _lock:
        _error_counts[name] += count
        first = name not in _logged
        _logged.add(name)
    if first:
        frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        message = str(exc)
        if len(message) > LOG_SAMPLE_CHARS:
            message = message[:LOG_SAMPLE_CHARS] + f"... [{len(message)} chars]"
        logger.warning("reward %r failed on sample %s (scored 0; later failures are only counted in "
                       "reward_errors()): %s%s: %s", name, _truncate(sample), type(exc).__name__, where, message)


def _batch_size(name: str, responses: Sequence[str], answers: Sequence[Any]) -> int:
    if len(responses) != len(answers):
        raise ValueError(f"reward {name!r}: got {len(responses)} responses but {len(answers)} answers")
    return len(responses)


def _field(name: str, fields: Mapping[str, Any], key: str, n: int) -> Sequence[Any] | None:
    """The per-example field `key` checked to have one entry per response, or None if absent."""
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != n:
        raise ValueError(f"reward {name!r}: field {key!r} must have one entry per response ({n}), got {value!r:.200}")
    return value


class _Reward:
    """Base of the named batch rewards: a name and its error counter."""

    name: str

    @property
    def error_count(self) -> int:
        """Samples of this reward scored 0 because of a failure (shared by rewards of the same name)."""
        return reward_errors().get(self.name, 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _safe_grade(name: str, grader: Grader, response: Any, answer: Any) -> float:
    """`grader(response, answer)` as a finite float; any exception or non-finite value -> 0, counted."""
    try:
        value = float(grader(response, answer))
        if not np.isfinite(value):
            raise ValueError(f"grader returned non-finite {value}")
        return value
    except Exception as exc:  # noqa: BLE001 - rewards must never take down a training step
        _record_error(name, exc, response)
        return 0.0


class SampleReward(_Reward):
    """A per-sample grader applied to each (response, answer) pair; extra fields are ignored."""

    def __init__(self, name: str, grader: Grader):
        self.name = name
        self.grader = grader

    def __call__(self, responses: Sequence[str], answers: Sequence[Any], **fields: Any) -> np.ndarray:
        _batch_size(self.name, responses, answers)
        return np.array([_safe_grade(self.name, self.grader, r, a) for r, a in zip(responses, answers)],
                        dtype=np.float32)


class AutoReward(_Reward):
    """Accuracy with the grader chosen per example by `fields["answer_type"][i]` (one of
    `ACCURACY_GRADERS`; a missing field or a None/empty entry means `math`)."""

    name = "auto"

    def __call__(self, responses: Sequence[str], answers: Sequence[Any], **fields: Any) -> np.ndarray:
        n = _batch_size(self.name, responses, answers)
        types = _field(self.name, fields, "answer_type", n)
        out = np.zeros(n, dtype=np.float32)
        for i, (response, answer) in enumerate(zip(responses, answers)):
            kind = (types[i] if types is not None else None) or "math"
            grader = ACCURACY_GRADERS.get(kind) if isinstance(kind, str) else None
            if grader is None:
                raise ValueError(f"reward 'auto': row {i} has unknown answer_type {kind!r}; "
                                 f"valid: {sorted(ACCURACY_GRADERS)}")
            out[i] = _safe_grade(self.name, grader, response, answer)
        return out


class OverlongReward(_Reward):
    """DAPO soft overlong penalty (0 down to -1) from `fields["response_lengths"]` (tokens, required),
    with `fields["max_response_length"]` (default `DEFAULT_MAX_RESPONSE_LENGTH`) and
    `fields["overlong_buffer"]` (default `DEFAULT_OVERLONG_BUFFER`) as scalar parameters."""

    name = "overlong"

    def __call__(self, responses: Sequence[str], answers: Sequence[Any], **fields: Any) -> np.ndarray:
        n = _batch_size(self.name, responses, answers)
        lengths = _field(self.name, fields, "response_lengths", n)
        if lengths is None:
            raise ValueError("reward 'overlong' needs the field 'response_lengths' (tokens per response)")
        return overlong_penalty(np.asarray(lengths),
                                fields.get("max_response_length", DEFAULT_MAX_RESPONSE_LENGTH),
                                fields.get("overlong_buffer", DEFAULT_OVERLONG_BUFFER))


def _as_values(out: Any, n: int) -> np.ndarray | None:
    """A user reward's output as a float64 vector of length n, or None if it is not one."""
    try:
        values = np.array(out, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    return values if values.shape == (n,) else None


def _slice_fields(fields: Mapping[str, Any], i: int, n: int) -> dict[str, Any]:
    """Fields for the single example i: per-example lists/arrays (length n) are sliced to [i:i+1];
    anything else (scalar parameters) is passed unchanged."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        per_example = isinstance(value, (list, tuple, np.ndarray)) and len(value) == n
        out[key] = value[i:i + 1] if per_example else value
    return out


class UserReward(_Reward):
    """A user function `fn(responses, answers, **fields) -> list/array of floats`, made safe.

    The whole batch is tried first. If the function raises, it is retried one sample at a time so
    only the failing samples score 0. A result of the wrong length or type scores the whole batch 0;
    non-finite entries score 0 individually. Each failed sample is counted under the reward name.
    """

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name = name
        self.fn = fn

    def __call__(self, responses: Sequence[str], answers: Sequence[Any], **fields: Any) -> np.ndarray:
        n = _batch_size(self.name, responses, answers)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        try:
            out = self.fn(list(responses), list(answers), **fields)
        except Exception:  # noqa: BLE001 - find the failing samples one by one
            return self._per_sample(responses, answers, fields)
        values = _as_values(out, n)
        if values is None:
            _record_error(self.name, ValueError(f"returned {_truncate(out)} for a batch of {n} responses; "
                                                f"expected {n} numbers"), responses[0], count=n)
            return np.zeros(n, dtype=np.float32)
        return self._finite(values, responses)

    def _finite(self, values: np.ndarray, responses: Sequence[str]) -> np.ndarray:
        bad = ~np.isfinite(values)
        if bad.any():
            first = int(np.argmax(bad))
            _record_error(self.name, ValueError(f"returned non-finite value {values[first]}"),
                          responses[first], count=int(bad.sum()))
            values = np.where(bad, 0.0, values)
        return values.astype(np.float32)

    def _per_sample(self, responses: Sequence[str], answers: Sequence[Any], fields: Mapping[str, Any]) -> np.ndarray:
        n = len(responses)
        out = np.zeros(n, dtype=np.float32)
        for i in range(n):
            try:
                value = _as_values(self.fn([responses[i]], [answers[i]], **_slice_fields(fields, i, n)), 1)
                if value is None:
                    raise ValueError("did not return one number for a batch of 1 response")
            except Exception as exc:  # noqa: BLE001 - rewards must never take down a training step
                _record_error(self.name, exc, responses[i])
                continue
            out[i] = self._finite(value, responses[i:i + 1])[0]
        return out


class EasyR1Adapter:
    """`compute_score(predict, ground_truth)` (EasyR1's per-sample reward) as a batch reward: called
    once per response; a number is the score, a dict gives its `"overall"` entry."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "compute_score")

    def __call__(self, responses: Sequence[str], answers: Sequence[Any], **fields: Any) -> list[float]:
        out = []
        for predict, ground_truth in zip(responses, answers):
            score = self.fn(predict, ground_truth)
            if isinstance(score, Mapping):
                if "overall" not in score:
                    raise ValueError(f"compute_score returned a dict without 'overall': {_truncate(score)}")
                score = score["overall"]
            out.append(float(score))
        return out


def display_name(name: str) -> str:
    """The readable part of a reward name for metric keys: the function name of a user reward
    (`path/to/file.py:flaky` -> `flaky`), the name itself for a builtin."""
    m = _USER_SPEC.fullmatch(name)
    return m["fn"] if m and name not in _BUILTINS else name


def check_reward(name: str, example: Mapping[str, Any]) -> None:
    """Call user reward `name` once on `example` (a schema row: its answer, boxed, as the response)
    without the never-raise guard; raise ValueError (chained to the user's exception, whose
    traceback it carries) when it raises or returns something other than one number per response.
    Builtins are not checked."""
    fn = get(name)
    if not isinstance(fn, UserReward):
        return
    answer = str(example.get("answer", ""))
    responses = [f"<think>check</think> \\boxed{{{answer}}}"]
    fields = {"answer_type": [example.get("answer_type", "")], "task": [example.get("task", "")],
              "response_lengths": np.asarray([len(responses[0])]), "max_response_length": 128,
              "overlong_buffer": 0}
    try:
        out = fn.fn(responses, [answer], **fields)
    except Exception as exc:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        hint = ("; for a per-sample compute_score(predict, ground_truth) use the reward name "
                f"'{EASYR1_PREFIX}{name}'" if not name.startswith(EASYR1_PREFIX) else "")
        err = ValueError(f"reward {name!r} failed on a start-up check with one example "
                         f"(the signature is fn(responses, answers, **fields)){hint}: "
                         f"{type(exc).__name__}: {exc}")
        err.details = tb  # type: ignore[attr-defined]
        raise err from exc
    if _as_values(out, 1) is None:
        raise ValueError(f"reward {name!r} returned {_truncate(out)} for a batch of 1 response; expected "
                         f"a list or array of 1 number (fn(responses, answers, **fields))")


def load_user_reward(spec: str) -> UserReward:
    """Import `path/to/file.py` (relative to the working directory) and wrap its `function`
    (`easyr1:path/to/file.py:compute_score` wraps a per-sample EasyR1 `compute_score`).
    Raises ValueError naming the file or function if either is missing or the import fails."""
    m = _USER_SPEC.fullmatch(spec)
    if m is None:
        raise ValueError(f"reward {spec!r}: expected 'path/to/file.py:function'")
    path = Path(m["path"]).expanduser()
    if not path.is_file():
        raise ValueError(f"reward {spec!r}: file {str(path)!r} not found (cwd {str(Path.cwd())!r})")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"vlm_jax_user_reward_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward {spec!r}: cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses/pickle in the user file look their module up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ValueError(f"reward {spec!r}: importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, m["fn"], None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"reward {spec!r}: {str(path)!r} has no function {m['fn']!r}; callables there: {found}")
    return UserReward(spec, EasyR1Adapter(fn) if m["style"] else fn)


_BUILTINS: dict[str, _Reward] = {
    **{name: SampleReward(name, grader) for name, grader in SAMPLE_GRADERS.items()},
    "auto": AutoReward(),
    "overlong": OverlongReward(),
}
BUILTIN_NAMES: tuple[str, ...] = tuple(sorted(_BUILTINS))
_user_rewards: dict[str, UserReward] = {}


def get(name: str) -> RewardFn:
    """The batch reward `fn(responses, answers, **fields) -> np.ndarray` (float32, one per response)
    for a builtin name (`BUILTIN_NAMES`) or `path/to/file.py:function` (imported on the first `get`
    of that name, so a missing file or function fails here; later calls reuse it). Raises ValueError
    for an unknown name, listing the valid ones."""
    if not isinstance(name, str):
        raise ValueError(f"reward name must be a string, got {name!r}")
    if name in _BUILTINS:
        return _BUILTINS[name]
    if _USER_SPEC.fullmatch(name):
        if name not in _user_rewards:  # import each user file once per process
            _user_rewards[name] = load_user_reward(name)
        return _user_rewards[name]
    raise ValueError(f"unknown reward {name!r}; valid builtins: {list(BUILTIN_NAMES)}, "
                     f"or a user reward 'path/to/file.py:function'")


def grade(name: str, response: str, answer: Any) -> float:
    """Score one response with a reward (for evaluation); same graders as training, never raises on
    model output. `overlong` needs batch fields and is rejected; `auto` without a type grades `math`."""
    if name == "overlong":
        raise ValueError("grade: reward 'overlong' needs response lengths; call get('overlong') on a batch")
    return float(get(name)([response], [answer])[0])
