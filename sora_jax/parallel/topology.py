"""Compile targets for layout benchmarks: simulated CPU devices, TPU topologies (compile-only), local devices.

A TPU target needs libtpu (`pip install -e ".[tpu]"`), not a TPU: libtpu describes any slice shape to
the compiler (`jax.experimental.topologies.get_topology_desc`), so a CPU host can compile for a pod
and read the compiler's per-chip memory, FLOPs and collectives.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sora_jax.parallel.mesh import resolve_mesh_shape
from sora_jax.parallel.rules import MESH_AXES

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip roofline figures (bytes and FLOP/s per chip; a chip may hold several JAX devices)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    ici_bw: float  # bidirectional inter-chip bytes/s, all links of one chip together
    dcn_bw: float  # data-center network bytes/s per chip (multi-slice)
    devices_per_chip: int = 1


# Sources: Google Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/<v4|v5e|v5p|v6e|tpu7x>),
# "key specifications" tables; ICI is the per-chip bidirectional figure (Gbps / 8 where given in Gbps).
CHIPS: dict[str, Chip] = {
    # v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s, ICI 2400 GB/s... quoted as 6 links x 50 GB/s x 2 directions
    # = 600 GB/s bidirectional per chip (tpu/docs/v4); DCN 25 Gbps per chip assumed (4-chip host, 100 Gbps NIC).
    "v4": Chip("v4", 275e12, 32 * GIB, 1200e9, 600e9, 25e9 / 8),
    # v5e: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, ICI 1600 Gbps = 200 GB/s (tpu/docs/v5e);
    # DCN 50 Gbps per chip (200 Gbps per 4-chip host).
    "v5e": Chip("v5e", 197e12, 16 * GIB, 819e9, 200e9, 50e9 / 8),
    # v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, ICI 1200 GB/s bidirectional, DCN 50 Gbps per chip
    # (tpu/docs/v5p, key specifications table).
    "v5p": Chip("v5p", 459e12, 95 * GIB, 2765e9, 1200e9, 50e9 / 8),
    # v6e (Trillium): 918 TFLOP/s bf16, 32 GiB HBM at 1640 GB/s, ICI 3584 Gbps = 448 GB/s
    # (tpu/docs/v6e); DCN 100 Gbps per chip assumed (400 Gbps per 4-chip host).
    "v6e": Chip("v6e", 918e12, 32 * GIB, 1640e9, 448e9, 100e9 / 8),
    # v7x (Ironwood): 2307 TFLOP/s bf16 (4614 fp8), 192 GiB HBM3e at 7380 GB/s, ICI 1200 GB/s bidirectional
    # (tpu/docs/tpu7x); two TensorCores per chip, each its own JAX device. DCN assumed as v5p.
    "v7x": Chip("v7x", 2307e12, 192 * GIB, 7380e9, 1200e9, 50e9 / 8, devices_per_chip=2),
    # Host CPU: no peak of its own here; `local` runs measure it (matmul) and pass it in.
    "cpu": Chip("cpu", 0.0, 0.0, 0.0, 0.0, 0.0),
}

# libtpu's topology name prefix and whether it counts TensorCores (2 per chip) in accelerator names.
_TPU_FAMILIES = {"v4": ("v4", True), "v5p": ("v5p", True), "v5e": ("v5e", False), "v6e": ("v6e", False),
                 "v7x": ("tpu7x", True)}
_CHIP_OF_KIND = (("v7", "v7x"), ("tpu7", "v7x"), ("v6", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"),
                 ("v5", "v5p"), ("v4", "v4"))


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices to compile (and maybe run) on, and the chip their roofline uses."""

    name: str
    kind: str  # "cpu" (simulated devices), "tpu" (compile-only topology) or "local" (run it too)
    devices: tuple
    chip: Chip
    num_slices: int = 1

    @property
    def num_devices(self) -> int:
        """JAX devices in the target."""
        return len(self.devices)

    @property
    def num_chips(self) -> int:
        """Physical chips in the target."""
        return max(1, self.num_devices // self.chip.devices_per_chip)


def _grid_topology(chips: int, dims: int) -> str:
    """Cloud TPU's slice shape of `chips` chips (a power of two): 2x2x1, 2x2x2, 2x2x4, 2x4x4 ...; 4x4, 8x16."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"a TPU slice of {chips} chips is not a power of two; name the shape, e.g. v5p:2x4x4")
    if dims == 3 and chips <= 4:
        return {1: "1x1x1", 2: "2x1x1", 4: "2x2x1"}[chips]
    sizes = [2, 2, 1] if dims == 3 else [1, 1]
    while math.prod(sizes) < chips:
        smallest = min(sizes)
        sizes[max(i for i, s in enumerate(sizes) if s == smallest)] *= 2
    return "x".join(map(str, sizes))


def tpu_topology_name(accelerator: str) -> tuple[str, str]:
    """'v5p-64' -> ('v5p', 'v5p:2x4x4'); 'v5e:4x4' passes through; returns (chip, libtpu name)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e|v7x)([-:])([0-9x]+)", accelerator)
    if not m:
        raise ValueError(
            f"unknown TPU target {accelerator!r}; use an accelerator type (v4-8, v5p-64, v5e-16, v6e-8, v7x-8), "
            "a slice shape (v5p:2x2x1, v5e:4x4) or either prefixed with the slice count (2xv5e-256)"
        )
    chip, sep, size = m.groups()
    prefix, counts_cores = _TPU_FAMILIES[chip]
    if sep == ":":
        return chip, f"{prefix}:{size}"
    if not size.isdigit():
        raise ValueError(f"TPU target {accelerator!r}: the size after '-' is a count (e.g. v5p-64)")
    chips = int(size) // 2 if counts_cores else int(size)
    if chips < 1:
        raise ValueError(f"TPU target {accelerator!r} has no whole chip; the smallest is {chip}-{2 if counts_cores else 1}")
    dims = 2 if chip in ("v5e", "v6e") else 3
    return chip, f"{prefix}:{_grid_topology(chips, dims)}"


