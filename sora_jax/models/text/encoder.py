"""Frozen text encoder: BERT module + params + tokenizer behind one jitted `encode`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models.text.bert import BertConfig, BertEncoder
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
