"""Text-conditioned Diffusion Transformer over spacetime latent patches.

One configuration of this module is exactly Wan2.1's `WanTransformer3DModel` (diffusers): patch
Conv3d, sinusoidal time embedding -> MLP -> shared 6×dim modulation plus a per-block table, blocks of
(adaLN self-attention with QK RMS-norm across heads and 3D RoPE) -> (cross-attention to text) ->
(adaLN tanh-GELU FFN), an adaLN output head, unpatchify. Inputs are channels-last.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.models.attention import DEFAULT_KV_BLOCK, DEFAULT_Q_BLOCK, attention
from sora_jax.models.layers import Dense, LayerNormFP32, RMSNorm, timestep_embedding
from sora_jax.models.rope import apply_rope, rope_freqs_3d, rope_split

REMAT_POLICIES = ("none", "full", "dots", "offload")
# Backends whose devices have a separate host memory to offload saved activations to.
_OFFLOAD_PLATFORMS = ("gpu", "tpu")
# Splash attention's tiles are multiples of the 128-lane TPU vreg.
_SPLASH_BLOCK_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of the DiT; field names follow diffusers' WanTransformer3DModel."""

    num_attention_heads: int
    attention_head_dim: int
    in_channels: int
    out_channels: int
    text_dim: int
    ffn_dim: int
    num_layers: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    cross_attn_norm: bool = True
    qk_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    attention: str = "xla"
    # Query/key block sizes of the memory-efficient attention backends (blockwise, ring, ulysses,
    # splash); the xla/cudnn backends ignore them. Memory per block is O(q_block * kv_block).
    attention_q_block: int = DEFAULT_Q_BLOCK
    attention_kv_block: int = DEFAULT_KV_BLOCK
    remat: str = "none"
    scan_layers: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose one of {list(REMAT_POLICIES)}")
        rope_split(self.attention_head_dim)
        for name in ("attention_q_block", "attention_kv_block"):
            block = getattr(self, name)
            if not isinstance(block, int) or block <= 0:
                raise ValueError(f"{name} must be a positive int (e.g. 512), got {block!r}")
            if self.attention == "splash" and block % _SPLASH_BLOCK_MULTIPLE:
                raise ValueError(
                    f"{name}={block} must be a multiple of {_SPLASH_BLOCK_MULTIPLE} for splash attention (TPU tiles)"
                )

    @property
    def hidden_size(self) -> int:
        """Model width: heads × head_dim."""
        return self.num_attention_heads * self.attention_head_dim


_VARIANTS: dict[str, dict[str, Any]] = {
    # Trains in seconds on a laptop CPU; head_dim 32 still splits into RoPE bands (12, 10, 10).
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=256, num_layers=4,
                 in_channels=16, out_channels=16, text_dim=384),
    "S": dict(num_attention_heads=6, attention_head_dim=64, ffn_dim=1536, num_layers=12,
              in_channels=16, out_channels=16, text_dim=384),
    "B": dict(num_attention_heads=12, attention_head_dim=64, ffn_dim=3072, num_layers=12,
              in_channels=16, out_channels=16, text_dim=384),
    # Wan2.1-T2V-1.3B / 14B (text_dim 4096 = umT5-XXL width).
    "wan2.1-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                        in_channels=16, out_channels=16, text_dim=4096),
    "wan2.1-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                       in_channels=16, out_channels=16, text_dim=4096),
}

VARIANTS = tuple(_VARIANTS)


def dit_config(variant: str, **overrides: Any) -> DiTConfig:
    """DiTConfig of a named variant (tiny, S, B, wan2.1-1.3b, wan2.1-14b) with field overrides."""
    if variant not in _VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; choose one of {list(_VARIANTS)}")
    return DiTConfig(**{**_VARIANTS[variant], **overrides})


