"""WordTokenizer: a word-level vocabulary built from the training captions; no files, no downloads.

    tok = WordTokenizer(["a red square", "a blue circle"])
    ids, keep = tok(["a red square", ""], max_len=6)     # (2, 6) int64 ids, (2, 6) bool: True = real token
Every caption starts with [CLS] (so even the empty caption, the "no text" condition of classifier-free
guidance, has one real token); words are lower-cased and split on spaces; unknown words map to
[UNK]; captions are padded with [PAD] (keep = False) or cut to max_len.
"""
from __future__ import annotations

from typing import Iterable

import torch

PAD, CLS, UNK = "[PAD]", "[CLS]", "[UNK]"


class WordTokenizer:
    def __init__(self, captions: Iterable[str]):
        words = sorted({w for caption in captions for w in caption.lower().split()})
        self.vocab = [PAD, CLS, UNK] + words
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise TypeError("WordTokenizer: pass a list of captions, not one string")
        if max_len < 1:
            raise ValueError(f"WordTokenizer: max_len must be >= 1 (room for [CLS]), got {max_len}")
        ids = torch.full((len(captions), max_len), self.index[PAD], dtype=torch.int64)
        for row, caption in enumerate(captions):
            tokens = [CLS] + caption.lower().split()
            tokens = tokens[:max_len]
            ids[row, :len(tokens)] = torch.tensor([self.index.get(w, self.index[UNK]) for w in tokens])
        return ids, ids != self.index[PAD]
