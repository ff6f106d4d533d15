"""What a generative verifier (GenRM) reads and trains on: the verification prompt's token ids, and the rows of
its objective (`jaxreason.train.objectives.generative_verifier_objective`).

A verification row is the solution as it was generated, then the question, then the verdict:

    prompt  solution  [intro  rationale  EOS]  question  verdict          (CoT: the bracketed part)

The verdict is the first token of `VerdictFormat.yes_text` or `.no_text`, so the verifier's score is P(Yes) in the slot
right after the question (`GenerativeVerifier` reads it there). In the CoT variant the verifier first solves the
problem itself: its training rationale is the task's reference solution (the paper's rationales come from a
larger model given the reference; here the reference is the rationale), and at test time it samples its own. A
solution row (prompt, a correct solution) carries the paper's SFT term, weighted lambda.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxreason.data.trace_store import FLAG_CORRECT, Trace, check_lengths
from jaxreason.tasks.base import Problem, Task


@dataclasses.dataclass(frozen=True)
class VerdictFormat:
    """The verification prompt. `yes_text` and `no_text` must start with different tokens (their first tokens are
    the verdicts): " Yes" / " No" for BPE vocabularies; "Yes" / "No" after a question that ends with a space for a
    character vocabulary. (Not `yes:` / `no:`: YAML reads those keys as booleans.)"""

    question: str = "\nIs the answer correct? (Yes/No)"
    yes_text: str = " Yes"
    no_text: str = " No"
    intro: str = "\nLet me solve it myself.\n"  # CoT: what comes before the verifier's own solution


@dataclasses.dataclass(frozen=True)
class VerdictIds:
    question: tuple[int, ...]
    yes: int
    no: int
    intro: tuple[int, ...]


def verdict_ids(tokenizer, fmt: VerdictFormat) -> VerdictIds:
    """The token ids of the verification prompt; an error names a format whose verdicts are not told apart."""
    encode = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))
    question, yes, no = encode(fmt.question), encode(fmt.yes_text), encode(fmt.no_text)
    if not question or not yes or not no:
        raise ValueError(f"verdict format: question {fmt.question!r}, yes_text {fmt.yes_text!r} and no_text "
                         f"{fmt.no_text!r} must each encode to at least one token")
    if yes[0] == no[0]:
        raise ValueError(f"verdict format: yes_text {fmt.yes_text!r} and no_text {fmt.no_text!r} start with the same "
                         f"token ({yes[0]}); the verdict is their first token")
    return VerdictIds(question, yes[0], no[0], encode(fmt.intro))


@dataclasses.dataclass(frozen=True)
class VerifierExample:
    """One row of the objective: `tokens` [T]; `verdict_position` the verdict's index (0: a solution row);
    `label` whether the solution is correct; `targets` (start, end): the trained tokens (rationale or solution)."""

    tokens: np.ndarray
    verdict_position: int
    label: bool
    targets: tuple[int, int] | None


def verification_examples(traces: Sequence[Trace], ids: VerdictIds, *, rationales: Sequence[Sequence[int]] | None
                          = None, eos_id: int | None = None) -> list[VerifierExample]:
    """A verification row per trace (its tokens as generated, then the question and the verdict its FLAG_CORRECT
    says); with `rationales` (one per trace: the ids of a solution of its problem), the CoT row, whose rationale
    ends with `eos_id` as a sampled one does."""
    out = []
    for i, t in enumerate(traces):
        label = bool(t.flags & FLAG_CORRECT)
        head = np.asarray(t.tokens, np.int32)
        targets = None
        if rationales is not None:
            if eos_id is None:
                raise ValueError("CoT rows need the eos_id that ends a rationale")
            start = len(head) + len(ids.intro)
            head = np.concatenate([head, ids.intro, rationales[i], [eos_id]]).astype(np.int32)
            targets = (start, len(head))
        verdict = len(head) + len(ids.question)
        tokens = np.concatenate([head, ids.question, [ids.yes if label else ids.no]]).astype(np.int32)
        out.append(VerifierExample(tokens, verdict, label, targets))
    return out


def solution_examples(traces: Sequence[Trace]) -> list[VerifierExample]:
    """A solution row (SFT on the solution) per correct trace."""
    return [VerifierExample(np.asarray(t.tokens, np.int32), 0, True, (t.prompt_len, len(t.tokens)))
            for t in traces if t.flags & FLAG_CORRECT]


def reference_rationales(task: Task, tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """The ids of each problem's reference solution: the CoT verifier's training rationale."""
    return [tokenizer.encode(task.format_solution(p.solution_steps, p.answer), add_special_tokens=False)
            for p in problems]


def verification_batch(examples: Sequence[VerifierExample], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """tokens, attention_mask, rationale_mask, solution_mask [B, max_len] (right-padded; a mask lies on its target
    tokens), verdict_position [B], label [B]. A row longer than `max_len` is a `TooLongError`."""
    b = len(examples)
    tokens = np.full((b, max_len), pad_id, np.int32)
    attention = np.zeros((b, max_len), np.int32)
    rationale, solution = np.zeros((b, max_len), np.int32), np.zeros((b, max_len), np.int32)
    check_lengths([len(e.tokens) for e in examples], max_len, "verifier training row(s)")
    for i, e in enumerate(examples):
        tokens[i, :len(e.tokens)] = e.tokens
        attention[i, :len(e.tokens)] = 1
        if e.targets is not None:
            (rationale if e.verdict_position else solution)[i, e.targets[0]:e.targets[1]] = 1
    return {"tokens": tokens, "attention_mask": attention, "rationale_mask": rationale, "solution_mask": solution,
            "verdict_position": np.asarray([e.verdict_position for e in examples], np.int32),
            "label": np.asarray([e.label for e in examples], bool)}
