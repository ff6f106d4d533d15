"""SCoRe's two-attempt protocol: the instruction between the attempts, episodes drawn and checked in chunks, the
self-correction metrics, and the two-attempt SFT examples of policy_0's format stage and the baselines.

An episode is prompt x, attempt y1, instruction I, attempt y2 in one sequence (`rl.sample_episodes` with
`instructions=[I]`); y1 ends with the EOS the policy generated. For an instruct model I is a user turn of the
tokenizer's chat template (the ids between the end of the first answer and the start of the second); otherwise
plain text on its own line.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import struct
from jaxtyping import Array, Float, Int

from jaxreason.data.trace_store import FLAG_CORRECT, Trace
from jaxreason.rl.rewards import checked_rewards
from jaxreason.rl.rollouts import sample_episodes
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.tasks.base import Problem

DEFAULT_INSTRUCTION = ("There might be an error in the solution above because of lack of understanding of the "
                       "question. Please correct the error, if any, and rewrite the solution.")
_MARK = "\x00first attempt\x00"


def instruction_ids(tokenizer, instruction: str, *, chat: bool) -> list[int]:
    """The ids inserted between attempt 1 (closed by its EOS) and attempt 2."""
    if not instruction.strip():
        raise ValueError("the correction instruction is empty")
    if not chat:
        return tokenizer.encode(f"\n{instruction}\n", add_special_tokens=False)
    turns = [{"role": "user", "content": "question"}, {"role": "assistant", "content": _MARK},
             {"role": "user", "content": instruction}]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    after = text[text.index(_MARK) + len(_MARK):]
    eos = tokenizer.decode([tokenizer.eos_token_id])
    return tokenizer.encode(after.removeprefix(eos), add_special_tokens=False)  # the policy wrote that EOS


@struct.dataclass
class CheckedEpisodes:
    """G two-attempt episodes of each of P problems, rows problem-major (row p * G + g), and their rewards.

    Attributes:
      prompts: [R] prompt ids of each row (lists).
      first, second: [R] attempt 1 and attempt 2 ids (lists, each closed by its EOS unless cut at the limit).
      rewards: [R, 2] float32, the checker on each attempt (0 for an attempt cut at the token limit).
      problem_index: [R] int32 index into the problems drawn for.
    """

    prompts: list = struct.field(pytree_node=False)
    first: list = struct.field(pytree_node=False)
    second: list = struct.field(pytree_node=False)
    rewards: Float[Array, "R 2"]
    problem_index: Int[Array, " R"]


def draw_episodes(policy, problems: Sequence[Problem], prompts: Sequence[Sequence[int]],
                  instruction: Sequence[int], reward_fn, key: jax.Array, sampling: SamplingConfig, *,
                  group_size: int, chunk: int, eos_ids: tuple[int, ...], pad_id: int, mesh=None) -> CheckedEpisodes:
    """`group_size` episodes of each problem, `chunk` problems per sampler call (the last one padded with its
    last problem, so every call has one shape), checked by `reward_fn` on each attempt."""
    firsts, seconds, rows, rewards = [], [], [], []
    for start in range(0, len(problems), chunk):
        ids = list(range(start, min(start + chunk, len(problems))))
        padded = ids + [ids[-1]] * (chunk - len(ids))
        episodes = sample_episodes(policy, [prompts[i] for i in padded], jax.random.fold_in(key, start), sampling,
                                   group_size=group_size, eos_ids=eos_ids, pad_id=pad_id,
                                   instructions=[instruction], mesh=mesh)
        keep = len(ids) * group_size
        owners = [padded[i] for i in np.asarray(episodes.prompt_index)[:keep]]
        attempts = [episodes.attempt(j)[:keep] for j in (0, 1)]
        truncated = np.asarray(episodes.truncated)[:keep]
        checked = np.stack([checked_rewards(reward_fn, [problems[i] for i in owners], [prompts[i] for i in owners],
                                            attempts[j]) for j in (0, 1)], axis=1)
        rewards.append(np.where(truncated, 0.0, checked))
        firsts += attempts[0]
        seconds += attempts[1]
        rows += owners
    return CheckedEpisodes(prompts=[list(prompts[i]) for i in rows], first=firsts, second=seconds,
                           rewards=np.concatenate(rewards).astype(np.float32),
                           problem_index=np.asarray(rows, np.int32))


def correction_metrics(rewards: np.ndarray) -> dict[str, float]:
    """SCoRe's metrics of [R, 2] attempt rewards in {0, 1}: Acc@t1, Acc@t2, their difference Delta(t1, t2), and
    the fractions of all episodes wrong at t1 and right at t2 (Delta i->c) and right at t1 and wrong at t2
    (Delta c->i); Delta = i->c - c->i."""
    first, second = (np.asarray(rewards)[:, j] > 0.5 for j in (0, 1))
    return {"acc_t1": float(first.mean()), "acc_t2": float(second.mean()),
            "delta": float(second.mean() - first.mean()), "delta_i_to_c": float(np.mean(~first & second)),
            "delta_c_to_i": float(np.mean(first & ~second))}


def two_attempt_trace(prompt: Sequence[int], first: Sequence[int], instruction: Sequence[int],
                      second: Sequence[int], eos_id: int, problem_id: int, *, train_first: bool = False) -> Trace:
    """An SFT example of attempt 2 given prompt, attempt 1 and the instruction: attempt 2 is trained, and with
    `train_first` everything after the prompt. Attempt 1 gets its EOS when it has none, as a sampled attempt does."""
    first = list(first) if len(first) and first[-1] == eos_id else [*first, eos_id]
    context = [*prompt, *first, *instruction]
    return Trace(problem_id=problem_id, iteration=0, tokens=np.asarray([*context, *second], np.int32),
                 prompt_len=len(prompt) if train_first else len(context), step_ends=np.zeros(0, np.int32),
                 step_values=np.zeros(0, np.float32), reward=1.0, flags=FLAG_CORRECT)


def star_corrections(episodes: CheckedEpisodes, instruction: Sequence[int], eos_id: int) -> list[Trace]:
    """STaR on self-corrections: attempt 2 of each episode whose attempt 1 is wrong and attempt 2 right."""
    r = np.asarray(episodes.rewards)
    fixed = np.flatnonzero((r[:, 0] < 0.5) & (r[:, 1] > 0.5))
    return [two_attempt_trace(episodes.prompts[i], episodes.first[i], instruction, episodes.second[i], eos_id,
                              int(episodes.problem_index[i])) for i in fixed]


def correction_pairs(episodes: CheckedEpisodes, instruction: Sequence[int], eos_id: int,
                     pairs_per_problem: int, seed: int) -> list[Trace]:
    """Pair-SFT (Welleck et al. 2023): first attempts of the same problem paired as (wrong, I, right), at most
    `pairs_per_problem` distinct pairs per problem, chosen by `seed`."""
    rng = np.random.default_rng(seed)
    first_correct = np.asarray(episodes.rewards)[:, 0] > 0.5
    index = np.asarray(episodes.problem_index)
    out = []
    for p in np.unique(index):
        rows = np.flatnonzero(index == p)
        pairs = [(w, c) for w in rows[~first_correct[rows]] for c in rows[first_correct[rows]]]
        for k in rng.permutation(len(pairs))[:pairs_per_problem]:
            w, c = pairs[k]
            out.append(two_attempt_trace(episodes.prompts[w], episodes.first[w], instruction, episodes.first[c],
                                         eos_id, int(p)))
    return out
