"""Turning prompt texts into the left-padded id batches `generate` takes, and completions back into text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxreason.sampling.generate import GenerateOutput


def pad_left(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads id lists to a common length rounded up to `multiple` (so nearby lengths share a compile).

    Returns:
      tokens: [B, P] int32; mask: [B, P] int32, 1 for real tokens.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    length = -(-max(len(r) for r in rows) // multiple) * multiple
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return tokens, mask


def encode_prompts(tokenizer, texts: Sequence[str], *, chat: bool = False, multiple: int = 16):
    """Tokenizes prompts (through the chat template when `chat`) into a left-padded [B, P] batch."""
    if chat:
        rows = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
            for t in texts
        ]
        ids = [tokenizer.encode(r, add_special_tokens=False) for r in rows]
    else:
        ids = [tokenizer.encode(t) for t in texts]
    return pad_left(ids, pad_token_id(tokenizer), multiple)


def eos_ids(tokenizer, model_config) -> tuple[int, ...]:
    """The ids that end a solution, the one rule every sampler uses: the tokenizer's EOS and the model config's
    (an instruct model's end-of-turn token, say), sorted."""
    ids = {int(i) for i in model_config.eos_token_ids}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def decode_completions(tokenizer, output: GenerateOutput, skip_special_tokens: bool = True) -> list[str]:
    """The text of each row's new tokens, up to its length."""
    tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
    return [tokenizer.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=skip_special_tokens)
            for i in range(len(lengths))]


def prompt_ids(tokenizer, text: str, *, chat: bool = False) -> list[int]:
    """The ids a solution is appended to: `text` as is, or wrapped as a user turn by the chat template.

    No special tokens are added, so the ids of prompt + solution are the ids of the concatenated texts.
    """
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)
