"""rStar's generator on mctx: MCTS over five human-like reasoning actions, many problems per jitted search.

A node is a partial solution (token ids after the problem's prompt). Creating a node samples, in one batched
expansion, the candidates of every action its type allows (`RStarConfig.action_space`): A1 one next line;
A2 n completions to the end, of which the node keeps one holding the majority answer; A3 a sub-question and
v answers to it (the majority); A4 v new answers to the node's last sub-question (which replace the old one
when taken); A5 the question's conditions restated. Answers are compared inside the program by
`AnswerKeys`: the last run of digits a sample writes.

Rewards as the paper's: a finished trajectory (A2, an A3/A4 whose answer states the final answer, an A1
line that does) is a terminal node whose reward is its answer's majority confidence (for A1, the share of
the parent's A2 samples that reach its answer); any other trajectory that hits `max_depth` gets 0. The
paper's simulation (random actions down to a finished trajectory) is replaced by the node's own A2
candidate: finishing the solution in one go is that rollout, so a new node's value is its A2 confidence.
Selection is the paper's UCT, Q/N + c sqrt(ln N_parent / N), untried children first in a random order that
depends on the problem's own key only; the backup is mctx's running mean (Q/N).

Every row's random numbers come from its own key (`row_keys`), so a problem's tree is the same whether it
is searched alone or in a batch.

With a verifier (any of `jaxreason.verifiers`), a finished trajectory's reward is instead the verifier's score of
the prompt and the trajectory (`Verifier.extend_scores` on the node's text and each finishing candidate; an A4
candidate replaces the text after the last sub-question), and a new node's value is its A2 candidate's score.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence

import chex
import jax
import jax.numpy as jnp
import mctx
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from jaxreason import sharding
from jaxreason.distributed import addressable
from jaxreason.models.kv_cache import KVCache
from jaxreason.models.llama import CausalLM
from jaxreason.sampling.alignment import right_align
from jaxreason.sampling.buckets import round_up, smallest_fit
from jaxreason.sampling.continuations import read_after_prompts
from jaxreason.sampling.generate import SamplingConfig, sample_from_cache
from jaxreason.sampling.placement import inference_state
from jaxreason.sampling.prompts import eos_ids, pad_left, pad_token_id, prompt_ids
from jaxreason.sampling.stopping import StopTable, build_stop_table, init_stop_buffer, update_stop_buffer
from jaxreason.search.rstar_config import ACTIONS, FINISH, REANSWER, REPHRASE, STEP, SUBQUESTION, RStarConfig
from jaxreason.search.selection import INVALID_LOGIT, is_valid_action
from jaxreason.tasks.base import Problem, Task
from jaxreason.train.metrics import progress
from jaxreason.verifiers.base import Verifier

NO_SUBQUESTION = -1


@chex.dataclass(frozen=True)
class RStarNode:
    """A batch of rStar nodes and the candidates sampled when each was created.

    Attributes:
      tokens: [B, L] the partial solution after the prompt, left-aligned.
      length: [B] its real tokens.
      subquestion_end: [B] where in `tokens` the last sub-question ends (its answer starts), or NO_SUBQUESTION.
      depth: [B] actions from the root.
      node_type: [B] index in ACTIONS of the action that made the node (len(ACTIONS) at the root).
      terminal: [B] the trajectory is finished (or at max_depth).
      reward: [B] a terminal node's reward (its answer's majority confidence, or the verifier's score); 0 otherwise.
      row_key: [B, 2] the problem's key data: every random draw of the row derives from it.
      candidates: [B, K, S] each slot's text, its action's cue first; an A4 slot replaces the answer after
        `subquestion_end`, the others are appended.
      candidate_len: [B, K] real tokens of each candidate.
      candidate_ends: [B, K] taking the candidate finishes the trajectory.
      candidate_values: [B, K] a finishing candidate's reward (as `reward`); 0 for the others.
      candidate_subquestion: [B, K] an A3 candidate's sub-question length (cue included), else NO_SUBQUESTION.
      generated_tokens: [B] tokens sampled to make this node's candidates.
      model_calls: [B] sequences sampled to make them (one per sample, as a per-call engine would count).
      verifier_tokens: [B] tokens the verifier read to score them (0 without a verifier).
    """

    tokens: Int[Array, "B L"]
    length: Int[Array, " B"]
    subquestion_end: Int[Array, " B"]
    depth: Int[Array, " B"]
    node_type: Int[Array, " B"]
    terminal: Bool[Array, " B"]
    reward: Float[Array, " B"]
    row_key: Int[Array, "B 2"]
    candidates: Int[Array, "B K S"]
    candidate_len: Int[Array, "B K"]
    candidate_ends: Bool[Array, "B K"]
    candidate_values: Float[Array, "B K"]
    candidate_subquestion: Int[Array, "B K"]
    generated_tokens: Int[Array, " B"]
    model_calls: Int[Array, " B"]
    verifier_tokens: Int[Array, " B"]


@struct.dataclass
class AnswerKeys:
    """Token-level answers: each id's digits as a canonical id (-1 for an id that is not all digits), so that
    samples are grouped by the last number they write without leaving the program."""

    canonical: Int[Array, " V"]

    @classmethod
    def build(cls, tokenizer, vocab_size: int) -> AnswerKeys:
        table = np.full(vocab_size, -1, np.int32)
        vocab = tokenizer.get_vocab()
        by_text: dict[str, int] = {}
        for token, i in vocab.items():
            if i >= vocab_size:
                continue
            text = tokenizer.convert_tokens_to_string([token]).strip()
            if text.isdigit() and text.isascii():
                table[i] = by_text.setdefault(text, i)
        return cls(canonical=jnp.asarray(table))

    def keys(self, tokens: Int[Array, "... S"], lengths: Int[Array, "..."], width: int = 12):
        """[..., width] the last run of digit tokens of each sample (right-aligned, -1 padded) and [...] whether
        the sample has one."""
        s = tokens.shape[-1]
        idx = jnp.arange(s)
        ids = self.canonical[tokens]
        digit = (ids >= 0) & (idx < lengths[..., None])
        end = jnp.max(jnp.where(digit, idx, -1), axis=-1)
        start = jnp.max(jnp.where(~digit & (idx < end[..., None]), idx, -1), axis=-1) + 1
        pos = end[..., None] - width + 1 + jnp.arange(width)
        inside = (pos >= start[..., None]) & (pos >= 0)
        key = jnp.where(inside, jnp.take_along_axis(ids, jnp.clip(pos, 0, s - 1), axis=-1), -1)
        return key, end >= 0


def majority(keys: Int[Array, "R N W"], has: Bool[Array, "R N"]):
    """Per row: the first sample holding the most frequent answer [R], that answer's share of all N samples [R]
    (samples with no answer do not vote but count), and each sample's agreement matrix [R, N, N]."""
    same = jnp.all(keys[:, :, None] == keys[:, None, :], axis=-1) & has[:, :, None] & has[:, None, :]
    counts = jnp.sum(same, axis=-1)
    winner = jnp.argmax(counts, axis=-1)
    share = jnp.take_along_axis(counts, winner[:, None], -1)[:, 0] / keys.shape[1]
    return winner, share, same


