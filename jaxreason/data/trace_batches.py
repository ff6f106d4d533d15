"""Training batches from traces: policy SFT on solutions, PRM regression on per-step value targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxreason.data.trace_store import Trace, pad_traces


def sft_batch(traces: Sequence[Trace], max_len: int, pad_id: int, eos_id: int) -> dict[str, np.ndarray]:
    """tokens, attention_mask, loss_mask [B, max_len]: the solution tokens are trained, the prompt is not.

    A solution that does not end with `eos_id` gets one, so the policy learns where to stop.
    """
    closed = [t if len(t.tokens) and t.tokens[-1] == eos_id
              else dataclasses.replace(t, tokens=np.append(np.asarray(t.tokens, np.int32), np.int32(eos_id)))
              for t in traces]
    batch = pad_traces(closed, max_len, pad_id)
    return {k: batch[k] for k in ("tokens", "attention_mask", "loss_mask")}


def value_batch(traces: Sequence[Trace], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """tokens, attention_mask, value_targets, value_mask [B, max_len]: one target at each step's last token."""
    batch = pad_traces(traces, max_len, pad_id)
    return {k: batch[k] for k in ("tokens", "attention_mask", "value_targets", "value_mask")}