def validate_latent_grid(cfg: DiTConfig, shape: Sequence[int]) -> tuple[int, int, int]:
    """Check latents [B, T, H, W, C] (or a (T, H, W) grid) against the patch; return the token grid."""
    if len(shape) == 5:
        grid = tuple(int(s) for s in shape[1:4])
        if shape[-1] != cfg.in_channels:
            raise ValueError(
                f"latents have {shape[-1]} channels but the DiT expects in_channels={cfg.in_channels} "
                "(latents are channels-last [batch, T, H, W, C])"
            )
    elif len(shape) == 3:
        grid = tuple(int(s) for s in shape)
    else:
        raise ValueError(f"latents must be [batch, T, H, W, C]; got shape {tuple(shape)}")
    if any(n % p or n == 0 for n, p in zip(grid, cfg.patch_size)):
        raise ValueError(
            f"latent grid (T, H, W)={grid} is not divisible by patch_size {cfg.patch_size}: use a video "
            "size whose latent height/width are even (e.g. 64x64 pixels -> 8x8 latents)"
        )
    return tuple(n // p for n, p in zip(grid, cfg.patch_size))


def _remat_policy(name: str, platform: str | None = None) -> Any:
    """jax.checkpoint policy of a config name on `platform` (default: JAX's default backend).

    'full' saves nothing, 'dots' saves matmul outputs, 'offload' saves them too but in pinned host
    memory (copied out in the forward, back in the backward): dots' recompute savings at full's
    device memory, where host memory is separate from the device's (GPU, TPU).
    """
    if name == "offload":
        platform = platform or jax.default_backend()
        if platform not in _OFFLOAD_PLATFORMS:
            runnable = [p for p in REMAT_POLICIES if p not in ("offload", "none")]
            raise ValueError(
                f"remat='offload' needs a device with its own memory ({'/'.join(_OFFLOAD_PLATFORMS)}); on "
                f"{platform} activations already live in host memory: use remat in {runnable} (or 'none')"
            )
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


class WanAttention(nn.Module):
    """Multi-head attention with RMS-norm on merged q/k heads; self (with RoPE) or cross to text."""

    cfg: DiTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        cos: jax.Array | None = None,
        sin: jax.Array | None = None,
    ) -> jax.Array:
        """x [batch, tokens, embed] attends to itself (context None) or to context [batch, L, embed]."""
        cfg = self.cfg
        dense = functools.partial(Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        kv_len_name = "length" if context is None else "text_length"
        kv_in = x if context is None else context
        q = dense(cfg.hidden_size, ("embed", "heads"), name="to_q")(x)  # [batch, tokens, heads*head_dim]
        k = dense(cfg.hidden_size, ("embed", "heads"), name="to_k")(kv_in)  # [batch, kv_len, heads*head_dim]
        v = dense(cfg.hidden_size, ("embed", "heads"), name="to_v")(kv_in)
        if cfg.qk_norm:
            # Wan normalises over all heads at once (not per head), before splitting them.
            norm = functools.partial(RMSNorm, epsilon=cfg.eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
            q = norm(name="norm_q")(q)
            k = norm(name="norm_k")(k)
        split = lambda a: a.reshape(*a.shape[:2], cfg.num_attention_heads, cfg.attention_head_dim)
        q, k, v = split(q), split(k), split(v)  # [batch, len, heads, head_dim]
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        k = nn.with_logical_constraint(k, ("batch", kv_len_name, "act_heads", None))
        v = nn.with_logical_constraint(v, ("batch", kv_len_name, "act_heads", None))
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(
            q, k, v, context_mask, backend=cfg.attention, q_block=cfg.attention_q_block,
            kv_block=cfg.attention_kv_block,
        )  # [batch, tokens, heads, head_dim]
        out = out.reshape(*out.shape[:2], cfg.hidden_size)
        return dense(cfg.hidden_size, ("heads", "embed"), name="to_out")(out)


class FeedForward(nn.Module):
    """Linear -> tanh-GELU -> Linear."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [batch, tokens, embed] -> [batch, tokens, embed]."""
        cfg = self.cfg
        dense = functools.partial(Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = dense(cfg.ffn_dim, ("embed", "mlp"), name="proj_in")(x)  # [batch, tokens, mlp]
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        h = jax.nn.gelu(h, approximate=True)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="proj_out")(h)


class DiTBlock(nn.Module):
    """Wan transformer block; signature `(x, ...) -> (x, None)` so it scans over layers."""

    cfg: DiTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        context_mask: jax.Array | None,
        timestep_proj: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        video_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        """x [batch, tokens, embed], context [batch, L, embed], timestep_proj [batch, 1 or tokens, 6, embed]."""
        cfg, dim, f32 = self.cfg, self.cfg.hidden_size, jnp.float32
        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(nn.initializers.normal(dim**-0.5), (None, "modulation", "embed")),
            (1, 6, dim),
            cfg.param_dtype,
        )
        # Modulation stays in float32 (the reference keeps the table in fp32 and upcasts temb).
        mod = table.astype(f32)[:, None] + timestep_proj.astype(f32)  # [batch, 1 or tokens, 6, embed]
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (mod[:, :, i] for i in range(6))

        h = LayerNormFP32(cfg.eps, name="norm1")(x) * (1 + scale_msa) + shift_msa
        h = WanAttention(cfg, name="attn1")(h.astype(cfg.dtype), context_mask=video_mask, cos=cos, sin=sin)
        x = (x.astype(f32) + h * gate_msa).astype(cfg.dtype)

        h = x
        if cfg.cross_attn_norm:
            h = LayerNormFP32(cfg.eps, use_affine=True, param_dtype=cfg.param_dtype, name="norm2")(x)
        x = x + WanAttention(cfg, name="attn2")(h.astype(cfg.dtype), context, context_mask)

        h = LayerNormFP32(cfg.eps, name="norm3")(x) * (1 + c_scale) + c_shift
        h = FeedForward(cfg, name="ffn")(h.astype(cfg.dtype))
        x = (x.astype(f32) + h.astype(f32) * c_gate).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, None


class PatchEmbed(nn.Module):
    """Non-overlapping Conv3d (kernel = stride = patch) as a patchify reshape plus one einsum."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        """latents [batch, T, H, W, C] -> tokens [batch, T'·H'·W', embed] (row-major t, h, w)."""
        cfg = self.cfg
        (pt, ph, pw), (b, t, h, w, c) = cfg.patch_size, latents.shape
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4),
                (None, None, None, "channels", "embed"),
            ),
            (pt, ph, pw, c, cfg.hidden_size),
            cfg.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            (cfg.hidden_size,), cfg.param_dtype,
        )
        x = latents.astype(cfg.dtype).reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
        x = jnp.einsum(
            "btihjwkc,ijkcd->bthwd", x, kernel.astype(cfg.dtype)
        )  # [batch, T', H', W', embed]
        x = x + bias.astype(cfg.dtype)
        return x.reshape(b, -1, cfg.hidden_size)


