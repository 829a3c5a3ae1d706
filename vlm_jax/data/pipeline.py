"""grain input pipeline: schema rows -> prompts (or SFT sequences) -> shape-bucketed batches.

``make_dataset(sources, processor, batch_size=..., ...)`` returns a ``BatchIterator`` (a
``grain.DatasetIterator``) yielding one dict per batch. Array keys (numpy):

=====================  ===========  =====================================================
key                    shape/dtype  meaning
=====================  ===========  =====================================================
``input_ids``          [B, L] i32   L = smallest ``length_buckets`` entry >= longest row;
                                    LEFT padded for prompts, RIGHT padded for SFT
``attention_mask``     [B, L] i32   1 on real tokens
``mm_token_type_ids``  [B, L] i32   1 on ``<|image_pad|>`` tokens
``loss_mask``          [B, L] i32   SFT only (``target_field`` set): 1 on target tokens
                                    and their closing ``<|im_end|>``, 0 elsewhere
``row_mask``           [B] i32      0 for padding rows of a final partial batch
``pixel_values``       [P, D] f32   all images of the batch, row by row, zero padded to
                                    P = patch bucket (power of two >= 64, capped by
                                    ``max_pixels_per_batch``); D = 1176 for Qwen2.5-VL
``pixel_mask``         [P] i32      1 on real patches
``num_patches``        [] i32       number of real patches
``image_grid_thw``     [I, 3] i32   (t, h, w) per image, zero rows as padding;
                                    I = power of two >= max(1, images in batch)
``num_images``         [] i32       number of real images
=====================  ===========  =====================================================

Host keys (python lists of length B): ``index`` (row index in its source; -1 for padding
rows), ``source`` (position in ``sources``), ``problem``, ``answer``, ``task``,
``answer_type``, ``capability``, ``caption``, ``solution``.

Prompt: the chat template with the user message = the problem's images as
``{"type": "image"}`` items in place of each ``<image>`` placeholder, its text, then
``REASONING_INSTRUCTION``; ``add_generation_prompt=True``. With ``text_only=True`` (the
caption filter) an image row's images are replaced by ``CAPTION_TEMPLATE`` of its caption
(one row's encoding: ``vlm_jax.data.rows``).

Order (per source, before sharding): ``"shuffle"`` (grain's seeded global shuffle, a new
permutation each epoch) or ``"easy_to_hard"``: within each capability, rows sorted by
descending ``pass_rate`` or ascending ``difficulty`` (unknown values, -1, last), each
capability keeping the positions its rows had in the source, same order every epoch.
``"paced"`` (a competence curriculum, Platanios et al. 2019): draw ``k`` of a source's first
``pace_rows`` comes, uniformly and seeded, from the easiest ``competence(k)`` share of its rows
(``sqrt(start^2 + (1 - start^2) k / pace_rows)``, from ``pace_start`` to 1; rows sorted as
``easy_to_hard`` over the whole source, ties in a seeded random order), so hard rows enter the mix
gradually instead of after all easy ones; after ``pace_rows`` draws, seeded shuffled epochs of
every row.
Sharding: process ``k`` of ``n`` takes rows ``k, k+n, k+2n, ...`` of that order (disjoint
and covering). Several sources are mixed by weight with ``grain.MapDataset.mix`` (a finite
mixture ends when its first source runs out).

Unusable rows (prompt over ``max_prompt_len``, SFT sequence over the largest bucket, images
over the per-row pixel budget ``max_pixels_per_batch // batch_size``, undecodable image,
placeholder / image-token mismatch, missing caption or target) are skipped and counted by
reason in ``iterator.stats``, or raise ``BadRowError`` naming the source and row when
``strict``. No wait is endless: when a whole pass over the data (every row of every source,
by weight) yields no usable row, ``next`` raises ``NoUsableRowsError`` with the counts per
reason; ``stop_check`` (e.g. "SIGTERM received") is polled between rows and raises
``StopRequested``. ``get_state()`` / ``set_state()`` (JSON-serialisable, counters included)
resume at the next unseen row.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import grain
import numpy as np

from vlm_jax.data.prepare import BadRowError
from vlm_jax.data.rows import (HOST_KEYS, MIN_PATCH_BUCKET, REASONING_INSTRUCTION, SKIP_HINTS, SKIP_REASONS,
                               RowCache, TARGET_FIELDS, Example, RowSpec, Skipped, encode_row)


class NoUsableRowsError(RuntimeError):
    """A whole pass over the data gave no usable row: the iterator can never fill a batch."""


class StopRequested(Exception):
    """``stop_check`` returned True while the iterator was waiting for rows (e.g. SIGTERM)."""


_waiting = [0]  # BatchIterator.__next__ calls in progress (main thread)


@contextlib.contextmanager
def interrupt_data_waits(signals: Sequence[int] = (signal.SIGTERM,)):
    """While active, a signal that arrives while a ``BatchIterator`` waits for rows (a slow read, a
    source that stalls) raises ``StopRequested`` out of that wait, after the handler installed before
    (e.g. ``PreemptionGuard``'s, which records the stop) has run. Elsewhere the signal is handled as
    before. Main thread only."""
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum, frame):
        prev = previous[signal.Signals(signum)]
        if callable(prev):
            prev(signum, frame)
        if _waiting[0] > 0:
            raise StopRequested(f"{signal.Signals(signum).name} while waiting for data")

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)


def describe_skips(skipped: Mapping[str, int]) -> str:
    """'prompt_too_long 12, missing_target 3' for the non-zero counts, most frequent first ('none')."""
    items = sorted(((n, r) for r, n in skipped.items() if n), key=lambda t: (-t[0], t[1]))
    return ", ".join(f"{r} {n}" for n, r in items) or "none"


# --------------------------------------------------------------------------- batching


def bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest entry of ``buckets`` (ascending) that is >= ``n``."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def pow2_bucket(n: int, minimum: int = 1, cap: int | None = None) -> int:
    """``max(minimum, next power of two >= n)``, limited to ``cap`` (callers keep n <= cap)."""
    b = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    return b if cap is None else min(b, cap)


def collate(
    examples: Sequence[Example],
    *,
    batch_size: int,
    length_buckets: Sequence[int],
    pad_token_id: int,
    padding_side: Literal["left", "right"],
    patch_cap: int | None,
    patch_dim: int,
) -> dict[str, Any]:
    """Pad examples into one batch dict (see the module docstring); pads B with copies of the last row."""
    n_real = len(examples)
    rows = list(examples) + [examples[-1]] * (batch_size - n_real)
    length = bucket(max(len(e.input_ids) for e in rows), length_buckets)
    ids = np.full((batch_size, length), pad_token_id, np.int32)
    attn, mm, loss = (np.zeros((batch_size, length), np.int32) for _ in range(3))
    for i, e in enumerate(rows):
        n = len(e.input_ids)
        sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
        ids[i, sl], attn[i, sl], mm[i, sl] = e.input_ids, 1, e.mm_token_type_ids
        if e.loss_mask is not None:
            loss[i, sl] = e.loss_mask
    pixels = np.concatenate([e.pixel_values.reshape(-1, patch_dim) for e in rows])
    grids = np.concatenate([e.image_grid_thw.reshape(-1, 3) for e in rows])
    n_patches, n_images = len(pixels), len(grids)
    p_bucket = pow2_bucket(n_patches, MIN_PATCH_BUCKET, patch_cap)
    i_bucket = pow2_bucket(n_images)
    batch: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": attn,
        "mm_token_type_ids": mm,
        "row_mask": (np.arange(batch_size) < n_real).astype(np.int32),
        "pixel_values": np.concatenate([pixels, np.zeros((p_bucket - n_patches, patch_dim), np.float32)]),
        "pixel_mask": (np.arange(p_bucket) < n_patches).astype(np.int32),
        "num_patches": np.asarray(n_patches, np.int32),
        "image_grid_thw": np.concatenate([grids, np.zeros((i_bucket - n_images, 3), np.int32)]),
        "num_images": np.asarray(n_images, np.int32),
    }
    if padding_side == "right":
        batch["loss_mask"] = loss
    for key in HOST_KEYS:
        batch[key] = [e.host[key] for e in rows]
    batch["index"] = [e.host["index"] if i < n_real else -1 for i, e in enumerate(rows)]
    return batch


class BatchIterator(grain.DatasetIterator):
    """Groups encoded rows into batches, counting (or raising on) skipped rows.

    ``stats`` holds rows, batches and skips by reason; ``get_state()`` returns the grain
    element iterator's state plus these counters, so a restored iterator continues at
    the next unseen row with the same counts.
    """

    def __init__(self, parent: grain.DatasetIterator, *, batch_size: int, strict: bool, drop_remainder: bool,
                 source_names: Sequence[str], collate_kwargs: Mapping[str, Any],
                 pass_rows: int | None = None, stop_check: Callable[[], bool] | None = None):
        super().__init__(parent)
        self._batch_size = batch_size
        self._strict = strict
        self._drop_remainder = drop_remainder
        self._source_names = list(source_names)
        self._collate_kwargs = dict(collate_kwargs)
        self._counters = _new_stats()
        # Consecutive skipped rows after which no usable row can come (a whole pass, see make_dataset).
        self._pass_rows = pass_rows
        self._stop_check = stop_check
        self._run_of_skips = 0
        self._last_skip: Skipped | None = None

    @property
    def stats(self) -> dict[str, Any]:
        """A copy of the counters: ``rows``, ``batches``, ``skipped`` (reason -> count)."""
        return {**self._counters, "skipped": dict(self._counters["skipped"])}

    def __next__(self) -> dict[str, Any]:
        _waiting[0] += 1
        try:
            return self._next()
        finally:
            _waiting[0] -= 1

    def _next(self) -> dict[str, Any]:
        examples: list[Example] = []
        while len(examples) < self._batch_size:
            if self._stop_check is not None and self._stop_check():
                raise StopRequested("stop requested while waiting for data")
            try:
                item = next(self._parent)
            except StopIteration:
                if examples and not self._drop_remainder:
                    break
                raise
            if isinstance(item, Skipped):
                self._skip(item)
                self._run_of_skips += 1
                self._last_skip = item
                if self._pass_rows is not None and self._run_of_skips >= self._pass_rows:
                    raise NoUsableRowsError(self._no_rows_message())
            else:
                self._run_of_skips = 0
                examples.append(item)
        self._counters["rows"] += len(examples)
        self._counters["batches"] += 1
        return collate(examples, batch_size=self._batch_size, **self._collate_kwargs)

    def _skip(self, item: Skipped) -> None:
        if self._strict:
            detail = f" ({item.detail})" if item.detail else ""
            raise BadRowError(f"{self._source_names[item.source]}: row {item.index}: {item.reason}{detail}")
        self._counters["skipped"][item.reason] = self._counters["skipped"].get(item.reason, 0) + 1

    def close(self) -> None:
        """Stops the prefetch threads (a closed iterator cannot be used again)."""
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()

    def _no_rows_message(self) -> str:
        names = ", ".join(self._source_names)
        skipped = self._counters["skipped"]
        top = max(skipped, key=lambda r: skipped[r])
        last = self._last_skip
        example = ""
        if last is not None:
            detail = f" ({last.detail})" if last.detail else ""
            example = f"; e.g. {self._source_names[last.source]} row {last.index}: {last.reason}{detail}"
        hint = f"; fix: {SKIP_HINTS[top]}" if top in SKIP_HINTS else ""
        return (f"{names}: no usable row in {self._run_of_skips} consecutive rows (a whole pass over the "
                f"data), so no batch can be made; skipped so far: {describe_skips(skipped)}{example}{hint}")

    def get_state(self) -> dict[str, Any]:
        return {"elements": self._parent.get_state(), "stats": self.stats}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["elements"])
        stats = state["stats"]
        self._counters = {"rows": int(stats["rows"]), "batches": int(stats["batches"]),
                       "skipped": {k: int(v) for k, v in stats["skipped"].items()}}


def _new_stats() -> dict[str, Any]:
    return {"rows": 0, "batches": 0, "skipped": dict.fromkeys(SKIP_REASONS, 0)}


# --------------------------------------------------------------------------- ordering


def easy_to_hard_order(keys: Sequence[float], capabilities: Sequence[str], order_key: str) -> np.ndarray:
    """Permutation of row indices: easy first within each capability, capability slots kept.

    ``pass_rate``: descending; ``difficulty``: ascending; unknown (negative) values go last.
    Ties keep source order. The rows of capability c are placed, sorted, at the
    positions c's rows already held, so the capability mix along the order is unchanged.
    """
    if order_key not in ("pass_rate", "difficulty"):
        raise ValueError(f"order_key must be 'pass_rate' or 'difficulty', got {order_key!r}")
    keys_arr = np.asarray(keys, np.float64)
    caps = np.asarray(capabilities, dtype=object)
    perm = np.arange(len(keys_arr))
    for cap in dict.fromkeys(caps.tolist()):
        slots = np.flatnonzero(caps == cap)
        perm[slots] = slots[_easy_first(keys_arr[slots], order_key, tie=slots)]
    return perm


def _easy_first(keys: np.ndarray, order_key: str, tie: np.ndarray) -> np.ndarray:
    """Indices into ``keys``, easiest first: ``pass_rate`` descending or ``difficulty`` ascending,
    unknown (negative) values last, equal keys in ascending ``tie`` order."""
    sort_value = -keys if order_key == "pass_rate" else keys
    return np.lexsort((tie, sort_value, keys < 0))


def competence(k: np.ndarray | int, pace_rows: int, start: float) -> np.ndarray:
    """The share of a source's rows, easiest first, that paced draw ``k`` comes from."""
    grown = start**2 + (1.0 - start**2) * np.asarray(k, np.float64) / max(pace_rows, 1)
    return np.minimum(1.0, np.sqrt(grown))


def paced_index(k: int, ranked: np.ndarray, *, pace_rows: int, start: float, seed: int) -> int:
    """The source row of draw ``k`` of a paced order over ``ranked`` (row indices, easiest first):
    during the first ``pace_rows`` draws a seeded uniform pick among the easiest
    ``ceil(competence(k) * n)`` rows; afterwards position ``k - pace_rows`` of seeded shuffled
    epochs of every row."""
    n = len(ranked)
    if k < pace_rows:
        pool = max(1, math.ceil(float(competence(k, pace_rows, start)) * n - 1e-9))
        return int(ranked[np.random.default_rng([seed, 1, k]).integers(pool)])
    epoch, position = divmod(k - pace_rows, n)
    return int(_epoch_permutation(seed, epoch, n)[position])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 2, epoch]).permutation(n)


