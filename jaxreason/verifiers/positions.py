"""Where a score is read: the one rule that value targets and every scoring path share.

A solution is the token ids sampled after its prompt, exactly as generated: a trailing EOS stays, since it is
what says the solution is finished. Its steps end on the token that completes the step delimiter (the byte
rule by which the sampler's stop table ends a search step), and its last step ends on its last token, the EOS
when one was drawn. The score of a step (the value of the partial solution up to and including the step) is
read at the step's last token, `score_position(step_end)`; a whole solution's score at its last step's.

Value-target batches (`jaxreason.data.trace_store.pad_traces`), the verifiers' batch scoring, best-of-N,
weighted vote, beam search and the search's node values all read through `score_position`, so a verifier is
trained at exactly the positions it is later read at.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxreason.sampling.stopping import token_byte_strings


def score_position(step_end):
    """Index of the token whose value is the score of a step that ends just before `step_end` (one past its
    last token, as `Trace.step_ends`). Works on ints and arrays alike."""
    return step_end - 1


class StepSplitter:
    """Cuts a solution's token ids into steps by the byte rule (module docstring), for one tokenizer and
    delimiter.

    Special ids (EOS, pad) add no bytes, so they never complete a delimiter; a token holding the delimiter more
    than once ends one step.
    """

    def __init__(self, tokenizer, delimiter: str):
        if not delimiter:
            raise ValueError("the step delimiter must not be empty")
        self._bytes = token_byte_strings(tokenizer)
        self._delimiter = delimiter.encode()

    def __call__(self, solution: Sequence[int], max_steps: int | None = None) -> np.ndarray:
        """[S] int32 one past the last token of each step, counted from the solution's first token; empty for an
        empty solution. Past `max_steps` steps the rest joins the last step."""
        ids = [int(t) for t in solution]
        if not ids:
            return np.zeros(0, np.int32)
        pieces = [self._bytes[t] if 0 <= t < len(self._bytes) else b"" for t in ids]
        token_of_byte = np.repeat(np.arange(len(ids)), [len(p) for p in pieces])
        text = b"".join(pieces)
        ends, start = [], 0
        while (found := text.find(self._delimiter, start)) >= 0:
            start = found + len(self._delimiter)
            end = int(token_of_byte[start - 1]) + 1
            if not ends or ends[-1] != end:
                ends.append(end)
        if not ends or ends[-1] != len(ids):
            ends.append(len(ids))
        if max_steps is not None and len(ends) > max_steps:
            ends = ends[: max_steps - 1] + ends[-1:]
        return np.asarray(ends, np.int32)

