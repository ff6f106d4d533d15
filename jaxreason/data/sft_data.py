"""Supervised fine-tuning data: JSONL {prompt, completion} records into padded token batches.

Batches are a deterministic function of (seed, position): epoch e is a permutation drawn from seed + e, so a
resumed run continues at exactly the batch it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxreason.data.batching import shuffled_batches
from jaxreason.data.jsonl import iter_records


def read_jsonl(path: str | Path, fields: Sequence[str]) -> list[dict]:
    """Records of a JSONL file, each with string `fields`; errors name the file and line."""
    records = [record for _, record in iter_records(path, tuple(fields))]
    if not records:
        raise ValueError(f"{path}: no records")
    return records


class SFTDataset:
    """Tokenized (prompt, completion) pairs; the completion (and EOS) are the trained tokens."""

    def __init__(self, tokenizer, records: Sequence[dict], max_len: int):
        self.max_len = max_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.examples = []
        for r in records:
            prompt = tokenizer.encode(r["prompt"], add_special_tokens=False)
            completion = tokenizer.encode(r["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
            if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
                prompt = [tokenizer.bos_token_id] + prompt
            self.examples.append((prompt, completion))

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """tokens, attention_mask, loss_mask: [B, max_len]; right-padded, truncated on the right."""
        b = len(indices)
        tokens = np.full((b, self.max_len), self.pad_id, np.int32)
        attention = np.zeros((b, self.max_len), np.int32)
        loss_mask = np.zeros((b, self.max_len), np.int32)
        for row, i in enumerate(indices):
            prompt, completion = self.examples[i]
            ids = (prompt + completion)[: self.max_len]
            tokens[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
            loss_mask[row, len(prompt) : len(ids)] = 1
        return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batch number `start`, `start + 1`, ... of the endless epoch-by-epoch shuffled stream."""
        return shuffled_batches(self.batch, len(self), batch_size, seed)(start)
