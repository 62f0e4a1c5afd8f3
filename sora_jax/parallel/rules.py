"""Logical axis names and the presets that map them onto mesh axes.

Every parameter in sora_jax carries logical names from `LOGICAL_AXES`; a preset chosen by config
turns them into mesh axes. Convolution kernel taps are named None: they are never sharded, and
flax forbids one name on several dims. Presets are pure data so a layout benchmark can list and compare them.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# The vocabulary of logical names used by models (parameters and activation constraints).
LOGICAL_AXES = {
    # parameters
    "embed": "model width (DiT / text encoder hidden size)",
    "mlp": "feed-forward hidden size",
    "heads": "attention projection output (heads x head_dim, merged)",
    "kv": "per-head dim (never sharded)",
    "vocab": "token vocabulary",
    "layers": "stacked (scanned) block axis",
    "conv_in": "convolution input channels",
    "conv_out": "convolution output channels",
    "norm": "norm scale / bias vectors",
    "modulation": "adaLN modulation slots (6 per block, 2 at the output)",
    "text_embed": "text encoder width entering the DiT",
    "channels": "latent / pixel channels",
    # activations
    "batch": "examples",
    "length": "video tokens",
    "text_length": "text tokens",
    "act_embed": "activation width",
    "act_heads": "activation heads",
    "act_mlp": "activation feed-forward hidden",
}

_BATCH = ("batch", ("data", "fsdp"))

PRESETS: dict[str, tuple[tuple[str, str | tuple[str, ...] | None], ...]] = {
    # Replicate every parameter; split only the batch.
    "dp": (_BATCH,),
    # ZeRO-3 style: shard parameters (and so optimizer state) over fsdp along their width.
    "fsdp": (_BATCH, ("embed", "fsdp"), ("conv_out", "fsdp"), ("vocab", "fsdp")),
    # fsdp plus Megatron-style tensor parallelism on heads and the FFN.
    "fsdp_tp": (
        _BATCH,
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("vocab", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_heads", "tensor"),
    ),
    # fsdp plus sequence (context) parallelism over video tokens.
    "fsdp_sp": (
        _BATCH,
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("vocab", "fsdp"),
        ("length", "sequence"),
    ),
}

# Earlier names, still accepted (configs, notebooks and sweeps written before the short names).
ALIASES = {"data": "dp", "fsdp_tensor": "fsdp_tp", "fsdp_sequence": "fsdp_sp"}


def canonical_preset(preset: str) -> str:
    """The preset's current name ('fsdp_tensor' -> 'fsdp_tp'); unknown names raise ValueError."""
    name = ALIASES.get(preset, preset)
    if name not in PRESETS:
        raise ValueError(
            f"unknown sharding preset {preset!r}; choose one of {list(PRESETS)} (config.mesh.rules; "
            f"old names {sorted(ALIASES)} are accepted too)"
        )
    return name


def get_rules(preset: str) -> tuple:
    """Return the logical->mesh rules of a named preset (or of its old alias)."""
    return PRESETS[canonical_preset(preset)]
