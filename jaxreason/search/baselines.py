"""Test-time baselines at a counted budget: greedy chain of thought, self-consistency, (verifier-weighted)
best-of-N and verifier-guided step-level beam search.

The budget is counted in generated tokens (every sample and beam proposal, a sampled EOS included) and in
verifier tokens (what the verifier's passes read). Sampling and scoring run in jitted programs over the whole
batch (B problems x N samples in one `sample` call, one prefill per prompt); votes and beam bookkeeping are
small numpy on the host. A solution is scored as generated, EOS included, at the positions
`jaxreason.verifiers.positions` names: the same positions its verifier was trained at.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Int

from jaxreason.distributed import addressable
from jaxreason.sampling.generate import GenerateOutput, SamplingConfig, generate, sample
from jaxreason.sampling.prompts import decode_completions, eos_ids, pad_left, pad_token_id, prompt_ids
from jaxreason.sampling.stopping import build_stop_table
from jaxreason.search.config import Budget
from jaxreason.search.methods import MethodResult, register_method
from jaxreason.search.votes import best_of, majority_vote, weighted_vote
from jaxreason.tasks.base import Problem, Task
from jaxreason.verifiers.base import Verifier, combine, initial_score
from jaxreason.verifiers.batch import score_solutions
from jaxreason.verifiers.positions import StepSplitter

# ---------------------------------------------------------------- beam selection (pure, host)


def select_beams(
    proposal_scores: np.ndarray, beam_scores: np.ndarray, beam_finished: np.ndarray, proposals_per_beam: int
) -> np.ndarray:
    """One beam-search step's survivors: the top N of the open beams' proposals and the finished beams.

    Args:
      proposal_scores: [B, N * M] score of proposal j of beam i at column i * M + j.
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


@functools.partial(
    jax.jit, static_argnames=("policy_def", "verifier_def", "config", "eos_ids", "pad_id", "samples_per_prompt")
)
def _propose_and_score_jit(policy_def, policy_state, verifier_def, verifier_state, prefix, prefix_mask, row_keys,
                           stop_table, skip, solution_len, *, config, eos_ids, pad_id, samples_per_prompt):
    """K continuations of each left-padded prefix [R, W], each scored with its prefix at its last token (the
    score position of the step it adds); a prefix marked in `skip` [R] gets empty continuations. The last
    `solution_len` [R] tokens of a prefix are its solution so far (the rest its prompt).

    Returns the GenerateOutput [R * K, S], the extended sequences [R * K, W + S] left-padded with their mask,
    and the step scores [R * K].
    """
    policy = nnx.merge(policy_def, policy_state)
    verifier = nnx.merge(verifier_def, verifier_state)
    out = sample(policy, prefix, prefix_mask, row_keys, config, eos_ids=eos_ids, pad_id=pad_id,
                 stop_table=stop_table, samples_per_prompt=samples_per_prompt, skip=skip)
    tokens, mask = _extend(prefix, prefix_mask, out, samples_per_prompt, pad_id)
    last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1)
    start = tokens.shape[1] - jnp.repeat(solution_len, samples_per_prompt) - out.lengths  # rows end on real tokens
    return out, tokens, mask, verifier.values_at(tokens, mask, last, start)[:, 0]


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


def _prompts(tokenizer, task: Task, problems: Sequence[Problem], chat: bool) -> list[list[int]]:
    return [prompt_ids(tokenizer, task.prompt(p), chat=chat) for p in problems]


def _finish(method: str, task: Task, problems: Sequence[Problem], completions: list[str], generated, verified,
            start: float) -> MethodResult:
    return MethodResult(
        method=method,
        completions=completions,
        answers=[task.extract_answer(c) for c in completions],
        correct=task.check_many(problems, completions),
        generated_tokens=np.asarray(generated, np.int64),
        verifier_tokens=np.asarray(verified, np.int64),
        seconds=time.perf_counter() - start,
    )


def draw_solutions(policy, tokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, key: jax.Array,
                     samples_per_prompt: int, mesh=None) -> list[list[np.ndarray]]:
    """K whole solutions per prompt (token ids as generated, EOS included), drawn with row keys
    `split(key, B * K)` (row b * K + k: sample k of prompt b): [B][K] arrays. With `mesh`, the prompts are split
    over its devices where they divide over them and the weights are sharded by the rules (`generate`): the same
    tokens."""
    tokens, mask = pad_left(prompts, pad_token_id(tokenizer))
    b, k = len(prompts), samples_per_prompt
    out = generate(policy, tokens, mask, jax.random.split(key, b * k), sampling,
                   eos_ids=eos_ids(tokenizer, policy.config), pad_id=pad_token_id(tokenizer), samples_per_prompt=k,
                   mesh=mesh)
    out = addressable(out)  # rows that lie on several processes' devices are gathered before the host reads them
    new, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [[new[i * k + j, :lengths[i * k + j]] for j in range(k)] for i in range(b)]


