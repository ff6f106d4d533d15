"""Compiled sizes: a jitted program holds one copy of a computation per size and runs the smallest that fits.

Expansions of a search (rows to expand, steps' width), packed prefills (real tokens) and a shrinking decode
(live rows) all do this: a few static sizes, a `lax.switch` to the smallest that holds what is needed, the
rows gathered into it and the results scattered back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

T = TypeVar("T")


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n: a static size shared by every input up to it."""
    return -(-n // multiple) * multiple


def batch_sizes(batch: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """`batch` and these fractions of it, rounded up, descending and distinct: the batch sizes to compile for.

    Below 8 rows only `batch`: a step's cost hardly depends on its rows there, and each size is another copy of
    the computation in the program (compile time).
    """
    if batch < 8:
        return (batch,)
    return tuple(sorted({batch, *(math.ceil(f * batch) for f in fractions)}, reverse=True))


def smallest_fit(sizes: Sequence[int], needed: Int[Array, ""], run: Callable[[int], T]) -> T:
    """`run(size)` for the smallest of `sizes` that is >= `needed` (the largest when none is): one compiled
    branch per size, chosen at run time."""
    sizes = sorted(set(sizes))
    if len(sizes) == 1:
        return run(sizes[0])
    index = jnp.minimum(jnp.sum(jnp.asarray(sizes[:-1]) < needed), len(sizes) - 1)
    return jax.lax.switch(index, [functools.partial(run, s) for s in sizes])


def take_rows(tree: T, rows: Int[Array, " R"]) -> T:
    """Rows `rows` of every leaf (leading axis)."""
    return jax.tree.map(lambda x: x[rows], tree)


def put_rows(full: T, rows: Int[Array, " R"], part: T) -> T:
    """`full` with row rows[i] of every leaf replaced by row i of `part`; an index past the end is dropped."""
    return jax.tree.map(lambda f, p: f.at[rows].set(p, mode="drop"), full, part)