def rank_easy_to_hard(keys: Sequence[float], order_key: str, seed: int) -> np.ndarray:
    """Row indices easiest first by ``order_key`` (unknown values last), ties in a seeded random
    order (so a pool of equally easy rows is not the file's first rows)."""
    keys_arr = np.asarray(keys, np.float64)
    return _easy_first(keys_arr, order_key, tie=np.random.default_rng([seed, 3]).permutation(len(keys_arr)))


def _ordered_source(source: Any, source_id: int, *, order: str, order_key: str, seed: int,
                    shard_index: int, shard_count: int, num_epochs: int | None, pace_rows: int,
                    pace_start: float) -> grain.MapDataset:
    n = len(source)
    if n == 0:
        raise ValueError(f"source {source_id} ({getattr(source, 'name', source)!r}) is empty")
    if order == "paced":  # global draw positions, sharded like the other orders; epochs after the pacing
        seed = (seed + 1_000_003 * source_id) % 2**32
        ranked = rank_easy_to_hard([source[i][order_key] for i in range(n)], order_key, seed)
        epochs = 10**9 // n if num_epochs is None else num_epochs
        ds = grain.MapDataset.range(pace_rows + n * epochs)[shard_index::shard_count]

        return ds.map(lambda k: (source_id, paced_index(int(k), ranked, pace_rows=pace_rows, start=pace_start,
                                                         seed=seed)))
    if order == "easy_to_hard":
        rows = [source[i] for i in range(n)]
        perm = easy_to_hard_order([r[order_key] for r in rows], [r["capability"] for r in rows], order_key)
        ds = grain.MapDataset.source(perm.tolist())
    else:
        ds = grain.MapDataset.range(n)
    ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"source {source_id} ({getattr(source, 'name', source)!r}) has {n} rows, fewer than "
                         f"shard_count={shard_count} (data shards)")
    if order == "shuffle":
        ds = ds.shuffle(seed=(seed + 1_000_003 * source_id) % 2**32)
    ds = ds.repeat(num_epochs)
    return ds.map(lambda i: (source_id, int(i)))


