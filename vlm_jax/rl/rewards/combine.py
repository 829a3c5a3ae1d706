"""Weighted combination of named rewards into one scalar per response, keeping each component."""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

import numpy as np

from vlm_jax.rl.rewards.registry import RewardFn, display_name, get

# Reward name (builtin or `path/to/file.py:function`) -> weight, as a mapping or (name, weight) pairs
# (the form the frozen run config stores).
RewardSpec = Union[Mapping[str, float], Sequence[tuple[str, float]]]

# The paper's reward: 0.9 * accuracy (boxed-math equivalence) + 0.1 * format.
DEFAULT_SPEC: Mapping[str, float] = MappingProxyType({"math": 0.9, "format": 0.1})


class CombinedReward:
    """`total = sum_k weight_k * reward_k(responses, answers, **fields)`; built by `build_reward`.

    Calling it returns `(total, components)`: `total` float32 of shape [N] and `components` mapping
    each reward name to its unweighted float32 values, for logging as `reward/<name>`.
    """

    def __init__(self, weights: Sequence[tuple[str, float]], fns: Sequence[RewardFn]):
        self.weights: tuple[tuple[str, float], ...] = tuple(weights)
        self.fns: tuple[RewardFn, ...] = tuple(fns)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.weights)

    @property
    def metric_names(self) -> dict[str, str]:
        """Reward name -> its readable metric name (`reward/<metric name>`): a user reward's function
        name (`dir/x.py:flaky` -> `flaky`), or `file_function` when two would read the same."""
        short = {name: display_name(name) for name in self.names}
        counts = collections.Counter(short.values())
        out = {}
        for name, s in short.items():
            if counts[s] > 1 and s != name:
                s = f"{Path(name.rsplit(':', 1)[0]).stem}_{s}"
            out[name] = s
        return out

    def __call__(self, responses: Sequence[str], answers: Sequence[Any],
                 **fields: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = len(responses)
        total = np.zeros(n, dtype=np.float64)
        components: dict[str, np.ndarray] = {}
        for (name, weight), fn in zip(self.weights, self.fns):
            values = np.asarray(fn(responses, answers, **fields), dtype=np.float32)
            if values.shape != (n,):
                raise ValueError(f"reward {name!r} returned shape {values.shape} for {n} responses")
            components[name] = values
            total += weight * values.astype(np.float64)
        return total.astype(np.float32), components

    def __repr__(self) -> str:
        return f"CombinedReward({dict(self.weights)!r})"


def build_reward(spec: RewardSpec = DEFAULT_SPEC) -> CombinedReward:
    """Resolve every reward in `spec` now (so a bad name or user file fails at start-up) and combine
    them with their weights. Weights must be finite real numbers (negative ones are penalties, zero
    logs a component without training on it); names must be unique and at least one given."""
    pairs = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
    if not pairs:
        raise ValueError("reward spec is empty; give at least one reward, e.g. {'math': 0.9, 'format': 0.1}")
    weights: list[tuple[str, float]] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"reward spec entry {i} must be a (name, weight) pair, got {pair!r}")
        name, weight = pair
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)) or not math.isfinite(weight):
            raise ValueError(f"reward spec: weight of {name!r} must be a finite number, got {weight!r}")
        if any(name == seen for seen, _ in weights):
            raise ValueError(f"reward spec: {name!r} given twice")
        weights.append((name, float(weight)))
    return CombinedReward(weights, [get(name) for name, _ in weights])
