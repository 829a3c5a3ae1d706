"""Preflight data check: what each stage's data would cost and skip, before anything compiles.

    python -m vlm_jax.data.check --config configs/NAME.py [--config.KEY=VALUE ...] [--rows N|all]

For every (stage, training dataset) of the config it encodes rows exactly as the training pipeline
does (`row_lib.encode_row` with the stage's `pipeline.row_spec`: chat template, the processor's
image resizing within the pixel bounds, ``<|image_pad|>`` expansion, length and pixel limits) and
reports: rows, image tokens per row after resizing (min / median / max), prompt tokens after
expansion (min / median / max), rows over ``max_prompt_len`` (SFT: also sequences over the largest
length bucket), rows with an image outside ``[min_pixels_per_image, max_pixels_per_image]`` before
resizing (resized, not skipped) or over the per-row pixel budget (skipped), placeholder / image
count mismatches, and the share of the stage's rows that would be skipped (rows a local file loses
when it is read count too). Exit status 0, or 2 with a one-line error naming the dataset and a few
row ids when a share is above ``data.preflight_max_skip_share`` (``--max_skip_share`` overrides),
or when any row would be skipped and ``data.strict`` is set (a strict run would stop at it).

`python -m vlm_jax.train` runs the same check at start-up (`preflight`, on ``data.preflight_rows``
rows per dataset spread evenly over it, -1 = all, 0 = off) and refuses to start the same way.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlm_jax.data import pipeline, schema
from vlm_jax.data import rows as row_lib

log = logging.getLogger(__name__)

CAPTION_INSTRUCTION = "Describe the image in detail."  # startup.CAPTION_INSTRUCTION (a test ties them)
SHOWN_ROWS = 5  # row ids named per reason in the refusal message
LIMIT_REASONS = (row_lib.PROMPT_TOO_LONG, row_lib.SEQUENCE_TOO_LONG, row_lib.TOO_MANY_PIXELS)
MISMATCH_REASONS = (schema.IMAGE_COUNT_MISMATCH, row_lib.IMAGE_TOKEN_MISMATCH)


@dataclasses.dataclass
class DatasetReport:
    """The check of one training dataset of one stage."""

    stage_index: int
    stage: str
    dataset: str
    rows: int  # rows of the dataset (for a local file: the file's rows, including those lost on load)
    checked: int  # rows encoded (all, or an even sample)
    image_tokens: list[int] = dataclasses.field(default_factory=list)  # per encoded row
    prompt_tokens: list[int] = dataclasses.field(default_factory=list)  # per encoded row
    out_of_bounds: list[int] = dataclasses.field(default_factory=list)  # row ids (resized)
    skipped: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # reason -> row ids
    loaded_skipped: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # lost on file read

    @property
    def num_skipped(self) -> int:
        return sum(map(len, self.skipped.values()))

    @property
    def skip_share(self) -> float:
        """Share of the dataset's rows that training would never see: the sampled share of the
        rows that load, plus the rows a local file loses when it is read."""
        lost = sum(map(len, self.loaded_skipped.values()))
        loaded = self.rows - lost
        sampled = self.num_skipped / self.checked if self.checked else 0.0
        return (lost + sampled * loaded) / self.rows if self.rows else 0.0

    def count(self, *reasons: str) -> int:
        return sum(len(self.skipped.get(r, ())) + len(self.loaded_skipped.get(r, ())) for r in reasons)

    def row_ids(self, limit: int = SHOWN_ROWS) -> str:
        """``reason: ids`` for every skip reason, at most `limit` ids each."""
        parts = []
        for reason, ids in sorted(_merge(self.skipped, self.loaded_skipped).items()):
            if ids:
                more = ", ..." if len(ids) > limit else ""
                parts.append(f"{reason} rows {', '.join(map(str, sorted(ids)[:limit]))}{more}")
        return "; ".join(parts)


def _merge(a: Mapping[str, list[int]], b: Mapping[str, list[int]]) -> dict[str, list[int]]:
    out = {k: list(v) for k, v in b.items()}
    for k, v in a.items():
        out.setdefault(k, []).extend(v)
    return out


# ------------------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------------------


def stage_pipeline_kwargs(cfg, index: int) -> dict[str, Any]:
    """The row-encoding arguments `curriculum.build_stage` passes to `make_dataset` for stage `index`."""
    st = cfg.stages[index]
    sft = st.objective == "sft"
    target = st.sft.target if sft else None
    return {
        "batch_size": st.batch_size,
        "target_field": target,
        "length_buckets": cfg.data.length_buckets,
        "max_prompt_len": cfg.data.max_prompt_len,
        "max_pixels_per_batch": cfg.data.max_pixels_per_image * st.batch_size,
        "text_only": sft and st.sft.caption_as_input,
        "instruction": CAPTION_INSTRUCTION if target == "caption" else row_lib.REASONING_INSTRUCTION,
    }


def sample_indices(n: int, rows: int) -> list[int]:
    """`rows` indices spread evenly over `range(n)` (all of them for rows < 0 or rows >= n)."""
    if rows < 0 or rows >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, rows).round().astype(int).tolist()))


def check_dataset(source, processor, spec: row_lib.RowSpec, *, data_cfg, rows: int = -1,
                  stage_index: int = 0, stage: str = "", dataset: str | None = None) -> DatasetReport:
    """Encodes `rows` rows of `source` (-1: all) as the pipeline would and reports them."""
    report_on_load = getattr(source, "report", None)
    loaded_skipped = {k: list(v) for k, v in report_on_load.skipped.items()} if report_on_load else {}
    file_rows = _file_row_numbers(source) if report_on_load is not None else None
    n = len(source)
    lost = sum(map(len, loaded_skipped.values()))
    indices = sample_indices(n, rows)
    report = DatasetReport(stage_index, stage, dataset or str(getattr(source, "name", "source")),
                           rows=n + lost, checked=len(indices), loaded_skipped=loaded_skipped)
    relaxed = dataclasses.replace(spec, max_prompt_len=1 << 30, max_len=1 << 30, max_row_pixels=None)
    for i in indices:
        row = source[i]
        row_id = file_rows[i] if file_rows is not None else i
        if _any_image_out_of_bounds(row, data_cfg):
            report.out_of_bounds.append(row_id)
        out = row_lib.encode_row(row, processor, spec, source=0, index=i)
        if isinstance(out, row_lib.Skipped):
            report.skipped.setdefault(out.reason, []).append(row_id)
            if out.reason not in LIMIT_REASONS:
                continue
            out = row_lib.encode_row(row, processor, relaxed, source=0, index=i)  # its sizes
            if isinstance(out, row_lib.Skipped):
                continue
        report.image_tokens.append(int(out.mm_token_type_ids.sum()))
        prompt = out.input_ids if out.loss_mask is None else out.input_ids[out.loss_mask == 0]
        report.prompt_tokens.append(len(prompt))
    return report


def _any_image_out_of_bounds(row: Mapping[str, Any], data_cfg) -> bool:
    from PIL import Image

    for data in row.get("images", []):
        try:
            with Image.open(io.BytesIO(data)) as img:
                pixels = img.size[0] * img.size[1]
        except Exception:  # noqa: BLE001 - undecodable: the encoder reports it
            continue
        if not data_cfg.min_pixels_per_image <= pixels <= data_cfg.max_pixels_per_image:
            return True
    return False


def _file_row_numbers(source) -> list[int] | None:
    """Row numbers in the input file of a local-file source's rows (it drops bad rows on load)."""
    from vlm_jax.data.prepare import iter_raw_rows

    lost = {i for ids in source.report.skipped.values() for i in ids}
    try:
        numbers = [i for i, _ in iter_raw_rows(source.report.source) if i not in lost]
    except (OSError, ValueError):
        return None
    return numbers if len(numbers) == len(source) else None


