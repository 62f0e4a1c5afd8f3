"""Precomputed DiT inputs: VAE latents and text embeddings, encoded once, read back through grain."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import grain
import jax
import numpy as np

from sora_jax.data.pipeline import numpy_batch
from sora_jax.models.vae import CausalVAE, normalize_latents


@dataclasses.dataclass
class LatentCache:
    """Normalised latents per clip plus one text embedding per distinct caption."""

    latents: np.ndarray  # [clips, t, h, w, z] float32
    caption_index: np.ndarray  # [clips] int32 -> row of text
    text: np.ndarray  # [captions, text_len, text_dim] float32
    text_mask: np.ndarray  # [captions, text_len] bool
    captions: list[str]

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        j = int(self.caption_index[i])
        return {"latents": self.latents[i], "text": self.text[j], "text_mask": self.text_mask[j]}

    def save(self, path: Path) -> None:
        """Write atomically as one .npz."""
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, latents=self.latents, caption_index=self.caption_index, text=self.text,
                 text_mask=self.text_mask, captions=np.array(self.captions))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "LatentCache":
        """Read a cache written by save."""
        with np.load(path) as f:
            return cls(f["latents"], f["caption_index"], f["text"], f["text_mask"], [str(c) for c in f["captions"]])


def cache_key(*parts: object) -> str:
    """A short stable hash naming a cache built from these inputs."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def build_latent_cache(source, vae: CausalVAE, vae_params, text_encoder, *, batch: int = 8) -> LatentCache:
    """Encode every clip of a data source with the VAE (posterior mean) and every caption once."""
    encode = jax.jit(lambda p, v: vae.apply(p, v, method=CausalVAE.encode)[0])
    latents, captions = [], []
    for start in range(0, len(source), batch):
        items = numpy_batch(source, range(start, min(start + batch, len(source))))
        z = encode(vae_params, items["video"])
        latents.append(np.asarray(normalize_latents(z, vae.cfg), np.float32))
        captions += [str(c) for c in items["caption"]]
    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    embs, masks = [], []
    for start in range(0, len(unique), 64):
        e, m = text_encoder.encode(unique[start:start + 64])
        embs.append(np.asarray(e, np.float32))
        masks.append(np.asarray(m, bool))
    return LatentCache(
        latents=np.concatenate(latents),
        caption_index=np.array([row[c] for c in captions], np.int32),
        text=np.concatenate(embs),
        text_mask=np.concatenate(masks),
        captions=unique,
    )


def make_cache_loader(cache: LatentCache, *, batch_size: int, seed: int, worker_count: int = 0) -> grain.DataLoader:
    """Shuffled, repeating, per-process-sharded batches of cached latents."""
    sampler = grain.samplers.IndexSampler(
        num_records=len(cache),
        shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
        shuffle=True,
        num_epochs=None,
        seed=seed,
    )
    return grain.DataLoader(
        data_source=cache,
        sampler=sampler,
        operations=[grain.transforms.Batch(batch_size=batch_size, drop_remainder=True)],
        worker_count=worker_count,
    )
