"""Test-time baselines at a counted budget: greedy chain of thought, self-consistency, (weighted) best-of-N
and PRM step-level beam search.

The budget is counted in generated tokens: `MethodResult.generated_tokens[b]` is the number of new tokens
sampled for problem b over all its samples or beam proposals, an EOS token included (it was sampled).
Prompt tokens and verifier passes are not counted. Sampling and scoring run in jitted programs over the
whole batch (B problems x N samples in one `sample` call, one prefill per prompt); votes and beam
bookkeeping are small numpy on the host.

A verifier (ORM or PRM, a `ValueModel`) scores a sequence at its last token, exactly as generated (a
sampled EOS included), the way search scores its nodes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Int

from jaxreason.models.llama import CausalLM
from jaxreason.models.value_head import ValueModel
from jaxreason.sampling.generate import GenerateOutput, SamplingConfig, sample
from jaxreason.sampling.prompts import decode_completions, encode_prompts, pad_token_id
from jaxreason.sampling.stopping import build_stop_table
from jaxreason.search.scoring import prefix_values
from jaxreason.tasks.base import Problem, Task
from jaxreason.tasks.math_answers import answers_equal


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Settings shared by the baselines; each method reads the ones it uses.

    Attributes:
      num_samples: N of self-consistency and (weighted) best-of-N.
      temperature, top_p: sampling of every method but greedy.
      max_new_tokens: longest whole solution (greedy, self-consistency, best-of-N).
      beam_width: beams kept per problem by beam search.
      proposals_per_beam: next steps sampled from each unfinished beam.
      max_steps: beam-search steps; beams still open then are judged as they are.
      max_step_tokens: longest step.
      chat: wrap prompts in the tokenizer's chat template.
    """

    num_samples: int = 8
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    beam_width: int = 4
    proposals_per_beam: int = 4
    max_steps: int = 8
    max_step_tokens: int = 48
    chat: bool = False

    def __post_init__(self):
        for name in ("num_samples", "max_new_tokens", "beam_width", "proposals_per_beam", "max_steps",
                     "max_step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class MethodResult:
    """One method's output on a batch of problems.

    Attributes:
      method: the method's name in `BASELINES`.
      completions: [B] the chosen solution text per problem (special tokens removed).
      answers: [B] the task's extracted answer of each chosen solution (None: it states none).
      correct: [B] `task.is_correct` of each chosen solution.
      generated_tokens: [B] int64, tokens sampled per problem (see the module docstring).
      seconds: wall-clock time of the call, compilation included the first time a shape is seen.
    """

    method: str
    completions: list[str]
    answers: list[str | None]
    correct: list[bool]
    generated_tokens: np.ndarray
    seconds: float

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else 0.0

    @property
    def total_tokens(self) -> int:
        return int(np.sum(self.generated_tokens))


# ---------------------------------------------------------------- votes (pure, host)


def group_answers(answers: Sequence[str | None]) -> np.ndarray:
    """[N] int64 group of each answer, -1 for None; groups are numbered in order of first appearance.

    An answer joins the first group whose first answer it equals (`answers_equal`), so the grouping is
    well defined even where that equivalence is not transitive.
    """
    firsts: list[str] = []
    groups = np.full(len(answers), -1, np.int64)
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        groups[i] = next((g for g, first in enumerate(firsts) if answers_equal(answer, first)), len(firsts))
        if groups[i] == len(firsts):
            firsts.append(answer)
    return groups


def best_of(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the earliest sample."""
    return int(np.argmax(np.asarray(scores)))


def majority_vote(answers: Sequence[str | None]) -> int:
    """Index of the sample that represents the most frequent answer: that answer's first sample.

    Ties go to the answer seen first; samples without an answer do not vote. With no answer at all, 0.
    """
    groups = group_answers(answers)
    if np.all(groups < 0):
        return 0
    winner = int(np.argmax(np.bincount(groups[groups >= 0])))  # argmax keeps the first of equal counts
    return int(np.flatnonzero(groups == winner)[0])


def weighted_vote(answers: Sequence[str | None], scores: Sequence[float]) -> int:
    """Index of the best-scored sample of the answer whose samples' scores sum highest.

    Ties between sums go to the answer seen first; samples without an answer do not vote. With no answer
    at all, the best-scored sample.
    """
    groups, scores = group_answers(answers), np.asarray(scores, np.float64)
    if np.all(groups < 0):
        return best_of(scores)
    voting = groups >= 0
    winner = int(np.argmax(np.bincount(groups[voting], weights=scores[voting])))
    members = np.flatnonzero(groups == winner)
    return int(members[best_of(scores[members])])


# ---------------------------------------------------------------- beam selection (pure, host)


def select_beams(
    proposal_scores: np.ndarray, beam_scores: np.ndarray, beam_finished: np.ndarray, proposals_per_beam: int
) -> np.ndarray:
    """One beam-search step's survivors: the top N of the open beams' proposals and the finished beams.

    Args:
      proposal_scores: [B, N * M] PRM score of proposal j of beam i at column i * M + j.
      beam_scores: [B, N] scores of the current beams.
      beam_finished: [B, N] the beam's solution has ended: it proposed nothing (its proposals are
        ignored) and competes as it is.
      proposals_per_beam: M.

    Returns:
      [B, N] int64 indices into the pool [proposals (N * M columns) | current beams (N columns)], best
      first; equal scores keep pool order (earlier beams, then proposals before kept beams).
    """
    width = beam_scores.shape[1]
    proposals_open = np.repeat(~beam_finished, proposals_per_beam, axis=1)
    pool = np.concatenate([
        np.where(proposals_open, proposal_scores, -np.inf),
        np.where(beam_finished, beam_scores, -np.inf),
    ], axis=1)
    # Each open beam adds M >= 1 proposals and each finished one itself, so N valid entries always exist.
    return np.argsort(-pool, axis=1, kind="stable")[:, :width]


def best_beams(beam_scores: np.ndarray, beam_finished: np.ndarray) -> np.ndarray:
    """[B] index of each problem's answer beam: the best-scored finished beam, or the best beam if none has
    finished. Ties go to the lower index. beam_scores, beam_finished: [B, N]."""
    any_finished = np.any(beam_finished, axis=1, keepdims=True)
    eligible = np.where(any_finished, beam_finished, True)
    return np.argmax(np.where(eligible, beam_scores, -np.inf), axis=1)


# ---------------------------------------------------------------- jitted sampling and scoring


@functools.partial(jax.jit, static_argnames=("policy_def", "config", "eos_ids", "pad_id", "samples_per_prompt"))
def _sample_jit(policy_def, policy_state, prefix, prefix_mask, row_keys, *, config, eos_ids, pad_id,
                samples_per_prompt):
    policy = nnx.merge(policy_def, policy_state)
    return sample(policy, prefix, prefix_mask, row_keys, config, eos_ids=eos_ids, pad_id=pad_id,
                  samples_per_prompt=samples_per_prompt)


@functools.partial(
    jax.jit, static_argnames=("policy_def", "scorer_def", "config", "eos_ids", "pad_id", "samples_per_prompt")
)
def _sample_and_score_jit(policy_def, policy_state, scorer_def, scorer_state, prefix, prefix_mask, row_keys,
                          stop_table, skip, *, config, eos_ids, pad_id, samples_per_prompt):
    """K continuations of each left-padded prefix [R, W], each scored with its prefix; a prefix marked in
    `skip` [R] (or None) gets empty continuations.

    Returns the GenerateOutput [R * K, S], the extended sequences [R * K, W + S] left-padded with their mask,
    and the scores [R * K].
    """
    policy = nnx.merge(policy_def, policy_state)
    scorer = nnx.merge(scorer_def, scorer_state)
    out = sample(policy, prefix, prefix_mask, row_keys, config, eos_ids=eos_ids, pad_id=pad_id,
                 stop_table=stop_table, samples_per_prompt=samples_per_prompt, skip=skip)
    tokens, mask = _extend(prefix, prefix_mask, out, samples_per_prompt, pad_id)
    return out, tokens, mask, prefix_values(scorer, tokens, mask)


def _extend(
    prefix: Int[Array, "R W"], prefix_mask: Int[Array, "R W"], out: GenerateOutput, samples_per_prompt: int,
    pad_id: int,
) -> tuple[Int[Array, "RK W+S"], Int[Array, "RK W+S"]]:
    """Each left-padded prefix followed by its K continuations, left-padded again (real tokens last).

    Row r * K + k is prefix r followed by continuation r * K + k of `out` ([R * K, S]).
    """
    new_width = out.tokens.shape[1]
    live = (jnp.arange(new_width)[None, :] < out.lengths[:, None]).astype(jnp.int32)
    tokens = jnp.concatenate([jnp.repeat(prefix, samples_per_prompt, axis=0), out.tokens], axis=1)
    mask = jnp.concatenate([jnp.repeat(prefix_mask, samples_per_prompt, axis=0), live], axis=1)
    # Rolling by the unused continuation slots moves that padding to the front, so the last token is real.
    shift = new_width - out.lengths
    roll = jax.vmap(lambda row, n: jnp.roll(row, n))
    mask = roll(mask, shift)
    return jnp.where(mask == 1, roll(tokens, shift), pad_id), mask


# ---------------------------------------------------------------- shared host plumbing


def _eos_ids(tokenizer, policy: CausalLM) -> tuple[int, ...]:
    """The tokenizer's EOS and the model config's (an instruct model's end-of-turn token, say)."""
    ids = set(policy.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _encode(tokenizer, task: Task, problems: Sequence[Problem], config: BaselineConfig):
    if not problems:
        raise ValueError("no problems given")
    tokens, mask = encode_prompts(tokenizer, [task.prompt(p) for p in problems], chat=config.chat)
    return jnp.asarray(tokens), jnp.asarray(mask)


def _finish(method: str, task: Task, problems: Sequence[Problem], completions: list[str], generated: np.ndarray,
            start: float) -> MethodResult:
    return MethodResult(
        method=method,
        completions=completions,
        answers=[task.extract_answer(c) for c in completions],
        correct=[task.is_correct(p, c) for p, c in zip(problems, completions)],
        generated_tokens=np.asarray(generated, np.int64),
        seconds=time.perf_counter() - start,
    )


def _solutions(policy, tokenizer, task, problems, config, key, samples_per_prompt, temperature, scorer=None):
    """K whole solutions per problem, drawn with row keys `split(key, B * K)` (row b * K + k: sample k of
    problem b), and their verifier scores when a scorer is given.

    Returns texts [B][K], generated tokens [B, K] and scores [B, K] (None without a scorer).
    """
    prompts, prompt_mask = _encode(tokenizer, task, problems, config)
    b, k = len(problems), samples_per_prompt
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=temperature, top_p=config.top_p)
    row_keys = jax.random.split(key, b * k)
    static = dict(config=sampling, eos_ids=_eos_ids(tokenizer, policy), pad_id=pad_token_id(tokenizer),
                  samples_per_prompt=k)
    policy_def, policy_state = nnx.split(policy)
    if scorer is None:
        out, scores = _sample_jit(policy_def, policy_state, prompts, prompt_mask, row_keys, **static), None
    else:
        scorer_def, scorer_state = nnx.split(scorer)
        out, _, _, scores = _sample_and_score_jit(policy_def, policy_state, scorer_def, scorer_state, prompts,
                                                  prompt_mask, row_keys, None, None, **static)
        scores = np.asarray(scores).reshape(b, k)
    texts = decode_completions(tokenizer, out)
    return [texts[i * k:(i + 1) * k] for i in range(b)], np.asarray(out.lengths).reshape(b, k), scores


# ---------------------------------------------------------------- the methods


def greedy(policy: CausalLM, tokenizer, task: Task, problems: Sequence[Problem], config: BaselineConfig,
           key: jax.Array) -> MethodResult:
    """One temperature-0 chain of thought per problem (`key` is unused by the draw; kept for one signature).

    Budget: the solution's tokens.
    """
    start = time.perf_counter()
    texts, lengths, _ = _solutions(policy, tokenizer, task, problems, config, key, 1, 0.0)
    return _finish("greedy", task, problems, [t[0] for t in texts], lengths.sum(1), start)


def self_consistency(policy: CausalLM, tokenizer, task: Task, problems: Sequence[Problem],
                     config: BaselineConfig, key: jax.Array) -> MethodResult:
    """N sampled solutions per problem; the answer is the majority vote (`majority_vote`), represented by
    its first sample. Budget: the tokens of all N samples."""
    start = time.perf_counter()
    texts, lengths, _ = _solutions(policy, tokenizer, task, problems, config, key, config.num_samples,
                                   config.temperature)
    chosen = [t[majority_vote([task.extract_answer(s) for s in t])] for t in texts]
    return _finish("self_consistency", task, problems, chosen, lengths.sum(1), start)


def best_of_n(policy: CausalLM, verifier: ValueModel, tokenizer, task: Task, problems: Sequence[Problem],
              config: BaselineConfig, key: jax.Array, weighted: bool = False) -> MethodResult:
    """N sampled solutions per problem, each scored by the verifier at its last token.

    Plain: the best-scored solution (`best_of`). Weighted: the answer whose solutions' scores sum highest,
    represented by its best-scored solution (`weighted_vote`). Budget: the tokens of all N samples.
    """
    start = time.perf_counter()
    texts, lengths, scores = _solutions(policy, tokenizer, task, problems, config, key, config.num_samples,
                                        config.temperature, scorer=verifier)
    if weighted:
        chosen = [t[weighted_vote([task.extract_answer(s) for s in t], row)] for t, row in zip(texts, scores)]
    else:
        chosen = [t[best_of(row)] for t, row in zip(texts, scores)]
    return _finish("weighted_best_of_n" if weighted else "best_of_n", task, problems, chosen, lengths.sum(1),
                   start)


def prm_beam_search(policy: CausalLM, prm: ValueModel, tokenizer, task: Task, problems: Sequence[Problem],
                    config: BaselineConfig, key: jax.Array) -> MethodResult:
    """Step-level beam search guided by a PRM.

    N = beam_width beams per problem start at the prompt. Each step, every open beam proposes
    M = proposals_per_beam next steps (sampled up to the task's step delimiter, EOS, or max_step_tokens),
    the PRM scores each beam + step at its last token, and the top N of the proposals and the finished
    beams (`select_beams`) survive. A proposal that ends on EOS or is the final-answer line
    (`task.is_final_step`) finishes its beam. The search stops when every beam is finished or after
    max_steps; the answer is the best finished beam by PRM score, or the best beam if none finished
    (`best_beams`). Step s draws with row keys `split(fold_in(key, s), B * N * M)`.

    Budget: the tokens of every proposal, M per open beam and step; a finished beam's rows stay in the
    fixed-shape batch, but the sampler skips them.
    """
    start = time.perf_counter()
    b, n, m, s = len(problems), config.beam_width, config.proposals_per_beam, config.max_step_tokens
    prompts, prompt_mask = _encode(tokenizer, task, problems, config)
    pad_id, eos_ids = pad_token_id(tokenizer), _eos_ids(tokenizer, policy)
    # A fixed width that fits the prompt and max_steps full steps: every step runs one compiled program.
    front = config.max_steps * s
    beams = jnp.repeat(jnp.pad(prompts, ((0, 0), (front, 0)), constant_values=pad_id), n, axis=0)
    beam_mask = jnp.repeat(jnp.pad(prompt_mask, ((0, 0), (front, 0))), n, axis=0)
    scores, finished = np.zeros((b, n)), np.zeros((b, n), bool)
    beam_len = np.zeros((b, n), np.int64)  # tokens each beam added after its prompt
    generated = np.zeros(b, np.int64)
    stop_table = build_stop_table(tokenizer, [task.step_delimiter], policy.config.vocab_size)
    static = dict(config=SamplingConfig(max_new_tokens=s, temperature=config.temperature, top_p=config.top_p),
                  eos_ids=eos_ids, pad_id=pad_id, samples_per_prompt=m)
    policy_def, policy_state = nnx.split(policy)
    prm_def, prm_state = nnx.split(prm)
    for step in range(config.max_steps):
        if finished.all():
            break
        row_keys = jax.random.split(jax.random.fold_in(key, step), b * n * m)
        out, cand, cand_mask, cand_scores = _sample_and_score_jit(
            policy_def, policy_state, prm_def, prm_state, beams, beam_mask, row_keys, stop_table,
            jnp.asarray(finished.reshape(-1)), **static
        )
        lengths = np.asarray(out.lengths).reshape(b, n, m)
        generated += lengths.sum(axis=(1, 2))
        ends = _ends_solution(task, tokenizer, out, eos_ids).reshape(b, n * m)
        survivors = select_beams(np.asarray(cand_scores).reshape(b, n * m), scores, finished, m)
        beams, beam_mask = _gather_beams(cand, cand_mask, beams, beam_mask, jnp.asarray(survivors))
        scores = _take(np.asarray(cand_scores).reshape(b, n * m), scores, survivors)
        finished = _take(ends, finished, survivors)
        beam_len = _take((beam_len[:, :, None] + lengths).reshape(b, n * m), beam_len, survivors)
    best = best_beams(scores, finished)
    rows = np.arange(b) * n + best
    tokens = np.asarray(beams)[rows]
    completions = [tokenizer.decode(row[len(row) - count:].tolist(), skip_special_tokens=True)
                   for row, count in zip(tokens, beam_len[np.arange(b), best])]
    return _finish("beam_search", task, problems, completions, generated, start)


def _ends_solution(task: Task, tokenizer, out: GenerateOutput, eos_ids: tuple[int, ...]) -> np.ndarray:
    """[R] the proposed step ends the solution: it ends on EOS or is the final-answer line."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    on_eos = (lengths > 0) & np.isin(tokens[np.arange(len(lengths)), np.maximum(lengths - 1, 0)], eos_ids)
    return on_eos | np.array([task.is_final_step(t) for t in decode_completions(tokenizer, out)])


@jax.jit
def _gather_beams(cand: Int[Array, "BNM W+S"], cand_mask: Int[Array, "BNM W+S"], beams: Int[Array, "BN W"],
                  beam_mask: Int[Array, "BN W"], survivors: Int[Array, "B N"]):
    """The surviving sequences [B * N, W] and masks, picked from the pool [proposals | current beams]."""
    (b, n), width = survivors.shape, beams.shape[1]

    def pick(proposals, current):
        # A proposal's first S columns are padding: W leaves room for max_steps full steps after the prompt.
        proposals = proposals[:, -width:].reshape(b, -1, width)
        pool = jnp.concatenate([proposals, current.reshape(b, n, width)], axis=1)
        return jnp.take_along_axis(pool, survivors[:, :, None], axis=1).reshape(b * n, -1)

    return pick(cand, beams), pick(cand_mask, beam_mask)


def _take(proposal_values: np.ndarray, beam_values: np.ndarray, survivors: np.ndarray) -> np.ndarray:
    """[B, N] per-beam values of the survivors from the pool [proposals [B, N * M] | beams [B, N]]."""
    return np.take_along_axis(np.concatenate([proposal_values, beam_values], axis=1), survivors, axis=1)


# ---------------------------------------------------------------- registry

# Methods by name; those in VERIFIER_BASELINES take the verifier as their second argument.
BASELINES: dict[str, Callable[..., MethodResult]] = {
    "greedy": greedy,
    "self_consistency": self_consistency,
    "best_of_n": best_of_n,
    "weighted_best_of_n": functools.partial(best_of_n, weighted=True),
    "beam_search": prm_beam_search,
}
VERIFIER_BASELINES = frozenset({"best_of_n", "weighted_best_of_n", "beam_search"})


def run_baseline(name: str, policy: CausalLM, tokenizer, task: Task, problems: Sequence[Problem],
                 config: BaselineConfig, key: jax.Array, *, verifier: ValueModel | None = None) -> MethodResult:
    """Runs `BASELINES[name]`; `verifier` (the ORM or PRM) is required by the methods that score."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    if name not in VERIFIER_BASELINES:
        return BASELINES[name](policy, tokenizer, task, problems, config, key)
    if verifier is None:
        raise ValueError(f"baseline {name!r} needs a verifier")
    return BASELINES[name](policy, verifier, tokenizer, task, problems, config, key)
