"""Continuations of many token prefixes, generated in fixed-shape chunks so one program serves every chunk."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from jaxreason import sharding
from jaxreason.distributed import addressable
from jaxreason.models.kv_cache import KVCache
from jaxreason.models.llama import CausalLM
from jaxreason.sampling.alignment import right_align
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
    mesh: Mesh | None = None,
) -> list[np.ndarray]:
    """One sampled continuation per prefix: the new token ids (EOS included when drawn), [length] int32 each.

    Row i draws with `fold_in(key, i)`, so the result does not depend on `chunk_rows`. Every chunk has
    `chunk_rows` rows (the last is filled with copies) and the width of the longest prefix, rounded up to
    64: one compiled program per call. With `mesh`, the weights are sharded by the rules and each chunk, rounded
    up to a multiple of the mesh's batch devices, is split over them (`generate`): the same tokens.
    """
    if not prefixes:
        return []
    width = -(-max(len(p) for p in prefixes) // 64) * 64
    rows = sharding.split_rows(min(chunk_rows, len(prefixes)), mesh)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(np.arange(len(prefixes)))
    out: list[np.ndarray] = []
    with progress(len(prefixes), description=description) as bar:
        for start in range(0, len(prefixes), rows):
            chunk = list(prefixes[start:start + rows])
            real = len(chunk)
            chunk += [chunk[-1]] * (rows - real)
            tokens, mask = pad_left(chunk, pad_id, multiple=width)
            keys = row_keys[np.minimum(np.arange(start, start + rows), len(prefixes) - 1)]
            result = generate(model, tokens, mask, keys, config, eos_ids=eos_ids, pad_id=pad_id, mesh=mesh)
            # addressable: weights split over the processes of a multi-host job may leave the rows split too
            new, lengths = (np.asarray(x) for x in addressable((result.tokens, result.lengths)))
            out.extend(new[i, :lengths[i]] for i in range(real))
            bar.update(real)
    return out


def read_after_prompts(model: CausalLM, prompts: KVCache, prompt_last: Float[Array, "B E"], tokens: Int[Array, "B L"],
                       length: Int[Array, " B"], width: int, *, pad_id: int, room: int = 0):
    """Each row's prefilled prompt (`prompts`, [B, P] filled to P), then its first `length` tokens of `tokens`
    (left-aligned; their last `width` are read) on top: the cache, with `room` free slots after them, and the
    next-token logits [B, V] (after the prompt alone where length is 0: `prompt_last`, its last hidden state).
    Continuations of many prefixes of one prompt pay for that prompt once."""
    p = prompts.k.shape[3]
    steps, mask = right_align(tokens, length, pad_id, width)
    cache = KVCache.init(model.config, tokens.shape[0], p + width + room, dtype=prompts.k.dtype)
    cache = cache.replace(k=cache.k.at[:, :, :, :p].set(prompts.k), v=cache.v.at[:, :, :, :p].set(prompts.v),
                          mask=cache.mask.at[:, :p].set(prompts.mask), index=jnp.asarray(p, jnp.int32))
    hidden, cache = model.transformer(steps, mask, cache=cache)
    last = jnp.where((length > 0)[:, None], hidden[:, -1], prompt_last)
    return cache, model.logits_from_hidden(last[:, None])[:, 0]