@struct.dataclass
class RStarTables:
    step_end: StopTable  # the step delimiter: A1, A3, A4 and A5 sample one line
    completion_end: StopTable | None  # `prompts.stop`, where an A2 completion ends (None: at EOS only)
    answer: StopTable  # the task's final-answer marker
    answer_keys: AnswerKeys
    cues: tuple[Int[Array, " T"], ...]  # each action's cue, in ACTIONS order
    subanswer: Int[Array, " T"]  # the cue between an A3 sub-question and its answer


def build_tables(tokenizer, config: RStarConfig, task: Task, vocab_size: int) -> RStarTables:
    def ids(text):
        return jnp.asarray(tokenizer.encode(text, add_special_tokens=False), jnp.int32)

    stop = config.prompts.stop
    return RStarTables(step_end=build_stop_table(tokenizer, [task.step_delimiter], vocab_size),
                       completion_end=build_stop_table(tokenizer, [stop], vocab_size) if stop else None,
                       answer=build_stop_table(tokenizer, [task.answer_prefix.strip()], vocab_size),
                       answer_keys=AnswerKeys.build(tokenizer, vocab_size),
                       cues=tuple(ids(config.prompts.cue(a)) for a in ACTIONS), subanswer=ids(config.prompts.subanswer))


@dataclasses.dataclass(frozen=True)
class _Sizes:
    prompt_width: int  # P
    max_len: int  # L, the longest trajectory
    candidate_len: int  # S
    pad_id: int
    eos_ids: tuple[int, ...]