# --------------------------------------------------------------------------- entry point


def make_dataset(
    sources: Sequence[tuple[Any, float]],
    processor: Any,
    *,
    batch_size: int,
    seed: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    order: Literal["shuffle", "easy_to_hard", "paced"] = "shuffle",
    order_key: Literal["pass_rate", "difficulty"] = "pass_rate",
    pace_rows: int = 0,
    pace_start: float = 0.25,
    prompt_field: str = "problem",
    target_field: Literal["solution", "answer", "caption"] | None = None,
    length_buckets: Sequence[int] = (64, 128, 256, 512),
    max_prompt_len: int | None = None,
    max_pixels_per_batch: int | None = None,
    num_epochs: int | None = None,
    strict: bool = False,
    text_only: bool = False,
    instruction: str = REASONING_INSTRUCTION,
    system_prompt: str | None = None,
    drop_remainder: bool = False,
    num_threads: int = 2,
    prefetch_buffer_size: int = 16,
    row_cache: int | RowCache = 0,
    stop_check: Callable[[], bool] | None = None,
) -> BatchIterator:
    """Batches from weighted ``sources`` (each ``len`` + ``[i]`` -> schema dict); see the module doc.

    ``shard_index`` / ``shard_count`` default to ``jax.process_index()`` /
    ``jax.process_count()``. ``num_epochs=None`` repeats forever. ``max_prompt_len``
    defaults to the largest length bucket. A final partial batch (finite epochs) is
    padded to ``batch_size`` with ``row_mask`` 0 unless ``drop_remainder``. ``stop_check``
    is called between rows; when it returns True ``next`` raises ``StopRequested``.
    ``order="paced"``: ``pace_rows`` rows of the mixture (all shards) are drawn while the pool
    grows from the easiest ``pace_start`` share of each source to all of it (each source paced
    over its weight's share of them). ``row_cache``: bytes of encoded rows to keep in memory, or a ``RowCache``
    shared with other iterators over the same sources, so a row that comes again is not encoded again.
    """
    if shard_index is None or shard_count is None:
        import jax  # noqa: PLC0415 - only for the defaults

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    buckets = tuple(sorted(int(b) for b in length_buckets))
    max_prompt_len = buckets[-1] if max_prompt_len is None else int(max_prompt_len)
    _check_args(sources, batch_size, shard_index, shard_count, order, order_key, target_field, buckets,
                max_prompt_len, max_pixels_per_batch, num_epochs, pace_rows, pace_start)
    patch = int(processor.image_processor.patch_size)
    merge = int(processor.image_processor.merge_size)
    patch_cap = None
    if max_pixels_per_batch is not None:
        patch_cap = max_pixels_per_batch // (patch * patch) // merge**2 * merge**2
    spec = row_spec(batch_size=batch_size, prompt_field=prompt_field, target_field=target_field,
                    length_buckets=buckets, max_prompt_len=max_prompt_len,
                    max_pixels_per_batch=max_pixels_per_batch, text_only=text_only, instruction=instruction,
                    system_prompt=system_prompt)
    total_weight = sum(float(w) for _, w in sources)
    parts = [_ordered_source(src, k, order=order, order_key=order_key, seed=seed, shard_index=shard_index,
                             shard_count=shard_count, num_epochs=num_epochs,
                             pace_rows=math.ceil(pace_rows * float(w) / total_weight), pace_start=pace_start)
             for k, (src, w) in enumerate(sources)]
    # A whole pass: enough consecutive draws that every row of every source came at least once (twice
    # the longest source's share of the mixture, so a window spanning two shuffled epochs is covered).
    # Finite epochs end with StopIteration on their own.
    epoch_rows = [len(range(shard_index, len(src), shard_count)) for src, _ in sources]
    pass_rows = None if num_epochs is not None else 2 * max(
        math.ceil(n * total_weight / float(w)) for n, (_, w) in zip(epoch_rows, sources)) + 1
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [float(w) for _, w in sources])
    cache = row_cache if isinstance(row_cache, RowCache) else RowCache(row_cache)
    cache.bind(spec)

    def encode(item: tuple[int, int]) -> Example | Skipped:
        k, i = item
        return cache.get(k, i, lambda: encode_row(sources[k][0][i], processor, spec, source=k, index=i))

    encoded = mixed.map(encode)
    elements = encoded.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                         prefetch_buffer_size=prefetch_buffer_size))
    names = [str(getattr(src, "name", f"source {k}")) for k, (src, _) in enumerate(sources)]
    patch_dim = 3 * int(processor.image_processor.temporal_patch_size) * patch * patch
    batches = BatchIterator(
        iter(elements), batch_size=batch_size, strict=strict, drop_remainder=drop_remainder, source_names=names,
        collate_kwargs={"length_buckets": buckets, "pad_token_id": int(processor.pad_token_id),
                        "padding_side": "left" if target_field is None else "right",
                        "patch_cap": patch_cap, "patch_dim": patch_dim},
        pass_rows=pass_rows, stop_check=stop_check,
    )
    batches.row_cache = cache
    return batches


