"""What the compiled sampler moves between chips per decoded token: the collectives inside the
decode loop (`jax.named_scope("decode_loop")` in `vlm_jax.rl.sampler`) read from the compiled HLO
text, with their result bytes (`decode_loop_traffic`, a column of the memory planner's rows).
"""

from __future__ import annotations

import math
import re

_COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _results(type_text: str, op: str, start: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each array a collective produces, from its result type: one array, a tuple
    of them (combined collectives), or for async all-gather / collective-permute starts the tuple
    (operands, results[, u32 context scalars]) of which the results are kept."""
    arrays = [(d, tuple(int(n) for n in dims.split(",") if n)) for d, dims in _ARRAY.findall(type_text)]
    if start and op in ("all-gather", "collective-permute"):
        arrays = [a for a in arrays if a != ("u32", ())]
        arrays = arrays[len(arrays) // 2:]
    return arrays


def loop_collectives(hlo_text: str,
                     op_name: str = "jit(_generate)/decode_loop/while") -> list[tuple[str, str, tuple]]:
    """(op, dtype, per-device shape) of every array that the collectives of one iteration of the
    while loops named `op_name` produce (their bodies and what those call), in a compiled SPMD
    module's text (`compiled.as_text()`); for the sampler, the collectives of one decode step."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.-]+) .*\{$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    todo = [m.group(1) for m in re.finditer(r"while\(.*body=%?([\w.-]+).*op_name=\"([^\"]*)\"", hlo_text)
            if m.group(2) == op_name]
    seen, out = set(), []
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            m = _COLLECTIVE.search(line)
            if m:
                op = m.group(2)
                out += [(op, d, shape) for d, shape in _results(m.group(1), op, bool(m.group(3)))]
            todo += re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.-]+)", line)
    return out


def collective_bytes(collectives) -> int:
    return sum(math.prod(shape) * _DTYPE_BYTES.get(dtype, 4) for _, dtype, shape in collectives)


def decode_loop_traffic(compiled) -> dict:
    """The sampler's per-token collectives (one decode step, per chip): how many arrays each kind of
    op produces, their bytes, and the largest all-gather (a parameter-sized one means weights are
    gathered at every token)."""
    try:
        found = loop_collectives(compiled.as_text())
    except Exception as e:  # noqa: BLE001 - optional information
        # e.g. libtpu 0.0.52 on the 7B sampler: "async-update instruction should have 1 operands";
        # the same text comes from XLA's dump (XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"):
        # `loop_collectives(open("DIR/...jit__generate...after_optimizations.txt").read())`
        return dict(decode_step_collectives_error=f"compiled.as_text() failed: {type(e).__name__}: {e}"[:300])
    counts: dict[str, int] = {}
    for op, _, _ in found:
        counts[op] = counts.get(op, 0) + 1
    gathers = [math.prod(s) * _DTYPE_BYTES.get(d, 4) for op, d, s in found if op == "all-gather"]
    return dict(decode_step_collectives=counts, decode_step_collective_bytes=collective_bytes(found),
                decode_step_largest_all_gather_bytes=max(gathers, default=0))