def score_samples(verifier: Verifier, tokenizer, task: Task, prompts: Sequence[Sequence[int]],
                  samples: Sequence[Sequence[np.ndarray]], mesh=None):
    """The verifier's scores [B, K] of each problem's K samples and the verifier tokens read per problem [B]; with
    `mesh`, the rows are split over it (`score_solutions`)."""
    b, k = len(samples), len(samples[0])
    scored = score_solutions(verifier, [p for p in prompts for _ in range(k)], [s for row in samples for s in row],
                             StepSplitter(tokenizer, task.step_delimiter), pad_id=pad_token_id(tokenizer), mesh=mesh)
    return scored.scores.reshape(b, k), scored.verifier_tokens.reshape(b, k).sum(1)


def _texts(tokenizer, samples: Sequence[Sequence[np.ndarray]]) -> list[list[str]]:
    return [[tokenizer.decode(s.tolist(), skip_special_tokens=True) for s in row] for row in samples]


# ---------------------------------------------------------------- the methods


def greedy(problems, *, policy, verifier, tokenizer, task, budget: Budget, key, chat=False, mesh=None) -> MethodResult:
    """One temperature-0 chain of thought per problem (`key` is unused by the draw; kept for one signature).

    Budget: the solution's tokens.
    """
    start = time.perf_counter()
    sampling = SamplingConfig(max_new_tokens=budget.baseline.sampling.max_new_tokens, temperature=0.0)
    samples = draw_solutions(policy, tokenizer, _prompts(tokenizer, task, problems, chat), sampling, key, 1, mesh)
    texts = _texts(tokenizer, samples)
    return _finish("greedy", task, problems, [t[0] for t in texts], [len(s[0]) for s in samples],
                   np.zeros(len(problems)), start)


def self_consistency(problems, *, policy, verifier, tokenizer, task, budget: Budget, key, chat=False,
                     mesh=None) -> MethodResult:
    """N sampled solutions per problem; the answer is the majority vote (`majority_vote`), represented by its
    first sample. Budget: the tokens of all N samples."""
    start = time.perf_counter()
    config = budget.baseline
    samples = draw_solutions(policy, tokenizer, _prompts(tokenizer, task, problems, chat), config.sampling, key,
                             config.num_samples, mesh)
    texts = _texts(tokenizer, samples)
    chosen = [t[majority_vote([task.extract_answer(s) for s in t])] for t in texts]
    return _finish("self_consistency", task, problems, chosen, [sum(map(len, s)) for s in samples],
                   np.zeros(len(problems)), start)


def best_of_n(problems, *, policy, verifier, tokenizer, task, budget: Budget, key, chat=False, mesh=None,
              weighted: bool = False) -> MethodResult:
    """N sampled solutions per problem, each scored by the verifier.

    Plain: the best-scored solution (`best_of`). Weighted: the answer whose solutions' scores sum highest,
    represented by its best-scored solution (`weighted_vote`). Budget: the tokens of all N samples, and the
    verifier's pass over each.
    """
    start = time.perf_counter()
    config = budget.baseline
    prompts = _prompts(tokenizer, task, problems, chat)
    samples = draw_solutions(policy, tokenizer, prompts, config.sampling, key, config.num_samples, mesh)
    scores, verified = score_samples(verifier, tokenizer, task, prompts, samples, mesh)
    texts = _texts(tokenizer, samples)
    if weighted:
        chosen = [t[weighted_vote([task.extract_answer(s) for s in t], row)] for t, row in zip(texts, scores)]
    else:
        chosen = [t[best_of(row)] for t, row in zip(texts, scores)]
    return _finish("weighted_best_of_n" if weighted else "best_of_n", task, problems, chosen,
                   [sum(map(len, s)) for s in samples], verified, start)