class RStarSearch:
    """The root and recurrent functions of rStar's MCTS for one policy and an optional verifier (`params` is the
    pair of their nnx states; the verifier's is None without one)."""

    def __init__(self, graphdef, config: RStarConfig, sizes: _Sizes, tables: RStarTables, verifier_def=None):
        self.graphdef, self.config, self.sizes, self.tables = graphdef, config, sizes, tables
        self.verifier_def = verifier_def
        space = config.action_space()
        self.slot_types = jnp.asarray(space.slot_types())
        self.validity = jnp.asarray(space.validity())  # [6, K]
        self.slots = {a: np.flatnonzero(space.slot_types() == i) for i, a in enumerate(ACTIONS)}

    # -- sampling ---------------------------------------------------------------------------------------

    def _sampling(self, tokens: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=tokens, temperature=self.config.temperature, top_p=self.config.top_p,
                              shrink_at=self.config.shrink_at)

    def _keys(self, row_keys, key, salt: int, n: int):
        """[B * n] keys for n samples per row, from the row's own key, the simulation's key and `salt`."""
        mixed = jax.vmap(lambda rk: jax.random.fold_in(jax.random.wrap_key_data(rk), salt))(row_keys)
        per_row = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, jax.random.bits(key)), n))(mixed)
        return per_row.reshape(-1)

    def _sample(self, policy, logits, cache, keys, tokens: int, n: int, skip, until_line: bool):
        stop = self.tables.step_end if until_line else self.tables.completion_end
        out = sample_from_cache(policy, logits, cache, keys, self._sampling(tokens), eos_ids=self.sizes.eos_ids,
                                pad_id=self.sizes.pad_id, stop_table=stop, samples_per_prompt=n, skip=skip)
        b = logits.shape[0]
        return out.tokens.reshape(b, n, -1), out.lengths.reshape(b, n)

    def _continue(self, policy, cache: KVCache, last_logits, cue: Int[Array, " T"]):
        """The cache and next-token logits after `cue` is read on top of `cache` (no cue: unchanged)."""
        b = last_logits.shape[0]
        if cue.shape[0] == 0:
            return cache, last_logits
        logits, cache = policy(jnp.broadcast_to(cue, (b, cue.shape[0])), cache=cache)
        return cache, logits[:, -1]

    def _prefill(self, policy, prompts: Prompts, tokens, length, width: int, room: int):
        """A cache of the prompt then each row's first `length` tokens (their last `width`), with `room` free
        slots, and the logits after it."""
        return read_after_prompts(policy, prompts.cache, prompts.last_hidden, tokens, length, width,
                                  pad_id=self.sizes.pad_id, room=room)

    def _widths(self) -> tuple[int, ...]:
        most, widths, w = self.sizes.max_len, [], 64
        while w * 1.25 < most:
            widths.append(w)
            w *= 2
        return (*widths, most)

    # -- expansion --------------------------------------------------------------------------------------

    def _models(self, params):
        policy_state, verifier_state = params
        policy = nnx.merge(self.graphdef, policy_state)
        return policy, None if self.verifier_def is None else nnx.merge(self.verifier_def, verifier_state)

    def _expand(self, policy, verifier, key, prompts: Prompts, node: _Partial, live):
        """The candidates of every action `node` may take, for the rows in `live`."""
        longest = jnp.max(jnp.where(live, node.length, 0))
        return smallest_fit(self._widths(), longest,
                            lambda w: self._expand_at(policy, verifier, key, prompts, node, live, w))

    def _expand_at(self, policy, verifier, key, prompts: Prompts, node: _Partial, live, width: int):
        cfg, t, s = self.config, self.tables, self.sizes.candidate_len
        b = node.length.shape[0]
        allowed = self.validity[node.node_type]  # [B, K]
        has_subq = node.subquestion_end != NO_SUBQUESTION

        def may(action):
            return live & allowed[:, self.slots[action][0]]

        cue = {a: t.cues[i] for i, a in enumerate(ACTIONS)}
        room = max(c.shape[0] for c in t.cues) + cfg.step_tokens + t.subanswer.shape[0]
        cache, logits = self._prefill(policy, prompts, node.tokens, node.length, width, room)
        groups, generated, calls = {}, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32)

        def count(lens, ok, n):  # tokens and sequences sampled for the rows in `ok`
            return jnp.where(ok, jnp.sum(lens, axis=1), 0), jnp.where(ok, n, 0)

        # A2: n completions to the end; keep the first holding the majority answer.
        ok = may(FINISH)
        c2, l2 = self._continue(policy, cache, logits, cue[FINISH])
        fin, fin_len = self._sample(policy, l2, c2, self._keys(node.row_key, key, 2, cfg.num_votes),
                                    cfg.solution_tokens, cfg.num_votes, ~ok, until_line=False)
        fin_keys, fin_has = t.answer_keys.keys(fin, fin_len)
        win, share, _ = majority(fin_keys, fin_has)
        rows = jnp.arange(b)
        groups[FINISH] = (_with_cue(cue[FINISH], fin[rows, win][:, None], fin_len[rows, win][:, None]),
                          jnp.ones((b, 1), bool), share[:, None], jnp.full((b, 1), NO_SUBQUESTION))
        g, c = count(fin_len, ok, cfg.num_votes)
        generated, calls = generated + g, calls + c

        # A1: one line each; a line that states the answer finishes, its reward the share of A2's votes for it.
        ok = may(STEP)
        c1, l1 = self._continue(policy, cache, logits, cue[STEP])
        step, step_len = self._sample(policy, l1, c1, self._keys(node.row_key, key, 1, cfg.num_steps),
                                      cfg.step_tokens, cfg.num_steps, ~ok, until_line=True)
        step_keys, step_has = t.answer_keys.keys(step, step_len)
        agree = (jnp.all(step_keys[:, :, None] == fin_keys[:, None, :], axis=-1) & step_has[:, :, None]
                 & fin_has[:, None])
        step_ends = self._ends(step, step_len)
        groups[STEP] = (_with_cue(cue[STEP], step, step_len), step_ends,
                        jnp.where(step_ends, jnp.mean(agree, axis=-1), 0.0),
                        jnp.full(step_len.shape, NO_SUBQUESTION))
        g, c = count(step_len, ok, cfg.num_steps)
        generated, calls = generated + g, calls + c

        # A3: sub-questions, each answered v times; the answer is the majority.
        ok = may(SUBQUESTION)
        nq, v = cfg.num_subquestions, cfg.num_votes
        c3, l3 = self._continue(policy, cache, logits, cue[SUBQUESTION])
        subq, subq_len = self._sample(policy, l3, c3, self._keys(node.row_key, key, 3, nq), cfg.step_tokens, nq,
                                      ~ok, until_line=True)
        # Each sub-question (left-padded) and the answer cue, read on top of a copy of the node's cache.
        q_tokens, q_mask = right_align(subq.reshape(b * nq, -1), subq_len.reshape(-1), self.sizes.pad_id)
        q_tokens = jnp.concatenate([q_tokens, jnp.broadcast_to(t.subanswer, (b * nq, t.subanswer.shape[0]))], axis=1)
        q_mask = jnp.concatenate([q_mask, jnp.ones((b * nq, t.subanswer.shape[0]), jnp.int32)], axis=1)
        q_logits, q_cache = policy(q_tokens, q_mask, cache=c3.repeat_rows(nq))
        answers, answers_len = self._sample(policy, q_logits[:, -1], q_cache,
                                            self._keys(jnp.repeat(node.row_key, nq, axis=0), key, 4, v),
                                            cfg.answer_tokens, v, jnp.repeat(~ok, nq), until_line=True)
        akeys, ahas = t.answer_keys.keys(answers, answers_len)
        awin, ashare, _ = majority(akeys, ahas)
        chosen = answers[jnp.arange(b * nq), awin]
        chosen_len = answers_len[jnp.arange(b * nq), awin]
        head = _with_cue(cue[SUBQUESTION], subq, subq_len)
        body = _with_cue(t.subanswer, chosen.reshape(b, nq, -1), chosen_len.reshape(b, nq))
        a3 = _concat(head, body)
        a3_ends = self._ends(chosen.reshape(b, nq, -1), chosen_len.reshape(b, nq))
        groups[SUBQUESTION] = (a3, a3_ends, jnp.where(a3_ends, ashare.reshape(b, nq), 0.0), head[1])
        g1, c1_ = count(subq_len, ok, nq)
        g2, c2_ = count(answers_len.reshape(b, nq * v), ok, nq * v)
        generated, calls = generated + g1 + g2, calls + c1_ + c2_

        # A4: the last sub-question answered again, from the text up to it.
        ok = may(REANSWER) & has_subq

        def reanswer():  # a prefill of its own: only when some row may take A4
            cut = jnp.where(has_subq, node.subquestion_end, node.length)
            c4, l4 = self._prefill(policy, prompts, node.tokens, cut, width, room)
            c4, l4 = self._continue(policy, c4, l4, cue[REANSWER])
            return self._sample(policy, l4, c4, self._keys(node.row_key, key, 5, v), cfg.answer_tokens, v, ~ok,
                                until_line=True)

        re, re_len = jax.lax.cond(jnp.any(ok), reanswer, lambda: (
            jnp.full((b, v, cfg.answer_tokens), self.sizes.pad_id, jnp.int32), jnp.zeros((b, v), jnp.int32)))
        rkeys, rhas = t.answer_keys.keys(re, re_len)
        rwin, rshare, _ = majority(rkeys, rhas)
        re_best, re_best_len = re[rows, rwin][:, None], re_len[rows, rwin][:, None]
        a4_ends = self._ends(re_best, re_best_len)
        groups[REANSWER] = (_with_cue(cue[REANSWER], re_best, re_best_len), a4_ends,
                            jnp.where(a4_ends, rshare[:, None], 0.0), jnp.full((b, 1), NO_SUBQUESTION))
        g, c = count(re_len, ok, v)
        generated, calls = generated + g, calls + c

        # A5: the question's conditions, one line.
        ok = may(REPHRASE)
        c5, l5 = self._continue(policy, cache, logits, cue[REPHRASE])
        reph, reph_len = self._sample(policy, l5, c5, self._keys(node.row_key, key, 6, 1), cfg.step_tokens, 1, ~ok,
                                      until_line=True)
        groups[REPHRASE] = (_with_cue(cue[REPHRASE], reph, reph_len), self._eos(reph, reph_len),
                            jnp.zeros((b, 1)), jnp.full((b, 1), NO_SUBQUESTION))
        g, c = count(reph_len, ok, 1)
        generated, calls = generated + g, calls + c

        parts = [groups[a] for a in ACTIONS]
        cand = jnp.concatenate([_pad_to(p[0][0], s, self.sizes.pad_id) for p in parts], axis=1)
        cand_len = jnp.concatenate([p[0][1] for p in parts], axis=1)
        ends = jnp.concatenate([p[1] for p in parts], axis=1)
        values = jnp.concatenate([p[2] for p in parts], axis=1).astype(jnp.float32)
        subq_cut = jnp.concatenate([p[3] for p in parts], axis=1).astype(jnp.int32)
        valid = allowed & live[:, None] & ~_duplicates(cand, cand_len)
        valid = valid & ((self.slot_types != ACTIONS.index(REANSWER)) | has_subq[:, None])
        valid = valid & (cand_len > jnp.asarray([c.shape[0] for c in t.cues])[self.slot_types])  # sampled something
        read = jnp.zeros((b,), jnp.int32)
        if verifier is not None:
            scores, read = self._verified(verifier, prompts, node, cand, cand_len, ends & valid)
            values = jnp.where(ends, scores, values)
            share = scores[:, self.slots[FINISH][0]]
        return _Expansion(candidates=cand, candidate_len=cand_len, candidate_ends=ends, candidate_values=values,
                          candidate_subquestion=subq_cut, prior_logits=jnp.where(valid, 0.0, INVALID_LOGIT),
                          generated_tokens=generated, model_calls=calls, verifier_tokens=read, finish_share=share)

    def _verified(self, verifier, prompts: Prompts, node: _Partial, cand, cand_len, scored):
        """The verifier's score [B, K] of the prompt, the node's text and each candidate (an A4 candidate after the
        text up to the last sub-question), and the tokens it read for the candidates in `scored` [B, K]."""
        b, k = cand_len.shape
        text = jnp.pad(prompts.tokens, ((0, 0), (0, node.tokens.shape[1])), constant_values=self.sizes.pad_id)
        text = jax.vmap(_write)(text, prompts.length, node.tokens, node.length)
        up_to_subquestion = jnp.where(node.subquestion_end == NO_SUBQUESTION, node.length, node.subquestion_end)
        a4 = self.slots[REANSWER]
        scores, read = jnp.zeros((b, k)), jnp.zeros((b,), jnp.int32)
        for slots, cut in ((np.setdiff1d(np.arange(k), a4), node.length), (a4, up_to_subquestion)):
            if not len(slots):
                continue
            base = prompts.length + cut
            scores = scores.at[:, slots].set(verifier.extend_scores(text, base, cand[:, slots], cand_len[:, slots],
                                                                    prompt_len=prompts.length))
            mine = scored[:, slots]
            cost = verifier.extend_cost(base, jnp.where(mine, cand_len[:, slots], 0))
            read = read + jnp.where(jnp.any(mine, axis=1), cost, 0).astype(jnp.int32)
        return scores, read

    def _eos(self, tokens, lens):
        last = jnp.take_along_axis(tokens, jnp.maximum(lens - 1, 0)[..., None], -1)[..., 0]
        return (lens > 0) & jnp.isin(last, jnp.asarray(self.sizes.eos_ids or (-1,)))

    def _ends(self, tokens: Int[Array, "B N S"], lens: Int[Array, "B N"]) -> Bool[Array, "B N"]:
        """The sample states the final answer (the task's marker) or ends on EOS."""
        b, n, s = tokens.shape
        flat = tokens.reshape(b * n, s)
        inside = jnp.arange(s)[None, :] < lens.reshape(-1, 1)

        def scan_token(carry, x):
            buffer, hit = carry
            token, real = x
            buffer, now = update_stop_buffer(self.tables.answer, buffer, token)
            return (buffer, hit | (now & real)), None

        init = (init_stop_buffer(self.tables.answer, b * n), jnp.zeros((b * n,), bool))
        (_, hit), _ = jax.lax.scan(scan_token, init, (flat.T, inside.T))
        return hit.reshape(b, n) | self._eos(tokens, lens)

    # -- nodes ------------------------------------------------------------------------------------------

    def _node(self, policy, verifier, key, prompts: Prompts, partial: _Partial, live):
        ex = self._expand(policy, verifier, key, prompts, partial, live & ~partial.terminal)
        finish_slot = self.slots[FINISH][0]
        has_finish = is_valid_action(ex.prior_logits[:, finish_slot])
        # A node none of whose candidates is valid (all empty or repeated) is a dead end: terminal, reward 0.
        terminal = partial.terminal | ~jnp.any(is_valid_action(ex.prior_logits), axis=1)
        value = jnp.where(partial.terminal, partial.reward, jnp.where(has_finish, ex.finish_share, 0.0))
        value = jnp.where(terminal & ~partial.terminal, 0.0, value)
        node = RStarNode(tokens=partial.tokens, length=partial.length, subquestion_end=partial.subquestion_end,
                         depth=partial.depth, node_type=partial.node_type, terminal=terminal,
                         reward=partial.reward, row_key=partial.row_key, candidates=ex.candidates,
                         candidate_len=ex.candidate_len, candidate_ends=ex.candidate_ends,
                         candidate_values=ex.candidate_values, candidate_subquestion=ex.candidate_subquestion,
                         generated_tokens=ex.generated_tokens, model_calls=ex.model_calls,
                         verifier_tokens=ex.verifier_tokens)
        return node, ex.prior_logits, value

    def root_fn(self, params, key, prompts: Prompts, row_keys) -> mctx.RootFnOutput:
        policy, verifier = self._models(params)
        b = prompts.length.shape[0]
        zeros = jnp.zeros((b,), jnp.int32)
        root = _Partial(tokens=jnp.full((b, self.sizes.max_len), self.sizes.pad_id, jnp.int32), length=zeros,
                        subquestion_end=jnp.full((b,), NO_SUBQUESTION, jnp.int32), depth=zeros,
                        node_type=jnp.full((b,), len(ACTIONS), jnp.int32), terminal=jnp.zeros((b,), bool),
                        reward=jnp.zeros((b,)), row_key=row_keys)
        node, prior, value = self._node(policy, verifier, key, prompts, root, jnp.ones((b,), bool))
        return mctx.RootFnOutput(prior_logits=prior, value=value, embedding=node)

    def recurrent_fn(self, params, key, action, parent: RStarNode, prompts: Prompts):
        """Takes candidate `action` at each parent. Below a terminal node nothing changes: the same node and
        reward are backed up again (its copy counts no tokens)."""
        policy, verifier = self._models(params)
        stay = parent.terminal
        child = self._take(parent, action)
        node, prior, value = self._node(policy, verifier, key, prompts, child, ~stay)
        node = jax.tree.map(lambda p, c: jnp.where(_rows(stay, c), p, c), parent, node)
        node = node.replace(generated_tokens=jnp.where(stay, 0, node.generated_tokens),
                            model_calls=jnp.where(stay, 0, node.model_calls),
                            verifier_tokens=jnp.where(stay, 0, node.verifier_tokens))
        value = jnp.where(stay, parent.reward, value)
        prior = jnp.where(stay[:, None], INVALID_LOGIT, prior)
        out = mctx.RecurrentFnOutput(reward=jnp.where(node.terminal, value, 0.0),
                                     discount=jnp.where(node.terminal, 0.0, 1.0), prior_logits=prior, value=value)
        return out, node

    def _take(self, parent: RStarNode, slot) -> _Partial:
        rows = jnp.arange(slot.shape[0])
        kind = self.slot_types[slot]
        start = jnp.where(kind == ACTIONS.index(REANSWER), parent.subquestion_end, parent.length)
        piece, piece_len = parent.candidates[rows, slot], parent.candidate_len[rows, slot]
        kept = jnp.minimum(piece_len, parent.tokens.shape[1] - start)
        tokens = jax.vmap(_write)(parent.tokens, start, piece, kept)
        tokens = jnp.where(jnp.arange(tokens.shape[1])[None] < (start + kept)[:, None], tokens, self.sizes.pad_id)
        subq = parent.candidate_subquestion[rows, slot]
        depth = parent.depth + 1
        ends = parent.candidate_ends[rows, slot]
        return _Partial(tokens=tokens, length=start + kept,
                        subquestion_end=jnp.where(subq != NO_SUBQUESTION, start + subq, parent.subquestion_end),
                        depth=depth, node_type=kind, terminal=ends | (depth >= self.config.max_depth),
                        reward=jnp.where(ends, parent.candidate_values[rows, slot], 0.0), row_key=parent.row_key)