def tpu_target(accelerator: str) -> Target:
    """Compile-only devices of a TPU slice (or several: '2xv5p-64') from libtpu; needs the `tpu` extra."""
    m = re.fullmatch(r"(?:(\d+)x)?(v.*)", accelerator)
    num_slices = int(m.group(1) or 1) if m else 1
    chip, topo_name = tpu_topology_name(m.group(2) if m else accelerator)
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"target {accelerator!r} needs libtpu: pip install -e \".[tpu]\" (no TPU is needed to compile)"
        ) from e
    from jax.experimental import topologies

    # Compile-only use touches no chip, so several processes may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs: dict[str, Any] = {"chip_config_name": "megacore"} if chip == "v4" else {}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    dims = [int(d) for d in topo_name.split(":")[1].split("x")]
    if math.prod(dims) < 4:
        # A host holds 2x2 chips by default; a smaller slice is one smaller host.
        kwargs["chips_per_host_bounds"] = (*dims, 1)[:3]
    try:
        topo = topologies.get_topology_desc(topology_name=topo_name, platform="tpu", **kwargs)
    except Exception as e:  # libtpu raises XlaRuntimeError for shapes it does not know
        raise ValueError(f"libtpu does not know TPU topology {topo_name!r} ({accelerator}): {e}") from e
    return Target(accelerator, "tpu", tuple(topo.devices), CHIPS[chip], num_slices)


def chip_of_device(device: Any) -> Chip:
    """The chip-table row of a JAX device, by its device_kind ('TPU v5 lite' -> v5e)."""
    kind = str(getattr(device, "device_kind", "cpu")).lower()
    if device.platform == "cpu":
        return CHIPS["cpu"]
    for needle, chip in _CHIP_OF_KIND:
        if needle in kind:
            return CHIPS[chip]
    raise ValueError(f"no chip-table entry for device kind {kind!r}; add it to sora_jax.parallel.topology.CHIPS")


def get_target(spec: str) -> Target:
    """Parse a target: 'cpu:8' (simulated CPU devices), a TPU name ('v5p-64', '2xv5e-256'), or 'local'."""
    if spec == "local":
        devices = tuple(jax.devices())
        return Target("local", "local", devices, chip_of_device(devices[0]))
    m = re.fullmatch(r"cpu:(\d+)", spec)
    if m:
        n, cpus = int(m.group(1)), jax.devices("cpu")
        if n > len(cpus):
            raise ValueError(
                f"target {spec!r} needs {n} CPU devices but {len(cpus)} exist; set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting Python"
            )
        return Target(spec, "cpu", tuple(cpus[:n]), CHIPS["cpu"])
    return tpu_target(spec)


def target_mesh(target: Target, shape: dict[str, int]) -> Mesh:
    """A (data, fsdp, tensor, sequence) mesh over the target; across slices only `data` crosses DCN."""
    from jax.experimental import mesh_utils

    sizes = resolve_mesh_shape(shape, target.num_devices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if target.num_slices > 1:
        if sizes[0] % target.num_slices:
            raise ValueError(
                f"mesh data={sizes[0]} must be a multiple of the {target.num_slices} slices of {target.name} "
                "(data parallelism is what crosses the data-center network)"
            )
        ici = (sizes[0] // target.num_slices, *sizes[1:])
        dcn = (target.num_slices,) + (1,) * (len(sizes) - 1)
        devices = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=list(target.devices))
    elif target.kind == "cpu":
        devices = np.asarray(target.devices).reshape(sizes)
    else:
        # Lays the mesh along the torus so neighbouring shards are neighbouring chips.
        devices = mesh_utils.create_device_mesh(sizes, devices=list(target.devices), allow_split_physical_axes=True)
    return Mesh(devices, MESH_AXES, axis_types=axis_types)
