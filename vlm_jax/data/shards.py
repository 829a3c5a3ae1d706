"""Each process reads only its own data shards; a training batch is every shard's rows, in order.

A stage's data is split into `shard_count` shards (``make_dataset``'s ``shard_index`` /
``shard_count``: shard k holds rows k, k+S, k+2S, ... of each source's order). Every batch of B
rows is shard 0's next B/S usable rows, then shard 1's, and so on; process p of P reads shards
p*S/P .. (p+1)*S/P - 1 and nothing else, so no host decodes another process's rows or images.
The global batch therefore depends on S and on the data only, not on the process count: a run on
one process reading S shards equals a run on S processes reading one each (and a checkpoint
resumes on any process count that divides S).

``ShardedBatches`` is the iterator the curriculum uses: ``next`` gives this process's rows (its
shards' batches joined, padded to the length every process agrees on; host key ``shard`` says which
of this process's shards a row came from), ``stats`` / ``get_state`` cover every shard of every
process (collectives: every process calls them at the same points).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from vlm_jax import sharding
from vlm_jax.data.pipeline import MIN_PATCH_BUCKET, BatchIterator, pow2_bucket

TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "loss_mask")


class ShardCountError(ValueError):
    """A saved data position was written with another number of data shards."""


def pad_to_length(batch: Mapping[str, Any], length: int, padding_side: Literal["left", "right"],
                  pad_token_id: int) -> dict[str, Any]:
    """`batch` with its token arrays padded to `length` on `padding_side` (rows unchanged)."""
    out = dict(batch)
    for key in TOKEN_KEYS:
        if key not in batch:
            continue
        a = np.asarray(batch[key])
        extra = length - a.shape[1]
        if extra < 0:
            raise ValueError(f"{key} has length {a.shape[1]}, over {length}")
        width = ((0, 0), (extra, 0) if padding_side == "left" else (0, extra))
        out[key] = np.pad(a, width, constant_values=pad_token_id if key == "input_ids" else 0)
    return out


def join_batches(batches: Sequence[Mapping[str, Any]], *, length: int, padding_side: Literal["left", "right"],
                 pad_token_id: int) -> dict[str, Any]:
    """Pipeline batches (``make_dataset``'s format) joined row-wise into one, token arrays padded to
    `length`, images in row order; host key ``shard`` = the position of each row's batch in `batches`."""
    parts = [pad_to_length(b, length, padding_side, pad_token_id) for b in batches]
    if len(parts) == 1:
        return {**parts[0], "shard": [0] * len(parts[0]["input_ids"])}
    out: dict[str, Any] = {k: np.concatenate([p[k] for p in parts]) for k in (*TOKEN_KEYS, "row_mask")
                           if k in parts[0]}
    pixels = np.concatenate([p["pixel_values"][: int(p["num_patches"])] for p in parts])
    grids = np.concatenate([p["image_grid_thw"][: int(p["num_images"])] for p in parts])
    p_bucket, i_bucket = pow2_bucket(len(pixels), MIN_PATCH_BUCKET), pow2_bucket(len(grids))
    out.update(
        pixel_values=np.pad(pixels, ((0, p_bucket - len(pixels)), (0, 0))),
        pixel_mask=(np.arange(p_bucket) < len(pixels)).astype(np.int32),
        num_patches=np.asarray(len(pixels), np.int32),
        image_grid_thw=np.pad(grids, ((0, i_bucket - len(grids)), (0, 0))).astype(np.int32),
        num_images=np.asarray(len(grids), np.int32),
    )
    host_keys = [k for k in parts[0] if isinstance(parts[0][k], list)]
    for key in host_keys:
        out[key] = [v for p in parts for v in p[key]]
    out["shard"] = [k for k, p in enumerate(parts) for _ in range(len(p["input_ids"]))]
    return out


class ShardedBatches:
    """This process's shards of a stage's data (see the module docstring).

    `make_shard(k)` builds shard k's ``BatchIterator`` (``make_dataset`` with ``shard_index=k``,
    ``shard_count=shard_count`` and B / S rows per batch)."""

    def __init__(self, make_shard: Callable[[int], BatchIterator], *, shard_count: int,
                 padding_side: Literal["left", "right"], pad_token_id: int):
        import jax

        count, me = jax.process_count(), jax.process_index()
        if shard_count < 1 or shard_count % count:
            raise ValueError(f"{shard_count} data shards do not split over {count} processes")
        per = shard_count // count
        self.shard_count = shard_count
        self.shard_ids = list(range(me * per, (me + 1) * per))
        self._padding_side, self._pad_token_id = padding_side, pad_token_id
        self._iterators: list[BatchIterator] = []
        try:
            for k in self.shard_ids:
                self._iterators.append(make_shard(k))
        except BaseException:
            self.close()
            raise

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        batches = [next(it) for it in self._iterators]
        (length,) = sharding.agree_max(max(b["input_ids"].shape[1] for b in batches))
        return join_batches(batches, length=length, padding_side=self._padding_side,
                            pad_token_id=self._pad_token_id)

    @property
    def stats(self) -> dict[str, Any]:
        """Rows, batches and skips by reason, summed over every shard of every process (a collective)."""
        mine = [it.stats for it in self._iterators]
        every = [s for per_process in sharding.gather_json(mine) for s in per_process]
        skipped: dict[str, int] = {}
        for s in every:
            for reason, n in s["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + int(n)
        return {"rows": sum(int(s["rows"]) for s in every), "batches": max(int(s["batches"]) for s in every),
                "skipped": skipped}

    def get_state(self) -> dict[str, Any]:
        """Every shard's position (a collective), to resume on any process count dividing the shards."""
        mine = [it.get_state() for it in self._iterators]
        states = [s for per_process in sharding.gather_json(mine) for s in per_process]
        return {"shard_count": self.shard_count, "shards": states}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "shards" not in state:  # written before data shards existed: one shard
            state = {"shard_count": 1, "shards": [state]}
        if int(state["shard_count"]) != self.shard_count:
            raise ShardCountError(
                f"the checkpoint's data position has {state['shard_count']} data shards, this run "
                f"{self.shard_count}; resume it with data.shards={state['shard_count']} (on a process count "
                f"that divides it)")
        for k, it in zip(self.shard_ids, self._iterators):
            it.set_state(state["shards"][k])

    def close(self) -> None:
        for it in self._iterators:
            it.close()