def check_config(cfg, *, sources: Mapping | None = None, processor=None, rows: int | None = None
                 ) -> list[DatasetReport]:
    """One report per (stage, training dataset) of `cfg`; `rows` defaults to data.preflight_rows."""
    from vlm_jax.data.processor import Processor

    if sources is None:
        sources = _open_sources(cfg)
    if processor is None:
        processor = Processor.from_pretrained(cfg.model.path)
        ip = processor.image_processor  # as startup.configure_processor
        ip.size = type(ip.size)(shortest_edge=cfg.data.min_pixels_per_image,
                                longest_edge=cfg.data.max_pixels_per_image)
    rows = cfg.data.preflight_rows if rows is None else rows
    reports = []
    for index, st in enumerate(cfg.stages):
        spec = pipeline.row_spec(**stage_pipeline_kwargs(cfg, index))
        for ds in st.datasets:
            name = ds.name if ds.is_file else f"{ds.name}[{ds.split}]"
            reports.append(check_dataset(sources[(ds.name, ds.split)], processor, spec, data_cfg=cfg.data,
                                         rows=rows, stage_index=index, stage=st.name, dataset=name))
    return reports


def _open_sources(cfg) -> dict:
    """The stages' training datasets, as `startup.open_sources` loads them."""
    from vlm_jax import config as config_lib
    from vlm_jax import paths
    from vlm_jax.data import load

    data_dir = paths.data_dir(cfg.data.data_dir)
    out = {}
    for i, st in enumerate(cfg.stages):
        for j, ds in enumerate(st.datasets):
            if (ds.name, ds.split) not in out:
                try:
                    out[(ds.name, ds.split)] = load(ds.name, split=ds.split, data_dir=data_dir)
                except (ValueError, FileNotFoundError) as e:
                    raise config_lib.ConfigError(f"stages.{i}.datasets.{j}.name: {e}") from e
    return out


