"""How well a verifier verifies on a problem set: N samples per problem, scored, and what selecting among them
gives (`jaxreason.verifiers.metrics`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import pad_token_id, prompt_ids
from jaxreason.search.baselines import draw_solutions
from jaxreason.search.votes import group_answers
from jaxreason.tasks.base import Problem, Task
from jaxreason.verifiers.base import Verifier
from jaxreason.verifiers.batch import score_solutions
from jaxreason.verifiers.metrics import first_error_accuracy, roc_auc, selection_accuracy
from jaxreason.verifiers.positions import StepSplitter


@dataclasses.dataclass(frozen=True)
class CheckedSamples:
    """N samples of each of P problems: `prompts` [P] (ids), `samples` [P][N] (ids as generated), `texts` [P][N],
    `correct` [P, N] by the task's checker, `groups` [P, N] answer groups (`group_answers`; -1: no answer)."""

    prompts: list[list[int]]
    samples: list[list[np.ndarray]]
    texts: list[list[str]]
    correct: np.ndarray
    groups: np.ndarray


def draw_checked(policy, tokenizer, task: Task, problems: Sequence[Problem], *, sampling: SamplingConfig,
                 num_samples: int, key: jax.Array, chat: bool = False, mesh=None) -> CheckedSamples:
    """`num_samples` solutions of each problem from `policy`, checked and grouped by answer (split over `mesh`'s
    devices as `draw_solutions` splits them)."""
    prompts = [prompt_ids(tokenizer, task.prompt(p), chat=chat) for p in problems]
    samples = draw_solutions(policy, tokenizer, prompts, sampling, key, num_samples, mesh)
    texts = [[tokenizer.decode(s.tolist(), skip_special_tokens=True) for s in row] for row in samples]
    correct = np.array([task.check_many([p] * len(row), row) for p, row in zip(problems, texts)])
    groups = np.stack([group_answers([task.extract_answer(t) for t in row]) for row in texts])
    return CheckedSamples(prompts, samples, texts, correct, groups)


def evaluate_verifier(policy, verifier: Verifier | None, tokenizer, task: Task, problems: Sequence[Problem], *,
                      sampling: SamplingConfig, num_samples: int, sizes: Sequence[int], key: jax.Array,
                      chat: bool = False, first_error_threshold: float | None = None, mesh=None) -> dict:
    """`num_samples` solutions per problem from `policy`, and from them:

    - `selection`: {n: {rule: accuracy}} for every n in `sizes` (best-of-n, weighted vote, self-consistency,
      random pick, pass@n; averaged over subsets of n samples); without a verifier only the rules that need none;
    - `auc`: the verifier's AUC on correct against incorrect samples;
    - `first_error` (tasks with process labels): how often the first step the verifier scores down (below the
      step before it, or below `first_error_threshold` when given) is the first wrong step
      (`first_error_accuracy`);
    - `tokens_per_sample` and `verifier_tokens_per_sample`: what it cost.
    """
    drawn = draw_checked(policy, tokenizer, task, problems, sampling=sampling, num_samples=num_samples, key=key,
                         chat=chat, mesh=mesh)
    prompts, samples, texts, correct, groups = drawn.prompts, drawn.samples, drawn.texts, drawn.correct, drawn.groups
    out = {"problems": len(problems), "samples": num_samples,
           "tokens_per_sample": float(np.mean([len(s) for row in samples for s in row]))}
    scores = np.zeros(correct.shape)
    if verifier is not None:
        scored = score_solutions(verifier, [p for p in prompts for _ in range(num_samples)],
                                 [s for row in samples for s in row], StepSplitter(tokenizer, task.step_delimiter),
                                 pad_id=pad_token_id(tokenizer), mesh=mesh)
        scores = scored.scores.reshape(correct.shape)
        out["auc"] = roc_auc(scores.ravel(), correct.ravel())
        out["verifier_tokens_per_sample"] = float(scored.verifier_tokens.mean())
        if task.has_process_labels:
            steps = [task.split_steps(t) for row in texts for t in row]
            labels = [task.first_wrong_step(problems[i // num_samples], s) for i, s in enumerate(steps)]
            kept = [i for i, (sc, s) in enumerate(zip(scored.step_scores, steps)) if len(sc) == len(s)]
            out["first_error"] = first_error_accuracy([scored.step_scores[i] for i in kept], [labels[i] for i in kept],
                                                      first_error_threshold, scored.prompt_scores[kept])
    rules = None if verifier is not None else ("self_consistency", "random_pick", "pass_at_n")
    out["selection"] = {str(n): {k: a for k, a in selection_accuracy(groups, correct, scores, n).items()
                                 if rules is None or k in rules} for n in sizes}
    return out