def row_spec(
    *,
    batch_size: int,
    prompt_field: str = "problem",
    target_field: str | None = None,
    length_buckets: Sequence[int] = (64, 128, 256, 512),
    max_prompt_len: int | None = None,
    max_pixels_per_batch: int | None = None,
    text_only: bool = False,
    instruction: str = REASONING_INSTRUCTION,
    system_prompt: str | None = None,
) -> RowSpec:
    """The ``RowSpec`` ``make_dataset`` encodes rows with, for the same arguments (shared with the
    preflight check, ``vlm_jax.data.check``, so it skips exactly what training would)."""
    buckets = sorted(int(b) for b in length_buckets)
    return RowSpec(prompt_field=prompt_field, target_field=target_field, instruction=instruction,
                   system_prompt=system_prompt, text_only=text_only,
                   max_prompt_len=buckets[-1] if max_prompt_len is None else int(max_prompt_len),
                   max_len=buckets[-1],
                   max_row_pixels=None if max_pixels_per_batch is None else max_pixels_per_batch // batch_size)


def _check_args(sources: Sequence[tuple[Any, float]], batch_size: int, shard_index: int, shard_count: int,
                order: str, order_key: str, target_field: str | None, buckets: tuple[int, ...],
                max_prompt_len: int, max_pixels_per_batch: int | None, num_epochs: int | None,
                pace_rows: int, pace_start: float) -> None:
    """Raise ``ValueError`` naming the first bad argument."""
    if not sources:
        raise ValueError("sources is empty: give at least one (source, weight) pair")
    for k, item in enumerate(sources):
        if not (isinstance(item, tuple) and len(item) == 2) or not float(item[1]) > 0:
            raise ValueError(f"sources[{k}] must be a (source, weight > 0) pair, got {item!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}")
    if order not in ("shuffle", "easy_to_hard", "paced"):
        raise ValueError(f"order must be 'shuffle', 'easy_to_hard' or 'paced', got {order!r}")
    if order == "paced" and (pace_rows < 1 or not 0 < pace_start <= 1):
        raise ValueError(f"order='paced' needs pace_rows >= 1 and 0 < pace_start <= 1, got {pace_rows} and {pace_start}")
    if order_key not in ("pass_rate", "difficulty"):
        raise ValueError(f"order_key must be 'pass_rate' or 'difficulty', got {order_key!r}")
    if target_field is not None and target_field not in TARGET_FIELDS:
        raise ValueError(f"target_field must be one of {TARGET_FIELDS} or None, got {target_field!r}")
    if not buckets or buckets[0] < 1:
        raise ValueError(f"length_buckets must be positive, got {buckets}")
    if not 0 < max_prompt_len <= buckets[-1]:
        raise ValueError(f"max_prompt_len must be in [1, {buckets[-1]}] (largest length bucket), got {max_prompt_len}")
    if max_pixels_per_batch is not None and max_pixels_per_batch < batch_size:
        raise ValueError(f"max_pixels_per_batch={max_pixels_per_batch} is below batch_size={batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
