"""Episodes of completions sampled before training (offline RL), laid out as `sample_episodes` lays out live ones.

Offline RL trains on a fixed set of (prompt, completion) rows that an earlier policy drew: the same
`Episodes` arrays, so `PolicyTrainer.batch` and `rl.prefix_values.step_index` read them as they read rollouts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxreason.rl.rollouts import Episodes, layout_episodes


def offline_episodes(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_id: int,
                     width: int | None = None) -> Episodes:
    """R single-attempt episodes: row r is prompts[r] then completions[r] (token_turn 0), right-padded to `width`
    (default: the longest row rounded up to 64).

    Each row is its own prompt (group size 1, prompt_index r). The sampler's log-probabilities were not kept, so
    `logprobs` is 0 (an update that needs old log-probs computes them: `PolicyTrainer.batch`), and `truncated` is
    False: what a cut completion earns is the reward's business (its checker), as for any other completion.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"offline_episodes: {len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("offline_episodes: no rows")
    turns = [[[int(t) for t in c] for c in completions]]
    logprobs = [[[0.0] * len(c) for c in completions]]
    return layout_episodes(prompts, (), turns, logprobs, np.zeros((len(completions), 1), bool), 1, pad_id, width)