@struct.dataclass
class Prompts:
    """The problems' prompts, prefilled once per search: cache [B, P] right-aligned, last hidden [B, E]; their
    ids left-aligned (a verifier reads them before the trajectory)."""

    cache: KVCache
    last_hidden: Float[Array, "B E"]
    length: Int[Array, " B"]
    tokens: Int[Array, "B P"]


@struct.dataclass
class _Partial:
    tokens: Int[Array, "B L"]
    length: Int[Array, " B"]
    subquestion_end: Int[Array, " B"]
    depth: Int[Array, " B"]
    node_type: Int[Array, " B"]
    terminal: Bool[Array, " B"]
    reward: Float[Array, " B"]
    row_key: Int[Array, "B 2"]


@struct.dataclass
class _Expansion:
    candidates: Int[Array, "B K S"]
    candidate_len: Int[Array, "B K"]
    candidate_ends: Bool[Array, "B K"]
    candidate_values: Float[Array, "B K"]
    candidate_subquestion: Int[Array, "B K"]
    prior_logits: Float[Array, "B K"]
    generated_tokens: Int[Array, " B"]
    model_calls: Int[Array, " B"]
    verifier_tokens: Int[Array, " B"]
    finish_share: Float[Array, " B"]


def _with_cue(cue: Int[Array, " T"], tokens: Int[Array, "B N S"], lens: Int[Array, "B N"]):
    b, n, _ = tokens.shape
    return jnp.concatenate([jnp.broadcast_to(cue, (b, n, cue.shape[0])), tokens], axis=-1), lens + cue.shape[0]