class DiT(nn.Module):
    """Diffusion Transformer: (latents, timesteps, text) -> prediction, channels-last."""

    cfg: DiTConfig

    @nn.compact
    def __call__(
        self,
        latents: jax.Array,
        timesteps: jax.Array,
        text: jax.Array,
        text_mask: jax.Array | None = None,
        video_mask: jax.Array | None = None,
    ) -> jax.Array:
        """latents [B,T,H,W,C], timesteps [B] in [0,1000], text [B,L,D], mask [B,L] -> [B,T,H,W,out] f32.

        timesteps may also be per latent cell, [B, T, H, W]: each token is then modulated by its own
        timestep, the largest of its patch's cells (Wan2.2 TI2V's per-token timesteps; a token is
        at 0 only if all its cells are). Frame-conditioned models feed their given cells at 0.
        video_mask [B, T'·H'·W'] (or [B, T', H', W']) marks real video tokens; padded ones are
        dropped as self-attention keys (their own outputs are junk for the loss to mask out).
        """
        cfg, dim = self.cfg, self.cfg.hidden_size
        grid = validate_latent_grid(cfg, latents.shape)
        b = latents.shape[0]
        if video_mask is not None:
            if video_mask.shape not in ((b, math.prod(grid)), (b, *grid)):
                raise ValueError(
                    f"video_mask has shape {tuple(video_mask.shape)}; expected [batch, tokens]="
                    f"{(b, math.prod(grid))} or the token grid {(b, *grid)} (latent grid / patch_size)"
                )
            video_mask = video_mask.reshape(b, -1)
        dense = functools.partial(Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        small = nn.initializers.normal(0.02)

        x = PatchEmbed(cfg, name="patch_embedding")(latents)  # [batch, tokens, embed]
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        # Time MLP in float32 (the reference keeps time_embedder in fp32), then model dtype.
        times = token_timesteps(timesteps, latents.shape[:4], cfg.patch_size)  # [batch, 1 or tokens]
        temb = timestep_embedding(times.reshape(-1), cfg.freq_dim).reshape(*times.shape, cfg.freq_dim)
        temb = Dense(dim, (None, "embed"), kernel_init=small, name="time_embedding_1")(temb)
        temb = Dense(dim, ("mlp", "embed"), kernel_init=small, name="time_embedding_2")(nn.silu(temb))
        temb = temb.astype(cfg.dtype)  # [batch, 1 or tokens, embed]
        timestep_proj = dense(6 * dim, ("embed", "mlp"), name="time_projection")(nn.silu(temb))
        timestep_proj = timestep_proj.reshape(*times.shape, 6, dim)  # [batch, 1 or tokens, 6, embed]
        if times.shape[1] > 1:  # per-token modulation is as long as the sequence: shard it like x
            timestep_proj = nn.with_logical_constraint(timestep_proj, ("batch", "length", None, "act_embed"))

        context = dense(dim, ("text_embed", "embed"), kernel_init=small, name="text_embedding_1")(text)
        context = dense(dim, ("mlp", "embed"), kernel_init=small, name="text_embedding_2")(
            jax.nn.gelu(context, approximate=True)
        )  # [batch, L, embed]
        context = nn.with_logical_constraint(context, ("batch", "text_length", "act_embed"))

        cos, sin = rope_freqs_3d(cfg.attention_head_dim, grid, cfg.rope_max_seq_len)  # [tokens, head_dim]
        cos, sin = jnp.asarray(cos), jnp.asarray(sin)

        block = DiTBlock
        if cfg.remat != "none":
            # prevent_cse only matters outside scan; inside it just blocks useful fusions.
            block = nn.remat(block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 6,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="blocks")
            x, _ = blocks(x, context, text_mask, timestep_proj, cos, sin, video_mask)
        else:
            for i in range(cfg.num_layers):
                x, _ = block(cfg, name=f"blocks_{i}")(
                    x, context, text_mask, timestep_proj, cos, sin, video_mask
                )

        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(nn.initializers.normal(dim**-0.5), (None, "modulation", "embed")),
            (1, 2, dim),
            cfg.param_dtype,
        )
        mod = table.astype(jnp.float32)[:, None] + temb.astype(jnp.float32)[:, :, None]  # [batch, 1|tokens, 2, embed]
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        x = (LayerNormFP32(cfg.eps, name="norm_out")(x) * (1 + scale) + shift).astype(cfg.dtype)
        patch_volume = math.prod(cfg.patch_size)
        # Zero-init head (as Wan) so a fresh model predicts 0 and training starts from a flat loss.
        x = dense(cfg.out_channels * patch_volume, ("embed", None), kernel_init=nn.initializers.zeros_init(),
                  name="proj_out")(x)  # [batch, tokens, pt*ph*pw*out]
        return unpatchify(x, grid, cfg.patch_size).astype(jnp.float32)