def beam_search(problems, *, policy, verifier, tokenizer, task, budget: Budget, key, chat=False,
                mesh=None) -> MethodResult:
    """Step-level beam search guided by the verifier.

    N = beam_width beams per problem start at the prompt. Each step, every open beam proposes
    M = proposals_per_beam next steps (sampled up to the task's step delimiter, EOS, or max_step_tokens); a
    proposal's score is the verifier's step score of beam + step combined with the beam's score by the
    verifier's aggregation, and the top N of the proposals and the finished beams (`select_beams`) survive. A
    proposal that ends on EOS or is the final-answer line (`task.is_final_step`) finishes its beam. The search
    stops when every beam is finished or after max_steps; the answer is the best finished beam, or the best beam
    if none finished (`best_beams`). Step s draws with row keys `split(fold_in(key, s), B * N * M)`.

    Budget: the tokens of every proposal, M per open beam and step, and the verifier's pass over each beam +
    proposal; a finished beam's rows stay in the fixed-shape batch, but the sampler skips them.
    """
    start = time.perf_counter()
    config = budget.baseline
    b, n, m, s = len(problems), config.beam_width, config.proposals_per_beam, config.max_step_tokens
    pad_id, stop_ids = pad_token_id(tokenizer), eos_ids(tokenizer, policy.config)
    prompts, prompt_mask = pad_left(_prompts(tokenizer, task, problems, chat), pad_id)
    # A fixed width that fits the prompt and max_steps full steps: every step runs one compiled program.
    front = config.max_steps * s
    beams = jnp.repeat(jnp.pad(jnp.asarray(prompts), ((0, 0), (front, 0)), constant_values=pad_id), n, axis=0)
    beam_mask = jnp.repeat(jnp.pad(jnp.asarray(prompt_mask), ((0, 0), (front, 0))), n, axis=0)
    how = verifier.aggregation
    scores, finished = np.full((b, n), initial_score(how)), np.zeros((b, n), bool)
    beam_len = np.zeros((b, n), np.int64)  # tokens each beam added after its prompt
    generated, verified = np.zeros(b, np.int64), np.zeros(b, np.int64)
    stop_table = build_stop_table(tokenizer, [task.step_delimiter], policy.config.vocab_size)
    static = dict(config=SamplingConfig(max_new_tokens=s, temperature=config.sampling.temperature,
                                        top_p=config.sampling.top_p, top_k=config.sampling.top_k),
                  eos_ids=stop_ids, pad_id=pad_id, samples_per_prompt=m)
    policy_def, policy_state = nnx.split(policy)
    verifier_def, verifier_state = nnx.split(verifier)
    for step in range(config.max_steps):
        if finished.all():
            break
        row_keys = jax.random.split(jax.random.fold_in(key, step), b * n * m)
        out, cand, cand_mask, step_scores = _propose_and_score_jit(
            policy_def, policy_state, verifier_def, verifier_state, beams, beam_mask, row_keys, stop_table,
            jnp.asarray(finished.reshape(-1)), jnp.asarray(beam_len.reshape(-1), jnp.int32), **static
        )
        lengths = np.asarray(out.lengths).reshape(b, n, m)
        open_rows = np.repeat(~finished, m, axis=1)  # [B, N * M]
        generated += lengths.sum(axis=(1, 2))
        verified += (np.asarray(cand_mask).sum(1).reshape(b, n * m) * open_rows).sum(1)
        ends = _ends_solution(task, tokenizer, out, stop_ids).reshape(b, n * m)
        proposal_scores = np.asarray(combine(jnp.repeat(jnp.asarray(scores), m, axis=1),
                                             jnp.asarray(step_scores).reshape(b, n * m), how))
        survivors = select_beams(proposal_scores, scores, finished, m)
        beams, beam_mask = _gather_beams(cand, cand_mask, beams, beam_mask, jnp.asarray(survivors))
        scores = _take(proposal_scores, scores, survivors)
        finished = _take(ends, finished, survivors)
        beam_len = _take((beam_len[:, :, None] + lengths).reshape(b, n * m), beam_len, survivors)
    best = best_beams(scores, finished)
    rows = np.arange(b) * n + best
    tokens = np.asarray(beams)[rows]
    completions = [tokenizer.decode(row[len(row) - count:].tolist(), skip_special_tokens=True)
                   for row, count in zip(tokens, beam_len[np.arange(b), best])]
    return _finish("beam_search", task, problems, completions, generated, verified, start)


def _ends_solution(task: Task, tokenizer, out: GenerateOutput, stop_ids: tuple[int, ...]) -> np.ndarray:
    """[R] the proposed step ends the solution: it ends on EOS or is the final-answer line."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    on_eos = (lengths > 0) & np.isin(tokens[np.arange(len(lengths)), np.maximum(lengths - 1, 0)], stop_ids)
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


register_method("greedy", greedy, needs_verifier=False)
register_method("self_consistency", self_consistency, needs_verifier=False)
register_method("best_of_n", best_of_n, needs_verifier=True)
register_method("weighted_best_of_n", functools.partial(best_of_n, weighted=True), needs_verifier=True)
register_method("beam_search", beam_search, needs_verifier=True)
