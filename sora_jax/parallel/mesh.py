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


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Fill the single -1 entry of a {axis: size} mapping so the product equals num_devices."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; allowed axes are {list(MESH_AXES)}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise MeshError("at most one mesh axis may be -1 (\"use the remaining devices\")")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise MeshError(
                f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: "
                f"{num_devices} is not divisible by {known}; change config.mesh"
            )
        sizes[free[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; set config.mesh so the sizes multiply to {num_devices} "
            "(or use -1 for one axis)"
        )
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: list | None = None) -> Mesh:
    """Build a 4-axis (data, fsdp, tensor, sequence) mesh in GSPMD (Auto) mode."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(
        sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


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
