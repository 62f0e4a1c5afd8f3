"""Frozen text encoders behind one jitted `encode`: BERT (our training runs) and umT5/T5 (converted Wan pipelines)."""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models.text.bert import BertConfig, BertEncoder
from sora_jax.models.text.t5 import T5Config, T5Encoder
from sora_jax.models.text.tokenizer import TextTokenizer

EMPTY_PROMPT_MESSAGE = 'empty prompt: pass a non-empty text prompt (e.g. --prompt "two balls, red and blue")'


def check_prompts(prompts: Sequence[str] | str | None) -> list[str]:
    """Return prompts as a list, raising the one-line empty-prompt error if any is blank."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError(EMPTY_PROMPT_MESSAGE)
    return prompts


@dataclasses.dataclass
class TextEncoder:
    """Frozen BERT text encoder: prompts -> (embeddings [B, L, hidden] f32, mask [B, L] bool)."""

    config: BertConfig
    params: Any  # {'params': ...} of BertEncoder, plain (unboxed) arrays
    tokenizer: TextTokenizer
    _apply: Callable = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        module = BertEncoder(self.config)

        def apply(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
            h = module.apply(params, ids, mask).astype(jnp.float32)  # [batch, length, embed]
            # Zero padded positions so consumers that ignore the mask still see no pad content.
            return h * mask[..., None].astype(jnp.float32)

        # Shapes are fixed by the tokenizer's max_length, so this compiles once per batch size.
        self._apply = jax.jit(apply)

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings."""
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        """Number of text tokens per prompt."""
        return self.tokenizer.max_length

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Validate prompts and return `(ids, mask)` int32 `[batch, max_length]`."""
        return self.tokenizer(check_prompts(prompts))

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Encode prompts to `(emb float32 [B, max_length, hidden], mask bool [B, max_length])`."""
        ids, mask = self.tokenize(prompts)
        emb = self._apply(self.params, jnp.asarray(ids), jnp.asarray(mask))
        return emb, jnp.asarray(mask, dtype=bool)

    def pooled(self, prompts: Sequence[str]) -> jax.Array:
        """Mean of the token embeddings over unmasked positions, float32 `[B, hidden]`."""
        emb, mask = self.encode(prompts)
        m = mask[..., None].astype(jnp.float32)
        return (emb * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def wan_prompt_clean(text: str) -> str:
    """diffusers WanPipeline's `prompt_clean`: ftfy (when installed), double HTML unescape, collapse whitespace."""
    try:
        import ftfy  # optional, as in diffusers; without it both sides skip the same step
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclasses.dataclass
class T5TextEncoder:
    """Frozen umT5/T5 encoder with WanPipeline's prompt handling: prompts -> (emb [B, L, d_model], mask [B, L]).

    Like diffusers' `_get_t5_prompt_embeds`, every prompt is padded/truncated to `max_length` tokens,
    encoded, and its embeddings past its real length are zeroed. The returned mask is all True: Wan's
    DiT cross-attends to those zero rows too (they become its text projection's bias), so masking
    them out would change the result.
    """

    config: T5Config
    params: Any  # {'params': ...} of T5Encoder
    tokenizer_dir: Path
    max_length: int = 512
    _apply: Callable = dataclasses.field(init=False, repr=False, compare=False)
    _tokenizers: dict = dataclasses.field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        module = T5Encoder(self.config)

        def apply(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
            h = module.apply(params, ids, mask).astype(jnp.float32)
            return h * mask[..., None].astype(jnp.float32)  # cut to the real length, zero-padded back

        self._apply = jax.jit(apply)

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings."""
        return self.config.d_model

    def tokenize(self, prompts: Sequence[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cleaned prompts -> `(ids, mask)` int32 `[batch, max_length]`; empty prompts are allowed (negative prompt "")."""
        from sora_jax.convert.t5 import load_t5_tokenizer  # tokenizer.json reader; convert imports models

        n = max_length or self.max_length
        if n not in self._tokenizers:
            self._tokenizers[n] = load_t5_tokenizer(self.tokenizer_dir, max_length=n)
        return self._tokenizers[n]([wan_prompt_clean(p) for p in prompts])

    def encode(self, prompts: Sequence[str], max_length: int | None = None) -> tuple[jax.Array, jax.Array]:
        """Encode prompts to `(emb float32 [B, L, d_model], mask bool [B, L], all True)`."""
        ids, mask = self.tokenize(prompts, max_length)
        emb = self._apply(self.params, jnp.asarray(ids), jnp.asarray(mask))
        return emb, jnp.ones(ids.shape, bool)