def _concat(a, b):
    """Two left-aligned pieces [B, N, Sa], [B, N, Sb] joined: a's real tokens then b's."""
    (ta, la), (tb, lb) = a, b
    out = jnp.concatenate([ta, jnp.zeros_like(tb)], axis=-1)
    out = jax.vmap(jax.vmap(_write))(out, la, jnp.concatenate([tb, jnp.zeros_like(ta)], axis=-1), lb)
    return out, la + lb


def _pad_to(tokens: Int[Array, "B N S"], width: int, pad_id: int):
    return jnp.pad(tokens, ((0, 0), (0, 0), (0, width - tokens.shape[-1])), constant_values=pad_id)


def _write(row: Int[Array, " L"], at, piece: Int[Array, " S"], count) -> Int[Array, " L"]:
    positions = jnp.arange(row.shape[0])
    source = jnp.clip(positions - at, 0, piece.shape[0] - 1)
    return jnp.where((positions >= at) & (positions < at + count), piece[source], row)


def _duplicates(cand, lens):
    same = jnp.all(cand[:, :, None] == cand[:, None, :], axis=-1) & (lens[:, :, None] == lens[:, None, :])
    return jnp.any(same & jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)[None], axis=-1)


def _rows(mask, like):
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


# -- selection --------------------------------------------------------------------------------------------


