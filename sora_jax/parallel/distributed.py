"""Joining a multi-process (multi-host) JAX run: TPU pods, GPU clusters, or several CPU processes.

`jax.distributed.initialize` must run once per process before anything touches a device. On a
Cloud TPU pod slice (and under SLURM/Open MPI) JAX finds the coordinator itself; elsewhere the
coordinator address, process count and process id come from flags or the JAX_* environment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping

import jax

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Where the coordinator is and who this process is; all None means "auto-detect" (TPU pods)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def explicit(self) -> bool:
        """Whether any field was given (otherwise the cluster environment is auto-detected)."""
        return any(v is not None for v in dataclasses.astuple(self))


def _int_or_none(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def cluster_spec(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ClusterSpec:
    """Flags first, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; checked for consistency.

    coordinator "auto" asks JAX to detect the cluster itself (the other fields may then stay unset).
    """
    env = os.environ if env is None else env
    spec = ClusterSpec(
        coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None,
        _int_or_none(num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES"), "num_processes"),
        _int_or_none(process_id if process_id is not None else env.get("JAX_PROCESS_ID"), "process_id"),
    )
    if spec.coordinator == "auto":
        return spec
    if spec.coordinator is not None and ":" not in spec.coordinator:
        raise ValueError(f"coordinator {spec.coordinator!r} needs a port: host:port, e.g. 10.0.0.2:1234")
    if spec.num_processes is not None and spec.num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {spec.num_processes}")
    if spec.process_id is not None and spec.num_processes is not None and not 0 <= spec.process_id < spec.num_processes:
        raise ValueError(f"process_id {spec.process_id} is outside 0..{spec.num_processes - 1} (--num-processes)")
    if spec.explicit and None in (spec.coordinator, spec.num_processes, spec.process_id):
        raise ValueError(
            "a multi-process run off TPU needs all of --coordinator, --num-processes and --process-id "
            f"(or {', '.join(ENV_VARS)}); got {dataclasses.asdict(spec)}"
        )
    return spec


def initialize(spec: ClusterSpec) -> bool:
    """Join the run described by `spec`; returns whether jax.distributed was initialised.

    coordinator "auto" lets JAX detect the cluster (Cloud TPU, SLURM, Open MPI); an empty spec does
    the same on a Cloud TPU VM, where a pod slice's workers find each other through the metadata
    server, and nothing elsewhere (one host needs no coordinator). Must run before any device use.
    """
    if jax.distributed.is_initialized():
        return True
    if spec.coordinator == "auto":
        jax.distributed.initialize()
        return True
    if not spec.explicit and on_cloud_tpu_vm():
        try:
            jax.distributed.initialize()
        except ValueError:  # JAX found no cluster around this TPU VM: a single host runs alone
            return False
        return True
    if not spec.explicit or spec.num_processes == 1:
        return False
    jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id)
    return True


def on_cloud_tpu_vm(env: Mapping[str, str] | None = None) -> bool:
    """Whether this host looks like a Cloud TPU VM (a TPU device node, or the TPU runtime's environment)."""
    env = os.environ if env is None else env
    markers = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_ACCELERATOR_TYPE")
    if any(env.get(k) for k in markers) or os.path.exists("/dev/accel0"):  # v2-v4 chips are /dev/accel*
        return True
    # v5e and later are VFIO devices; /dev/vfio alone also appears on GPU hosts, hence libtpu too.
    return os.path.isdir("/dev/vfio") and importlib.util.find_spec("libtpu") is not None
