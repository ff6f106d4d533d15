"""V-STaR's verifier data: (correct, incorrect) pairs of solutions to the same problem, with the reference model's
log-probability of each, ready for DPO.

A problem whose samples are all correct or all incorrect gives no pair; such problems are counted, not an error.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreason.data.trace_store import FLAG_CORRECT, Trace, pad_traces
from jaxreason.distributed import addressable
from jaxreason.models.lora import lora_disabled
from jaxreason.sampling.buckets import round_up
from jaxreason.train.losses import sequence_logprob


@dataclasses.dataclass(frozen=True)
class Pair:
    chosen: Trace  # a correct solution
    rejected: Trace  # an incorrect solution of the same problem
    ref_chosen: float = 0.0  # log pi_ref(chosen solution | prompt)
    ref_rejected: float = 0.0


def preference_pairs(traces: Sequence[Trace], max_per_problem: int, seed: int) -> tuple[list[Pair], dict]:
    """Up to `max_per_problem` distinct (correct, incorrect) pairs per problem, drawn at random from all of its
    correct x incorrect combinations of distinct solutions; and counts: problems, problems_with_pairs,
    only_correct, only_incorrect, pairs."""
    if max_per_problem < 1:
        raise ValueError(f"max_per_problem must be >= 1, got {max_per_problem}")
    by_problem: dict[int, dict[bool, dict[bytes, Trace]]] = defaultdict(lambda: {True: {}, False: {}})
    for t in traces:
        by_problem[t.problem_id][bool(t.flags & FLAG_CORRECT)].setdefault(np.asarray(t.tokens).tobytes(), t)
    rng = np.random.default_rng(seed)
    pairs, counts = [], {"problems": len(by_problem), "problems_with_pairs": 0, "only_correct": 0,
                         "only_incorrect": 0}
    for pid in sorted(by_problem):
        good, bad = list(by_problem[pid][True].values()), list(by_problem[pid][False].values())
        if not good or not bad:
            counts["only_correct" if good else "only_incorrect"] += 1
            continue
        counts["problems_with_pairs"] += 1
        n = min(max_per_problem, len(good) * len(bad))
        for flat in rng.choice(len(good) * len(bad), n, replace=False):
            pairs.append(Pair(good[flat // len(bad)], bad[flat % len(bad)]))
    counts["pairs"] = len(pairs)
    return pairs, counts


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sequence_logprobs(graphdef, state, tokens, attention_mask, loss_mask):
    model = nnx.merge(graphdef, state)
    return sequence_logprob(model(tokens, attention_mask), tokens, loss_mask)


def with_reference(pairs: Sequence[Pair], reference, max_len: int, pad_id: int, chunk_rows: int = 64) -> list[Pair]:
    """The pairs with log pi_ref of each solution given its prompt, from the `reference` model with any LoRA
    adapters off (one jitted forward per chunk of `chunk_rows` rows; the last chunk is filled with copies)."""
    rows = [t for p in pairs for t in (p.chosen, p.rejected)]
    if not rows:
        return []
    too_long = [t for t in rows if len(t.tokens) > max_len]
    if too_long:
        raise ValueError(f"a solution of problem {too_long[0].problem_id} has {len(too_long[0].tokens)} tokens, "
                         f"more than max_len = {max_len}: raise the verifier's max_len")
    width = min(round_up(max(len(t.tokens) for t in rows), 16), max_len)
    with lora_disabled(reference):  # a LoRA model's reference is its base
        graphdef, state = nnx.split(reference)
    out = []
    for start in range(0, len(rows), chunk_rows):
        chunk = list(rows[start:start + chunk_rows])
        real = len(chunk)
        batch = pad_traces(chunk + chunk[-1:] * (chunk_rows - real), width, pad_id)
        logp = _sequence_logprobs(graphdef, state, jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]),
                                  jnp.asarray(batch["loss_mask"]))
        out.append(np.asarray(addressable(logp))[:real])  # the reference may be split over the processes
    logp = np.concatenate(out)
    return [dataclasses.replace(p, ref_chosen=float(logp[2 * i]), ref_rejected=float(logp[2 * i + 1]))
            for i, p in enumerate(pairs)]


def pair_batch(pairs: Sequence[Pair], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The batch of `train.objectives.dpo_objective`: chosen_* and rejected_* tokens, attention_mask and
    loss_mask [B, max_len] (the solutions as generated: no EOS is added), ref_chosen and ref_rejected [B]."""
    out = {}
    for side in ("chosen", "rejected"):
        batch = pad_traces([getattr(p, side) for p in pairs], max_len, pad_id)
        out.update({f"{side}_{k}": batch[k] for k in ("tokens", "attention_mask", "loss_mask")})
        out[f"ref_{side}"] = np.asarray([getattr(p, f"ref_{side}") for p in pairs], np.float32)
    return out
