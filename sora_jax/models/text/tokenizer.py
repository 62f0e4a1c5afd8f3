"""Text tokenizer read from a `tokenizer.json` on disk (never from a hub)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class TextTokenizer:
    """Fixed-length tokenizer: every batch is padded/truncated to `max_length` tokens."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = 32, pad_token: str = "[PAD]") -> None:
        if max_length < 2:
            raise ValueError(f"max_length={max_length} is too short; use at least 2 (room for [CLS] and [SEP])")
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the tokenizer vocabulary; pass the model's pad token")
        self.max_length = max_length
        self.pad_id = pad_id
        # Configure a private copy so the caller's Tokenizer keeps its own padding settings.
        self._tok = Tokenizer.from_str(tokenizer.to_str())
        # The Rust truncation accounts for the special tokens the post-processor adds, as
        # transformers does with truncation=True.
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token, pad_type_id=0)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, max_length: int = 32) -> "TextTokenizer":
        """Load `tokenizer.json` (and the pad token from `special_tokens_map.json` if present)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"no tokenizer.json in {folder}; pass a folder holding a Hugging Face fast tokenizer")
        pad_token = "[PAD]"
        special = folder / "special_tokens_map.json"
        if special.is_file():
            pad = json.loads(special.read_text()).get("pad_token", pad_token)
            # Newer files store special tokens as AddedToken dicts.
            pad_token = pad["content"] if isinstance(pad, dict) else pad
        return cls(Tokenizer.from_file(str(path)), max_length=max_length, pad_token=pad_token)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize a batch into `(ids, mask)`, both int32 `[batch, max_length]`."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tok.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int32).reshape(len(encodings), self.max_length)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int32).reshape(ids.shape)
        return ids, mask
