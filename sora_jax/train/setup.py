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
from sora_jax.parallel.rules import MESH_AXES, get_rules


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
    """The device mesh and logical-axis rules named by config.mesh (shape = ICI sizes, dcn = across slices)."""
    rules = get_rules(config.mesh.rules)  # a bad preset name fails before any device is touched
    dcn = to_python(config.mesh.dcn) if "dcn" in config.mesh else None
    return make_mesh(to_python(config.mesh.shape), dcn=dcn), rules


def _rule_axes(rules) -> set[str]:
    """Mesh axes that some logical rule shards over."""
    axes: set[str] = set()
    for _, target in rules:
        axes.update((target,) if isinstance(target, str) else tuple(target or ()))
    return axes


def validate_layout(
    mesh: Mesh, rules, *, rules_name: str, heads: int | None = None, ffn: int | None = None,
    tokens: int | None = None,
) -> None:
    """Check the model's sizes against the mesh before anything compiles; ValueError naming the fix.

    Without it a size the axis does not divide is silently replicated (the layout asked for is not
    the one that runs) or, for video tokens under sequence parallelism, fails deep inside XLA.
    """
    unused = [a for a in MESH_AXES if mesh.shape[a] > 1 and a not in _rule_axes(rules)]
    if unused:
        raise ValueError(
            f"mesh axis {unused[0]}={mesh.shape[unused[0]]} is not used by the sharding rules {rules_name!r}; "
            "use rules fsdp_tp for tensor, fsdp_sp for sequence, or set that axis to 1"
        )
    tensor, sequence = mesh.shape["tensor"], mesh.shape["sequence"]
    checks = (
        (heads, tensor, "tensor", "{} heads do not"), (ffn, tensor, "tensor", "FFN width {} does not"),
        (tokens, sequence, "sequence", "{} video tokens do not"),
    )
    for size, axis, name, what in checks:
        if size is not None and axis > 1 and size % axis:
            raise ValueError(
                f"{what.format(size)} divide over {name}={axis}; pick a mesh {name} size that divides {size}"
            )


def per_process_batch(global_batch: int, mesh: Mesh, grad_accum: int = 1) -> int:
    """Split the global batch over processes, checking it divides the batch-sharded mesh axes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if grad_accum < 1:
        raise ValueError(f"train.grad_accum must be >= 1, got {grad_accum}")
    if global_batch % (shards * grad_accum):
        raise ValueError(
            f"data.batch_size={global_batch} does not split into {grad_accum} microbatch(es) over the "
            f"{shards} batch shards (mesh data x fsdp); use a multiple of {shards * grad_accum}"
        )
    if global_batch % jax.process_count():
        raise ValueError(f"data.batch_size={global_batch} does not split over {jax.process_count()} processes")
    return global_batch // jax.process_count()


def compute_dtype(name: str) -> Any:
    """config.train.dtype -> a jnp dtype; "auto" is bfloat16 on TPU/GPU and float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"train.dtype={name!r} is not one of auto, float32, bfloat16, float16")
    return jnp.dtype(name)


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