def refusal(reports: Sequence[DatasetReport], max_skip_share: float, *, strict: bool = False) -> str | None:
    """The error message when a dataset would skip more than `max_skip_share` (with `strict`, any
    row: a strict run would stop at it mid-stage), else None."""
    bad = [r for r in reports if r.skip_share > max_skip_share or (strict and r.skip_share > 0)]
    if not bad:
        return None
    parts = [f"stage {r.stage_index} ({r.stage}) dataset {r.dataset} would skip {100 * r.skip_share:.1f}% "
             f"of its rows ({r.row_ids()})" for r in bad]
    limit = ("data.strict=True allows none" if strict and all(r.skip_share <= max_skip_share for r in bad)
             else f"above data.preflight_max_skip_share={max_skip_share:g}")
    return ("preflight data check: " + " | ".join(parts)
            + f"; {limit}. Fix or drop those rows, raise "
              "data.max_prompt_len / data.length_buckets / data.max_pixels_per_image, or raise the share.")


def preflight(cfg, sources: Mapping, processor=None) -> list[DatasetReport]:
    """The start-up check of `train` (nothing when data.preflight_rows == 0): prints the table on
    process 0 and raises ConfigError with `refusal`'s message when a dataset skips too much."""
    from vlm_jax import config as config_lib

    if cfg.data.preflight_rows == 0:
        return []
    reports = check_config(cfg, sources=sources, processor=processor)
    if _is_main_process():
        print(format_table(reports), flush=True)
    message = refusal(reports, cfg.data.preflight_max_skip_share, strict=cfg.data.strict)
    if message is not None:
        raise config_lib.ConfigError(message)
    return reports


def _is_main_process() -> bool:
    import jax
    return jax.process_index() == 0


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def _spread(values: Sequence[int]) -> str:
    if not values:
        return "-"
    return f"{min(values)}/{int(np.median(values))}/{max(values)}"


# image tokens and prompt tokens: min/median/max per row; too long: rows over max_prompt_len (SFT:
# or sequences over the largest bucket); resized: rows with an image outside the pixel bounds
# (resized, still used); px over: rows over the per-row pixel budget; mismatch: placeholder / image
# count mismatches; other: any other skip reason; skip %: share of the rows training would skip.
COLUMNS = ("stage", "dataset", "rows", "checked", "image tok", "prompt tok", "too long", "resized", "px over",
           "mismatch", "other", "skip %")


def format_table(reports: Sequence[DatasetReport]) -> str:
    """A fixed-width table, one line per (stage, dataset)."""
    lines = []
    for r in reports:
        other = r.num_skipped + sum(map(len, r.loaded_skipped.values())) - r.count(
            row_lib.PROMPT_TOO_LONG, row_lib.SEQUENCE_TOO_LONG, row_lib.TOO_MANY_PIXELS, *MISMATCH_REASONS)
        lines.append((f"{r.stage_index}:{r.stage}", r.dataset, str(r.rows), str(r.checked), _spread(r.image_tokens),
                      _spread(r.prompt_tokens), str(r.count(row_lib.PROMPT_TOO_LONG, row_lib.SEQUENCE_TOO_LONG)),
                      str(len(r.out_of_bounds)), str(r.count(row_lib.TOO_MANY_PIXELS)),
                      str(r.count(*MISMATCH_REASONS)), str(other), f"{100 * r.skip_share:.1f}"))
    widths = [max(len(c), *(len(line[k]) for line in lines)) if lines else len(c) for k, c in enumerate(COLUMNS)]
    fmt = lambda cells: "  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(COLUMNS), fmt(["-" * w for w in widths]), *map(fmt, lines)])


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from vlm_jax import config as config_lib

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        path, overrides, flags = config_lib.parse_flags(
            sys.argv[1:] if argv is None else argv, known_flags=("rows", "max_skip_share"))
        cfg = config_lib.load_config(path, overrides)
        rows_flag = flags.get("rows", "all")
        try:
            rows = -1 if rows_flag == "all" else int(rows_flag)
            share = float(flags.get("max_skip_share", cfg.data.preflight_max_skip_share))
        except ValueError:
            raise config_lib.ConfigError(f"--rows takes a number or 'all' and --max_skip_share a number; "
                                         f"got {flags}") from None
        if rows == 0 or rows < -1:
            raise config_lib.ConfigError(f"--rows={rows_flag}: give a positive number or 'all'")
        reports = check_config(cfg, rows=rows)
        print(format_table(reports))
        message = refusal(reports, share, strict=cfg.data.strict)
        if message is not None:
            raise config_lib.ConfigError(message)
    except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
