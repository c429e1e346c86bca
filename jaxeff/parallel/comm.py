"""Communication accounting from compiled HLO: bytes per device by collective type.

The count is static: every collective instruction of the compiled (SPMD-partitioned, so
per-device) module contributes the bytes of its result, multiplied by the trip count of the
``while`` loops around it (XLA records ``known_trip_count``; ``lax.scan`` loops have one).
Conventions, per device:

- ``all-to-all``: the bytes it returns (an ``M/N`` shard of an ``M``-byte array counts ``M/N``,
  the ``1/N`` that stays local included). XLA:CPU emits an all-to-all as a tuple of ``N``
  chunks; the chunks are summed.
- ``collective-permute`` (``ppermute``): the bytes received.
- ``all-gather``: the gathered result; ``all-reduce``: the reduced array; ``reduce-scatter``:
  the scattered piece.

Pitfall: XLA merges identical collectives (common-subexpression elimination), e.g. the
all-to-alls of ``q`` and ``k`` when their weights are equal; measure with distinct weights
(any random initialisation).
"""

from __future__ import annotations

import re
from collections import defaultdict

import jax

COLLECTIVES = (
    "all-to-all",
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "collective-permute",
)

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_COMP_START = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.*?)\s(?P<op>"
    + "|".join(COLLECTIVES)
    + r")(?P<start>-start)?\("
)
_WHILE_BODY = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"\b(?:calls|to_apply|branch_computations)=\{?([^}]*?)\}?(?:,|$)")


def _shape_bytes(type_str: str) -> list[int]:
    sizes = []
    for dtype, dims in _SHAPE.findall(type_str):
        if dtype.startswith("f8"):
            width = 1
        elif dtype in _DTYPE_BYTES:
            width = _DTYPE_BYTES[dtype]
        else:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        sizes.append(n * width)
    return sizes


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per device by collective type (``COLLECTIVES`` keys plus ``total``) in the text of
    a compiled HLO module (``jax.jit(f).lower(...).compile().as_text()``)."""
    own: dict[str, dict[str, int]] = {}
    callees: dict[str, list[tuple[str, int]]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_START.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(1)
                own[current] = defaultdict(int)
                callees[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            sizes = _shape_bytes(m.group("type"))
            if m.group("start") and len(sizes) > 1:
                sizes = sizes[1:2]  # async start: (operand, result, ...) -> the result
            own[current][m.group("op")] += sum(sizes)
            continue
        w = _WHILE_BODY.search(line)
        if w:
            trip = _TRIP.search(line)
            # an unknown trip count is counted once: a lower bound
            callees[current].append((w.group(1), int(trip.group(1)) if trip else 1))
            continue
        for group in _CALLS.findall(line):
            for name in re.findall(r"%?([\w.\-]+)", group):
                callees[current].append((name, 1))
    if entry is None:
        raise ValueError("hlo_text has no ENTRY computation (pass compiled HLO text)")

    memo: dict[str, dict[str, int]] = {}

    def total(name: str) -> dict[str, int]:
        if name not in memo:
            out = defaultdict(int, own.get(name, {}))
            for callee, times in callees.get(name, []):
                for op, b in total(callee).items():
                    out[op] += times * b
            memo[name] = out
        return memo[name]

    counts = total(entry)
    result = {op: int(counts.get(op, 0)) for op in COLLECTIVES}
    result["total"] = sum(result.values())
    return result


def compiled_collective_bytes(fn, *args, **kwargs) -> dict[str, int]:
    """:func:`collective_bytes` of ``jax.jit(fn)`` compiled for ``args`` (arrays or
    ``jax.ShapeDtypeStruct``); nothing is executed."""
    return collective_bytes(jax.jit(fn).lower(*args, **kwargs).compile().as_text())


def sequence_parallel_bytes(
    method: str, params, x, cond=None, *, mesh, heads: int, backward: bool = False
) -> dict[str, int]:
    """Bytes per device of one spatial-temporal block under ``method`` (``dsp``, ``ulysses``,
    ``ring``; :mod:`jaxeff.parallel.sequence`), forward only or forward + backward.

    Theory per device per block for ``M`` activation bytes on ``N`` devices (forward; the
    backward pass repeats the same collectives): DSP ``2M/N``, Ulysses ``8M/N`` (so 4x DSP),
    ring ``4 (N-1) M/N``.
    """
    from jaxeff.parallel.sequence import sequence_parallel_block

    def fwd(p, x, c):
        return sequence_parallel_block(p, x, c, mesh=mesh, heads=heads, method=method)

    if not backward:
        return compiled_collective_bytes(fwd, params, x, cond)

    def fwd_bwd(p, x, c):
        out, vjp = jax.vjp(fwd, p, x, c)
        return vjp(out)

    return compiled_collective_bytes(fwd_bwd, params, x, cond)
