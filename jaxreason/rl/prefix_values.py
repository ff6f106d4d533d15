"""Monte Carlo values of solution prefixes, for per-step advantages (Setlur et al. 2024, "Rewarding progress").

Q(prefix) is the fraction of M continuations sampled from the prefix that the reward function accepts
(Math-Shepherd's estimate); prefix 0 is the prompt alone, prefix i the prompt and the first i steps, and the
whole solution's value is its own reward. `step_advantages` turns them into A_i = Q(prefix_i) - Q(prefix_{i-1}),
and `step_index` says which step each generated token belongs to, so `per_token` spreads them over the tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxreason.models.llama import CausalLM
from jaxreason.rl.rewards import RewardFn, checked_rewards
from jaxreason.rl.rollouts import NOT_TRAINED, Episodes
from jaxreason.sampling.continuations import sample_continuations
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.tasks.base import Problem
from jaxreason.verifiers.positions import StepSplitter


@dataclasses.dataclass(frozen=True)
class PrefixValues:
    """Per solution r with S_r steps: `values[r]` [S_r + 1] (Q of the prompt, of each step prefix, and the reward
    of the whole solution last), `step_ends[r]` [S_r] (one past each step's last token, in the solution).
    `generated_tokens`: what the continuations cost."""

    values: list[np.ndarray]
    step_ends: list[np.ndarray]
    generated_tokens: int

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """values [R, S + 1] and step_mask [R, S] padded to the most steps S (what `step_advantages` takes)."""
        most = max((len(e) for e in self.step_ends), default=0)
        values = np.zeros((len(self.values), most + 1), np.float32)
        mask = np.zeros((len(self.values), most), np.int32)
        for r, (v, e) in enumerate(zip(self.values, self.step_ends)):
            values[r, :len(v)] = v
            values[r, len(v):] = v[-1]  # padded steps make no progress
            mask[r, :len(e)] = 1
        return values, mask


def prefix_values(
    policy: CausalLM,
    reward_fn: RewardFn,
    splitter: StepSplitter,
    problems: Sequence[Problem],
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    num_rollouts: int,
    sampling: SamplingConfig,
    key: jax.Array,
    eos_ids: tuple[int, ...],
    pad_id: int,
    max_steps: int | None = None,
    mesh: Mesh | None = None,
) -> PrefixValues:
    """Q of every proper prefix of each completion (the prompt included), from `num_rollouts` continuations each;
    the whole completion's value is `reward_fn` of it. Row r is completion r of problem r after prompt r. With
    `mesh`, the continuations are split over its batch devices (`sample_continuations`)."""
    ends = [splitter(c, max_steps) for c in completions]
    prefixes, owners = [], []
    for r, (prompt, completion, e) in enumerate(zip(prompts, completions, ends)):
        for i, end in enumerate([0, *e[:-1]]):
            prefixes += [[*prompt, *completion[:end]]] * num_rollouts
            owners += [(r, i)] * num_rollouts
    continuations = sample_continuations(policy, prefixes, key, sampling, eos_ids=eos_ids, pad_id=pad_id,
                                         description="prefix rollouts", mesh=mesh)
    rows = [r for r, _ in owners]
    solutions = [[*prefixes[k][len(prompts[r]):], *continuations[k].tolist()] for k, r in enumerate(rows)]
    hits = checked_rewards(reward_fn, [problems[r] for r in rows], [prompts[r] for r in rows], solutions)
    own = checked_rewards(reward_fn, problems, prompts, completions)
    values = [np.zeros(len(e) + 1, np.float32) for e in ends]
    for (r, i), hit in zip(owners, hits):
        values[r][i] += hit / num_rollouts
    for r in range(len(values)):
        values[r][-1] = own[r]
    return PrefixValues(values, ends, int(sum(len(c) for c in continuations)))


def step_index(episodes: Episodes, step_ends: Sequence[np.ndarray], turn: int = 0) -> np.ndarray:
    """[R, T] the step of attempt `turn` that each token belongs to (NOT_TRAINED elsewhere): the segment index
    `per_token` spreads per-step advantages by."""
    token_turn = np.asarray(episodes.token_turn)
    out = np.full(token_turn.shape, NOT_TRAINED, np.int32)
    for r, ends in enumerate(step_ends):
        columns = np.flatnonzero(token_turn[r] == turn)
        out[r, columns] = np.searchsorted(ends, np.arange(len(columns)), side="right")
    return out
