"""Continuations of many token prefixes, generated in fixed-shape chunks so one program serves every chunk."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jaxreason.models.llama import CausalLM
from jaxreason.sampling.generate import SamplingConfig, generate
from jaxreason.sampling.prompts import pad_left
from jaxreason.train.metrics import progress


def sample_continuations(
    model: CausalLM,
    prefixes: Sequence[Sequence[int]],
    key: jax.Array,
    config: SamplingConfig,
    *,
    eos_ids: tuple[int, ...],
    pad_id: int,
    chunk_rows: int = 256,
    description: str = "sampling",
) -> list[np.ndarray]:
    """One sampled continuation per prefix: the new token ids (EOS included when drawn), [length] int32 each.

    Row i draws with `fold_in(key, i)`, so the result does not depend on `chunk_rows`. Every chunk has
    `chunk_rows` rows (the last is filled with copies) and the width of the longest prefix, rounded up to
    64: one compiled program per call.
    """
    if not prefixes:
        return []
    width = -(-max(len(p) for p in prefixes) // 64) * 64
    rows = min(chunk_rows, len(prefixes))
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(np.arange(len(prefixes)))
    out: list[np.ndarray] = []
    with progress(len(prefixes), description=description) as bar:
        for start in range(0, len(prefixes), rows):
            chunk = list(prefixes[start:start + rows])
            real = len(chunk)
            chunk += [chunk[-1]] * (rows - real)
            tokens, mask = pad_left(chunk, pad_id, multiple=width)
            keys = row_keys[np.minimum(np.arange(start, start + rows), len(prefixes) - 1)]
            result = generate(model, tokens, mask, keys, config, eos_ids=eos_ids, pad_id=pad_id)
            new, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
            out.extend(new[i, :lengths[i]] for i in range(real))
            bar.update(real)
    return out