def token_timesteps(timesteps: jax.Array, cells: Sequence[int], patch_size: Sequence[int]) -> jax.Array:
    """Timesteps [B] or per latent cell [B, T, H, W] -> [B, 1] or per token [B, tokens] (max over a patch)."""
    t = jnp.asarray(timesteps, jnp.float32)
    b = cells[0]
    if t.ndim <= 1:
        return jnp.broadcast_to(t, (b,))[:, None]
    if tuple(t.shape) != tuple(cells):
        raise ValueError(f"timesteps of shape {tuple(t.shape)} fit neither [batch]={(b,)} nor the latent cells "
                         f"{tuple(cells)}; pass one timestep per example or one per latent cell")
    (pt, ph, pw), (_, tt, hh, ww) = patch_size, cells
    t = t.reshape(b, tt // pt, pt, hh // ph, ph, ww // pw, pw)
    return t.max(axis=(2, 4, 6)).reshape(b, -1)


def unpatchify(x: jax.Array, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> jax.Array:
    """Tokens [batch, T'·H'·W', pt·ph·pw·C] (C fastest, as Wan's proj_out) -> [batch, T, H, W, C]."""
    (t, h, w), (pt, ph, pw) = grid, patch_size
    b = x.shape[0]
    x = x.reshape(b, t, h, w, pt, ph, pw, -1)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7))  # [batch, T', pt, H', ph, W', pw, C]
    return x.reshape(b, t * pt, h * ph, w * pw, -1)


@dataclasses.dataclass(frozen=True)
class DiTDenoiser:
    """Hashable (params, x_t, t, text, mask) -> velocity wrapper, so samplers can jit over it."""

    cfg: DiTConfig

    def __call__(self, params, x, t, text, text_mask) -> jax.Array:
        return DiT(self.cfg).apply(params, x, t, text, text_mask)
