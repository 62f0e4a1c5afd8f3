"""Turning a ConfigDict into the objects a run needs: mesh, rules, model dataclasses, batches."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from sora_jax.parallel.mesh import make_mesh
from sora_jax.parallel.rules import get_rules


def to_python(value: Any) -> Any:
    """ConfigDict/list values -> plain dicts and tuples (hashable dataclass fields)."""
    if isinstance(value, (ml_collections.ConfigDict, dict)):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(to_python(v) for v in value)
    return value


def dataclass_from(cls: type, values: Any, **extra) -> Any:
    """Build a frozen model dataclass, rejecting keys it does not define."""
    values = {**to_python(values), **extra}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {unknown} in config.model; valid fields: {sorted(fields)}"
        )
    return cls(**values)


def mesh_and_rules(config: ml_collections.ConfigDict) -> tuple[Mesh, tuple]:
    """The device mesh and logical-axis rules named by config.mesh."""
    return make_mesh(to_python(config.mesh.shape)), get_rules(config.mesh.rules)


def per_process_batch(global_batch: int, mesh: Mesh) -> int:
    """Split the global batch over processes, checking it divides the batch-sharded mesh axes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise ValueError(
            f"data.batch_size={global_batch} is not divisible by the {shards} batch shards "
            f"(mesh data x fsdp); use a multiple of {shards}"
        )
    return global_batch // jax.process_count()


def dataclass_to_json(cfg: Any) -> dict:
    """JSON-safe dict of a frozen model dataclass (dtypes by name)."""
    d = dataclasses.asdict(cfg)
    return {k: (np.dtype(v).name if k in ("dtype", "param_dtype") else v) for k, v in d.items()}


def dataclass_from_json(cls: type, d: dict) -> Any:
    """Inverse of dataclass_to_json."""
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    for k in ("dtype", "param_dtype"):
        if k in d:
            d[k] = jnp.dtype(d[k])
    return cls(**d)


def on_one_device(abstract: Any) -> Any:
    """Give abstract arrays a single-device sharding: the restore target for inference."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
