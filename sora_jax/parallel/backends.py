"""Choosing JAX's backends before anything touches a device.

`jax[tpu]` installs libtpu, and JAX tries to start it on every machine, with or without a TPU. Where
there is none, libtpu prints a block of TPU-discovery errors ("could not determine TPU accelerator
type", "E0000 ... unexpected worker hostname") before JAX falls back to the CPU. README's install
includes the `tpu` extra, so every command on a CPU machine began with that block.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import jax


def skip_absent_tpu() -> bool:
    """Use the CPU backend alone where libtpu is installed but this machine has no accelerator; True if it did.

    Only a machine with no TPU chip, no visible NVIDIA GPU and no other PJRT plugin installed qualifies,
    and only when the user has not chosen platforms (JAX_PLATFORMS or `jax_platforms`), so it changes
    nothing JAX would otherwise pick: the CPU is what it falls back to there. Call it before the first
    device query; afterwards JAX's backends are fixed and it does nothing.
    """
    if os.environ.get("JAX_PLATFORMS") or getattr(jax.config, "jax_platforms", None):
        return False
    if importlib.util.find_spec("libtpu") is None:
        return False
    if any(True for _ in importlib.metadata.entry_points(group="jax_plugins")):
        return False  # a GPU or other accelerator plugin: let JAX choose
    try:
        from jax._src import hardware_utils, xla_bridge  # private: the same probes JAX itself runs
    except ImportError:
        return False
    try:
        if xla_bridge.backends_are_initialized():
            return False
        if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0 or hardware_utils.has_visible_nvidia_gpu():
            return False
    except (AttributeError, OSError):
        return False  # a JAX whose probes moved: leave the choice to it
    jax.config.update("jax_platforms", "cpu")
    return True
