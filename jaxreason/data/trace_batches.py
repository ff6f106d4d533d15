"""Training batches from traces: policy SFT on solutions, PRM regression on per-step value targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxreason.data.trace_store import FLAG_CORRECT, Trace, pad_traces


def sft_batch(traces: Sequence[Trace], max_len: int, pad_id: int, eos_id: int) -> dict[str, np.ndarray]:
    """tokens, attention_mask, loss_mask [B, max_len]: the solution tokens are trained, the prompt is not.

    A solution that does not end with `eos_id` gets one, so the policy learns where to stop.
    """
    closed = [t if len(t.tokens) and t.tokens[-1] == eos_id
              else dataclasses.replace(t, tokens=np.append(np.asarray(t.tokens, np.int32), np.int32(eos_id)))
              for t in traces]
    batch = pad_traces(closed, max_len, pad_id)
    return {k: batch[k] for k in ("tokens", "attention_mask", "loss_mask")}


def value_batch(traces: Sequence[Trace], max_len: int, pad_id: int, lm_mask: bool = False) -> dict[str, np.ndarray]:
    """tokens, attention_mask, value_targets, value_mask [B, max_len]: one target at each step's last token;
    solution_start [B]: each row's prompt length (its solution's first column); with `lm_mask`, also lm_mask
    [B, max_len]: the solution tokens of the correct traces (a PRM's LM term)."""
    batch = pad_traces(traces, max_len, pad_id)
    out = {k: batch[k] for k in ("tokens", "attention_mask", "value_targets", "value_mask")}
    out["solution_start"] = np.array([t.prompt_len for t in traces], np.int32)
    if lm_mask:
        correct = np.array([bool(t.flags & FLAG_CORRECT) for t in traces])
        out["lm_mask"] = batch["loss_mask"] * correct[:, None].astype(batch["loss_mask"].dtype)
    return out

