"""Device mesh construction and logical-name -> NamedSharding resolution."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sora_jax.parallel.rules import MESH_AXES


class MeshError(ValueError):
    """A mesh shape that cannot be laid over the available devices."""


def _describe(sizes) -> str:
    return "x".join(map(str, sizes)) + " (" + ", ".join(f"{a}={n}" for a, n in zip(MESH_AXES, sizes)) + ")"


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int, *, what: str = "devices") -> tuple[int, ...]:
    """Fill the single -1 entry of a {axis: size} mapping so the product equals num_devices."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; allowed axes are {list(MESH_AXES)}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise MeshError(f"at most one mesh axis may be -1 (\"use the remaining {what}\"), got {_describe(sizes)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise MeshError(
                f"mesh {_describe(sizes)} cannot fill {num_devices} {what}: "
                f"{num_devices} is not divisible by {known}; change config.mesh"
            )
        sizes[free[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh {_describe(sizes)} needs {math.prod(sizes)} {what} but {num_devices} are available; "
            f"set config.mesh so the sizes multiply to {num_devices} (or use -1 for one axis)"
        )
    return tuple(sizes)


def num_slices(devices: list) -> int:
    """How many TPU slices (joined by the data-center network) the devices span; 1 off multi-slice TPU."""
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def resolve_hybrid_shape(
    ici: Mapping[str, int], dcn: Mapping[str, int] | None, num_devices: int, slices: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ICI sizes within a slice, DCN sizes across slices); -1 fills the devices per slice / the slices."""
    dcn_sizes = resolve_mesh_shape(dcn or {}, slices, what="slices") if slices > 1 or dcn else (1,) * len(MESH_AXES)
    if num_devices % slices:
        raise MeshError(f"{num_devices} devices do not split evenly over {slices} slices")
    return resolve_mesh_shape(ici, num_devices // slices), dcn_sizes


def make_mesh(shape: Mapping[str, int], devices: list | None = None, *, dcn: Mapping[str, int] | None = None) -> Mesh:
    """Build a 4-axis (data, fsdp, tensor, sequence) mesh in GSPMD (Auto) mode.

    `shape` gives each axis's size within a slice (ICI), `dcn` its size across slices (multi-slice
    TPU); an axis spans ici x dcn devices. With one slice (CPU, GPU, one TPU slice) dcn must be all 1s.
    """
    devices = list(devices) if devices is not None else jax.devices()
    slices = num_slices(devices)
    ici_sizes, dcn_sizes = resolve_hybrid_shape(shape, dcn, len(devices), slices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        return jax.make_mesh(ici_sizes, MESH_AXES, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices=devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (small tiny-config tensors stay replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for name in names:
            size = mesh.shape[name] * math.prod(mesh.shape[k] for k in kept)
            if dim % size == 0:
                kept.append(name)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def unbox_abstract(abstract_boxed: Any) -> Any:
    """Strip LogicallyPartitioned boxes from a pytree of abstract arrays."""
    # Not nn.meta.unbox: under a mesh it adds sharding constraints, which abstract values cannot take.
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        abstract_boxed,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a pytree of (possibly LogicallyPartitioned) abstract arrays."""
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    unboxed = unbox_abstract(abstract_boxed)
    return jax.tree.map(
        lambda leaf, spec: NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
        unboxed,
        mesh_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard dim 0 over (data, fsdp); replicate the rest."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on mesh."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble per-process numpy batches into global arrays sharded over (data, fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local.items()
    }