def _uct(tree: mctx.Tree, node_index, valid, c: float):
    """rStar's UCT at one node of an unbatched tree: an untried valid child first (in a random order drawn from
    the problem's key, the node and its visits), else the argmax of Q/N + c sqrt(ln N_parent / N)."""
    visits = tree.children_visits[node_index]
    q = tree.qvalues(node_index)
    n_parent = tree.node_visits[node_index].astype(q.dtype)
    uct = q + c * jnp.sqrt(jnp.log(jnp.maximum(n_parent, 1.0)) / jnp.maximum(visits, 1).astype(q.dtype))
    row_key = jax.random.wrap_key_data(tree.embeddings.row_key[node_index])
    draw = jax.random.fold_in(jax.random.fold_in(row_key, node_index), tree.node_visits[node_index])
    noise = jax.random.uniform(draw, visits.shape)
    fresh = valid & (visits == 0)
    score = jnp.where(jnp.any(fresh), jnp.where(fresh, noise, -jnp.inf), uct)
    return jnp.argmax(jnp.where(valid, score, -jnp.inf)).astype(jnp.int32)


def rstar_root_selection(rng_key, tree, node_index, *, c):
    del rng_key
    valid = is_valid_action(tree.children_prior_logits[node_index]) & (tree.root_invalid_actions == 0)
    return _uct(tree, node_index, valid, c)


