"""Data: the append-only tensorstore trace store of search and sampling traces, and training batches from it."""

from jaxreason.data.batching import shuffled_batches
from jaxreason.data.trace_batches import sft_batch, value_batch
from jaxreason.data.trace_store import (
                                        FLAG_BASELINE,
                                        FLAG_CORRECT,
                                        FLAG_EVAL,
                                        FLAG_ROLLOUT,
                                        FLAG_SEARCH,
                                        Trace,
                                        TraceStore,
                                        pad_traces,
)

__all__ = [
    "FLAG_BASELINE", "FLAG_CORRECT", "FLAG_EVAL", "FLAG_ROLLOUT", "FLAG_SEARCH", "Trace", "TraceStore", "pad_traces",
    "sft_batch", "shuffled_batches", "value_batch",
]
