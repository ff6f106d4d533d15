"""Deterministic shuffled batch streams that a resumed run can re-enter at any batch position."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


def shuffled_batches(make_batch: Callable[[np.ndarray], dict[str, np.ndarray]], size: int, batch_size: int,
                     seed: int) -> Callable[[int], Iterator[dict[str, np.ndarray]]]:
    """`batches(position)` over `size` examples: epoch e is a permutation drawn from (seed, e), so a resumed
    stage sees the batches it would have seen. `make_batch(indices)` builds one batch."""
    if size < 1:
        raise ValueError("no training examples")

    def batches(start: int) -> Iterator[dict[str, np.ndarray]]:
        per_epoch = max(size // batch_size, 1)
        position = start
        while True:
            epoch, offset = divmod(position, per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(size)
            if size < batch_size:
                order = np.resize(order, batch_size)
            yield make_batch(order[offset * batch_size:(offset + 1) * batch_size])
            position += 1

    return batches