def rstar_interior_selection(rng_key, tree, node_index, depth, *, c):
    del rng_key, depth
    return _uct(tree, node_index, is_valid_action(tree.children_prior_logits[node_index]), c)


# -- the program and its driver ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _program(graphdef, config: RStarConfig, sizes: _Sizes, mesh: Mesh | None = None, verifier_def=None):
    """The jitted prompts -> tree program; with a mesh (of `data` alone), each device searches its share of the
    rows (`sharding.split_over_data`, no collectives: problems do not interact, and every random draw comes from
    a row's own key). `params`: the policy's nnx state and the verifier's (None without one)."""

    def program(params, tables, key, prompt_tokens, prompt_mask, row_keys):
        search = RStarSearch(graphdef, config, sizes, tables, verifier_def)
        policy, _ = search._models(params)
        b, p = prompt_tokens.shape
        cache = KVCache.init(policy.config, b, p, dtype=policy.transformer.dtype)
        hidden, cache = policy.transformer(prompt_tokens, prompt_mask, cache=cache)
        length = jnp.sum(prompt_mask, axis=1)
        left = jax.vmap(lambda row, n: jnp.roll(row, n - p))(prompt_tokens, length)  # left-padded -> left-aligned
        left = jnp.where(jnp.arange(p)[None] < length[:, None], left, sizes.pad_id)
        prompts = Prompts(cache=cache, last_hidden=hidden[:, -1], length=length, tokens=left)
        root_key, search_key = jax.random.split(key)
        root = search.root_fn(params, root_key, prompts, row_keys)
        invalid = (~is_valid_action(root.prior_logits)).astype(jnp.float32)
        return mctx.search(params=params, rng_key=search_key, root=root,
                           recurrent_fn=functools.partial(search.recurrent_fn, prompts=prompts),
                           root_action_selection_fn=functools.partial(rstar_root_selection, c=config.c),
                           interior_action_selection_fn=functools.partial(rstar_interior_selection, c=config.c),
                           num_simulations=config.num_rollouts, max_depth=config.max_depth + 1,
                           invalid_actions=invalid)

    if mesh is None:
        return jax.jit(program)
    # the arguments come laid out (see the caller)
    return jax.jit(sharding.split_over_data(program, mesh, (False, False, False, True, True, True)))


def rstar_trees(problems: Sequence[Problem], *, policy: CausalLM, tokenizer, task: Task, config: RStarConfig,
                key: jax.Array, chat: bool = False, first_index: int = 0, mesh: Mesh | None = None,
                verifier: Verifier | None = None) -> Iterator[tuple[mctx.Tree, int]]:
    """rStar's trees, `config.batch_size` problems per jitted call, with how many rows of each are real.

    Problem i (counted from `first_index`) searches with `fold_in(key, i)`, so its tree does not depend on the
    batch it is in. The last batch is padded with copies of its last problem. With `mesh`, each batch (rounded up
    to a multiple of `data` x `fsdp`) is split over its batch axes and the models' weights are sharded by the
    rules, in their compute dtype (`placement.inference_state`); on a mesh that shards them, the search is one
    program that XLA partitions.
    """
    prompts = [prompt_ids(tokenizer, config.prompts.prompt.format(question=p.question), chat=chat) for p in problems]
    tables = build_tables(tokenizer, config, task, policy.config.vocab_size)
    cues = [c.shape[0] for c in tables.cues]
    candidate = max(cues[0] + config.step_tokens, cues[1] + config.solution_tokens,
                    cues[2] + config.step_tokens + tables.subanswer.shape[0] + config.answer_tokens,
                    cues[3] + config.answer_tokens, cues[4] + config.step_tokens)
    sizes = _Sizes(prompt_width=0, max_len=round_up(config.max_depth * candidate, 16), candidate_len=candidate,
                   pad_id=pad_token_id(tokenizer), eos_ids=eos_ids(tokenizer, policy.config))
    tokens, mask = pad_left(prompts, sizes.pad_id, multiple=64)
    sizes = dataclasses.replace(sizes, prompt_width=tokens.shape[1])
    mesh = mesh if mesh is not None and mesh.size > 1 else None
    graphdef, policy_params = inference_state(policy, mesh)  # once, not per batch
    verifier_def, verifier_params = inference_state(verifier, mesh) if verifier is not None else (None, None)
    params = (policy_params, verifier_params)
    program = _program(graphdef, config, sizes, mesh if mesh is not None and not sharding.shards_weights(mesh)
                       else None, verifier_def)
    if mesh is not None:
        tables = jax.device_put(tables, sharding.replicated(mesh))
    batch = sharding.split_rows(min(config.batch_size, len(problems)), mesh)
    for start in range(0, len(problems), batch):
        rows = np.minimum(np.arange(start, start + batch), len(problems) - 1)
        row_keys = jnp.stack([jax.random.key_data(jax.random.fold_in(key, first_index + int(r))) for r in rows])
        row_args = (jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]), row_keys)
        if mesh is not None:
            row_args = jax.device_put(row_args, tuple(sharding.batch_sharding(mesh, x.ndim) for x in row_args))
        yield program(params, tables, key, *row_args), min(batch, len(problems) - start)


