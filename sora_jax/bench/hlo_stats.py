"""Collectives of a compiled (SPMD-partitioned) XLA program, read from its HLO text.

Counts are per execution of the program on one device: an op inside a while loop (the scanned DiT
blocks) counts once per iteration, from the loop's `known_trip_count`. Bytes are given two ways:
`bytes`, the full (unsharded-group) buffer the collective works on, and `wire_bytes`, what one
device sends over its links with ring algorithms in a group of g devices:
all-gather and reduce-scatter (g-1)/g x full, all-reduce 2(g-1)/g x full, all-to-all (g-1)/g x
buffer, collective-permute the buffer. On TPU, XLA fuses reduce-scatter into a fusion that calls a
computation named `all-reduce-scatter.N` around an all-reduce: those count as reduce-scatter.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Any

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s")
_OP = re.compile(r"= (.+?) (all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(-start)?\(")
_CALLEE = re.compile(r"\b(calls|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


def _arrays(text: str) -> list[float]:
    """Bytes of each array shape written in `text` ('(f32[8,256], s32[])' -> [8192, 4])."""
    out = []
    for dtype, dims in _ARRAY.findall(text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(size * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4))
    return out


def _groups(line: str, num_devices: int) -> np.ndarray:
    """Replica groups of a collective as a [groups, size] array of device ids (all devices if absent)."""
    m = _GROUPS_MESH.search(line)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        chosen = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(2))]
        rest = [i for i in range(len(names)) if i not in chosen]
        ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(rest + chosen)
        return ids.reshape(-1, math.prod(sizes[i] for i in chosen))
    m = _GROUPS_IOTA.search(line)
    if m:
        n_groups, size, dims, perm = m.groups()
        ids = np.arange(math.prod(int(d) for d in dims.split(","))).reshape([int(d) for d in dims.split(",")])
        if perm:
            ids = ids.transpose([int(p) for p in perm.split(",")])
        return ids.reshape(int(n_groups), int(size))
    m = _GROUPS_LIST.search(line)
    if m and m.group(1):
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
        if groups and all(len(g) == len(groups[0]) for g in groups):
            return np.asarray(groups)
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if m:
        return np.asarray([[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))])
    return np.arange(num_devices)[None]


@dataclasses.dataclass
class CollectiveStats:
    """Per-type count, full bytes and per-device wire bytes, split into ICI and DCN."""

    count: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    wire_bytes: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    ici_wire_bytes: float = 0.0
    dcn_wire_bytes: float = 0.0
    unknown_trip_counts: int = 0

    def to_json(self) -> dict[str, Any]:
        """Plain dict with every collective type present (0 when absent)."""
        return {
            "count": {k: int(self.count.get(k, 0)) for k in COLLECTIVES},
            "bytes": {k: float(self.bytes.get(k, 0.0)) for k in COLLECTIVES},
            "wire_bytes": {k: float(self.wire_bytes.get(k, 0.0)) for k in COLLECTIVES},
            "ici_wire_bytes": self.ici_wire_bytes,
            "dcn_wire_bytes": self.dcn_wire_bytes,
            "unknown_trip_counts": self.unknown_trip_counts,
        }


def _split_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    computations: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line[:1].isspace() and line.rstrip().endswith("{"):
            current = m.group(2)
            computations[current] = []
            if m.group(1):
                entry = current
        elif current is not None:
            if line.strip() == "}":
                current = None
            else:
                computations[current].append(line)
    return computations, entry


def _multiplicities(computations: dict[str, list[str]], entry: str) -> tuple[dict[str, float], int, set[str]]:
    """How often each computation runs per program execution; also unknown trip counts and RS fusions."""
    mult: dict[str, float] = defaultdict(float)
    scatter_fused: set[str] = set()
    unknown = 0
    stack = [(entry, 1.0)]
    while stack:
        name, times = stack.pop()
        mult[name] += times
        for line in computations.get(name, ()):
            callees = [c for _, c in _CALLEE.findall(line)]
            b = _BRANCHES.search(line)
            if b:
                callees += [c.strip().lstrip("%") for c in b.group(1).split(",") if c.strip()]
            if not callees:
                continue
            inner = times
            if re.search(r"\swhile\(", line):
                trip = _TRIP.search(line)
                cond = _CONDITION.search(line)
                # TPU HLO has no known_trip_count: the scan's bound is the constant its condition compares to.
                bounds = [int(c) for c in re.findall(r"s32\[\]\S* constant\((\d+)\)",
                                                    "\n".join(computations.get(cond.group(1), ())))] if cond else []
                if trip or bounds:
                    inner = times * int(trip.group(1) if trip else max(bounds))
                else:
                    unknown += 1
            for callee in callees:
                if callee.startswith("all-reduce-scatter"):
                    scatter_fused.add(callee)
                if callee in computations:
                    stack.append((callee, inner))
    return mult, unknown, scatter_fused


def collective_stats(hlo: str, device_slices: list[int] | None = None) -> CollectiveStats:
    """Collectives of a compiled program's HLO text; device_slices[i] = slice of device i (DCN split)."""
    computations, entry = _split_computations(hlo)
    mult, unknown, scatter_fused = _multiplicities(computations, entry)
    num_devices = len(device_slices) if device_slices else 1
    stats = CollectiveStats(unknown_trip_counts=unknown)
    for name, lines in computations.items():
        times = mult.get(name, 0.0)
        if not times:
            continue
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            shape, op, start = m.groups()
            op = "reduce-scatter" if (op == "all-reduce" and name in scatter_fused) else op
            arrays = _arrays(shape)
            # Async starts return (operands..., results...) (+ u32 scalars for permutes): keep the results.
            out = sum(arrays[len(arrays) // 2:]) if start and op != "all-reduce" else sum(arrays)
            if start and op == "collective-permute":
                out = max(arrays)
            groups = _groups(line, num_devices)
            g = groups.shape[1] if op != "collective-permute" else 2
            if name in scatter_fused:
                full = out  # the fused form's all-reduce still has the unscattered shape
            else:
                full = out * g if op == "reduce-scatter" else out
            wire = {"all-reduce": 2 * (g - 1) / g * full, "collective-permute": full}.get(op, (g - 1) / g * full)
            stats.count[op] += int(times)
            stats.bytes[op] += full * times
            stats.wire_bytes[op] += wire * times
            crosses = device_slices is not None and groups.size and any(
                len({device_slices[i] for i in grp if i < len(device_slices)}) > 1 for grp in groups
            )
            if crosses:
                stats.dcn_wire_bytes += wire * times
            else:
                stats.ici_wire_bytes += wire * times
    return stats