# -- the trajectories a search found ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One finished trajectory of a problem's tree: a candidate that ends the solution, of any node.

    Attributes:
      text: the solution after the prompt (special tokens removed).
      answer: the task's answer extracted from it (None: it states none).
      score: the generator's reward of it: its answer's majority confidence, or the verifier's score of it.
      action: the action that finished it.
      node: the tree node whose candidate it is; node n exists after n rollouts (the root after none).
    """

    text: str
    answer: str | None
    score: float
    action: str
    node: int


def finished_trajectories(tree: mctx.Tree, row: int, config: RStarConfig, tokenizer, task: Task) -> list[Trajectory]:
    """Every finished candidate of every node of problem `row`'s tree, in node order (the paper collects the
    solution nodes of all rollouts: here every child a node created that finishes the solution)."""
    e = jax.tree.map(lambda x: np.asarray(x[row]), tree.embeddings)
    visits = np.asarray(tree.node_visits[row])
    prior = np.asarray(tree.children_prior_logits[row])
    slot_types = config.action_space().slot_types()
    out = []
    for n in np.flatnonzero(visits > 0):
        if e.terminal[n]:
            continue
        for k in np.flatnonzero(e.candidate_ends[n] & (prior[n] > INVALID_LOGIT / 2)):
            action = ACTIONS[slot_types[k]]
            start = e.subquestion_end[n] if action == REANSWER else e.length[n]
            ids = np.concatenate([e.tokens[n, :start], e.candidates[n, k, : e.candidate_len[n, k]]])
            text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
            out.append(Trajectory(text=text, answer=task.extract_answer(text), score=float(e.candidate_values[n, k]),
                                  action=action, node=int(n)))
    return out


@dataclasses.dataclass
class RStarResult:
    """The generator's output on a list of problems.

    Attributes:
      trajectories: [P] each problem's finished trajectories (`finished_trajectories`).
      node_tokens: [P, N + 1] tokens sampled to create each node of the problem's tree (0 for a node that
        was never created); summed up to node r, the cost of r rollouts.
      node_calls: [P, N + 1] sequences sampled to create each node.
      node_verifier_tokens: [P, N + 1] tokens the verifier read to score each node's candidates (0 without one).
      seconds: wall-clock time, compilation included.
    """

    trajectories: list[list[Trajectory]]
    node_tokens: np.ndarray
    node_calls: np.ndarray
    node_verifier_tokens: np.ndarray
    seconds: float


def generate_trajectories(problems: Sequence[Problem], *, policy: CausalLM, tokenizer, task: Task, config: RStarConfig,
                          key: jax.Array, chat: bool = False, mesh: Mesh | None = None,
                          verifier: Verifier | None = None) -> RStarResult:
    """rStar's generator on every problem (`rstar_trees`, with a progress bar)."""
    started = time.perf_counter()
    trajectories, tokens, calls, read = [], [], [], []
    with progress(len(problems), description="rstar") as bar:
        for tree, real in rstar_trees(problems, policy=policy, tokenizer=tokenizer, task=task, config=config, key=key,
                                      chat=chat, mesh=mesh, verifier=verifier):
            tree = addressable(tree)  # split over the processes of a multi-host mesh: gathered before it is read
            created = np.asarray(tree.node_visits) > 0
            tokens.append((np.asarray(tree.embeddings.generated_tokens) * created)[:real])
            calls.append((np.asarray(tree.embeddings.model_calls) * created)[:real])
            read.append((np.asarray(tree.embeddings.verifier_tokens) * created)[:real])
            trajectories += [finished_trajectories(tree, r, config, tokenizer, task) for r in range(real)]
            bar.update(real)
    return RStarResult(trajectories=trajectories, node_tokens=np.concatenate(tokens).astype(np.int64),
                       node_calls=np.concatenate(calls).astype(np.int64),
                       node_verifier_tokens=np.concatenate(read).astype(np.int64),
                       seconds=time.perf_counter() - started)
