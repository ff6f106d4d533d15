"""The mctx adapter for step-level reasoning search: `root_fn` and `recurrent_fn` driven by a policy and a
verifier.

Creating a node samples its K candidate next steps in one batched call, so the node's prior logits (the
candidates' length-normalised log-probabilities) are known when `recurrent_fn` returns. The prompts' keys and
values are computed once per search (`encode_prompts`); a node's prefill covers only its steps, on top of a
copy of its prompt's cache, and its K samples decode from that one shared prefix. The verifier scores each
candidate as it is sampled: the value of the child that taking it creates. Taking action k appends candidate k
to the partial solution. A step that ends the solution (final-answer marker, EOS, depth or length limit) makes
a terminal node: its score goes into `reward` with discount 0, and an expansion below it changes nothing and
backs up the same score again.

As ReST-MCTS*'s reference expansion does, creating a node also visits its best child (by value), rolled
forward `rollout_steps` greedy steps when that is on, and the node's value is that child's
(`ExpansionSpec.visit_best_child`; the child becomes a node of its own only when a later simulation takes it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import mctx
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from jaxreason.models.kv_cache import KVCache
from jaxreason.models.packing import Packing
from jaxreason.sampling.alignment import right_align
from jaxreason.sampling.buckets import batch_sizes, put_rows, smallest_fit
from jaxreason.sampling.generate import SamplingConfig, sample_from_cache
from jaxreason.sampling.stopping import StopTable, build_stop_table, init_stop_buffer, update_stop_buffer
from jaxreason.search.actions import ActionSpace
from jaxreason.search.node import NO_SLOT, NodeState
from jaxreason.search.selection import INVALID_LOGIT, is_valid_action
from jaxreason.verifiers.base import combine, initial_score


@dataclasses.dataclass(frozen=True)
class ExpansionSpec:
    """Static sizes and sampling settings of one search program."""

    max_len: int  # L: prompt + all steps
    max_depth: int  # D: steps from the root; a node at this depth is terminal
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=48, temperature=0.7)  # max_new_tokens: S, one step
    prompt_width: int = 0  # P: room for the longest prompt (0: max_len); a longer prompt keeps its last P tokens
    rollout_steps: int = 0  # ReST-MCTS*'s greedy roll-forward length r (0: off)
    rollout_alpha: float = 0.5  # V <- (1 - alpha) V + alpha * max V along the roll
    pad_id: int = 0
    eos_ids: tuple[int, ...] = ()
    verifier_shares_backbone: bool = False  # step scores read from the policy's hidden states (no second pass)
    expansion_sizes: tuple[float, ...] = (1.0, 0.75, 0.5)  # fractions of the batch an expansion is compiled for
    prefill_packing: tuple[float, ...] = ()  # fractions of a padded prefill its real tokens are packed into
    visit_best_child: bool = True  # a new node's best child is visited at once and gives the node its value

    @property
    def max_step_tokens(self) -> int:
        return self.sampling.max_new_tokens


@struct.dataclass
class Prompts:
    """The search's prompts, prefilled once: every node's prefill continues its row of `cache`.

    Attributes:
      tokens: [B, L] left-aligned prompts (the root's partial solutions).
      length: [B] prompt lengths.
      cache: the prompts' keys and values, right-aligned in P slots (`ExpansionSpec.prompt_width`).
      last_hidden: [B, E] the policy's hidden state at each prompt's last token.
    """

    tokens: Int[Array, "B L"]
    length: Int[Array, " B"]
    cache: KVCache
    last_hidden: Float[Array, "B E"]


@struct.dataclass
class Expansion:
    """The K candidate next steps of a batch of partial solutions, sampled and scored in one expansion.

    Attributes:
      candidates: [B, K, S] each candidate, left-aligned (an action type's template first).
      candidate_len: [B, K] real tokens of each candidate.
      prior_logits: [B, K] length-normalised log-probability; `INVALID_LOGIT` where there is no candidate (a row
        not expanded, no room left, a duplicate of an earlier slot).
      candidate_ends: [B, K] the candidate ends the solution (EOS or the final-answer marker).
      step_scores: [B, K] the verifier's step score of the partial solution followed by the candidate.
      generated_tokens: [B] tokens sampled.
      verifier_tokens: [B] tokens the verifier read.
    """

    candidates: Int[Array, "B K S"]
    candidate_len: Int[Array, "B K"]
    prior_logits: Float[Array, "B K"]
    candidate_ends: Bool[Array, "B K"]
    step_scores: Float[Array, "B K"]
    generated_tokens: Int[Array, " B"]
    verifier_tokens: Int[Array, " B"]

    @classmethod
    def empty(cls, batch: int, like: Expansion, pad_id: int) -> Expansion:
        """`batch` rows with no candidates, shaped as `like`'s."""
        zeros = jax.tree.map(lambda x: jnp.zeros((batch, *x.shape[1:]), x.dtype), like)
        return zeros.replace(candidates=jnp.full_like(zeros.candidates, pad_id),
                             prior_logits=jnp.full_like(zeros.prior_logits, INVALID_LOGIT))


@struct.dataclass
class PartialSolution:
    """A batch of partial solutions: what a node is before its candidates are sampled.

    Attributes:
      tokens: [B, L] prompt followed by the steps so far, left-aligned, padded after `length`.
      length: [B] number of real tokens in `tokens`.
      step_ends: [B, D] for each step i < depth, the index in `tokens` one past its last token; 0 after.
      depth: [B] steps taken from the root.
      node_type: [B] the action type of the last step (`ActionSpace.root_type` at the root).
      terminal: [B] the last step ended the solution (final answer, EOS, or the depth/length limit).
      score: [B] the verifier's score of the partial solution (its step scores under the aggregation).
    """

    tokens: Int[Array, "B L"]
    length: Int[Array, " B"]
    step_ends: Int[Array, "B D"]
    depth: Int[Array, " B"]
    node_type: Int[Array, " B"]
    terminal: Bool[Array, " B"]
    score: Float[Array, " B"]


class _Models(NamedTuple):
    policy: object
    verifier: object


@struct.dataclass
class StepTables:
    """Host-built token tables, passed to the search program as arrays (template shapes are static)."""

    step_end: StopTable  # the step delimiter
    answer: StopTable  # the final-answer marker
    templates: tuple[Int[Array, " T"], ...]  # token ids of each action type's template


def build_step_tables(tokenizer, action_space: ActionSpace, step_delimiter: str, answer_marker: str,
                      vocab_size: int) -> StepTables:
    return StepTables(
        step_end=build_stop_table(tokenizer, [step_delimiter], vocab_size),
        answer=build_stop_table(tokenizer, [answer_marker.strip()], vocab_size),
        templates=tuple(
            jnp.asarray(tokenizer.encode(t.template, add_special_tokens=False), jnp.int32) for t in action_space.types
        ),
    )


class StepSearch:
    """Builds the root and recurrent functions for a policy/verifier pair over one action space.

    `params` passed to mctx is `(policy_state, verifier_state)`; the graph definitions are fixed here. A search
    split over devices sees its own rows only: `first_row` (traced) is the index of its first row in the whole
    batch of `total_rows` (static; None: this search's own batch), so that every row draws the random numbers
    it would draw in one unsplit search.
    """

    def __init__(self, policy_graphdef, verifier_graphdef, action_space: ActionSpace, spec: ExpansionSpec,
                 tables: StepTables, first_row: Int[Array, ""] | int = 0, total_rows: int | None = None):
        self.first_row = first_row
        self.total_rows = total_rows
        self.policy_graphdef = policy_graphdef
        self.verifier_graphdef = verifier_graphdef
        self.space = action_space
        self.spec = spec
        self.tables = tables
        for action, template in zip(action_space.types, tables.templates):
            if template.shape[0] >= spec.max_step_tokens:
                raise ValueError(
                    f"action type {action.name!r}: its template is {template.shape[0]} tokens, which leaves no room "
                    f"in max_step_tokens={spec.max_step_tokens}"
                )
        self.slot_types = jnp.asarray(action_space.slot_types())
        self.validity = jnp.asarray(action_space.validity())

    # -- candidates ---------------------------------------------------------------------------------------

    @property
    def _prompt_width(self) -> int:
        return self.spec.prompt_width or self.spec.max_len

    def _widths(self) -> tuple[int, ...]:
        """Widths of the steps part the search compiles for: 32, 64, 128, ... and the most steps can take. A
        width within a quarter of the most is left out: its rows run at the most for little more, and each width
        is another copy of the expansion in the program."""
        most = min(self.spec.max_depth * self.spec.max_step_tokens, self.spec.max_len)
        widths, w = [], 32
        while w * 1.25 < most:
            widths.append(w)
            w *= 2
        return (*widths, most)

    def encode_prompts(self, params, tokens: Int[Array, "B L"], prompt_len: Int[Array, " B"]) -> Prompts:
        """Prefills the left-aligned prompts once, for the whole search."""
        policy, _ = self._models(params)
        width = self._prompt_width
        prompt, mask = right_align(tokens, prompt_len, self.spec.pad_id, width)
        cache = KVCache.init(policy.config, tokens.shape[0], width, dtype=policy.transformer.dtype)
        hidden, cache = policy.transformer(prompt, mask, cache=cache)
        return Prompts(tokens=tokens, length=prompt_len, cache=cache, last_hidden=hidden[:, -1])

    def _expand(self, models: _Models, key, prompts: Prompts, tokens, length, expand,
                at_root: bool = False) -> Expansion:
        """The K candidate steps after each partial solution in `expand` [B], with their step scores.

        Rows outside `expand` (terminal nodes, copies below them) get no candidates (`Expansion.empty`). In a
        search many simulations end on a terminal node, so the rows to expand are gathered into the smallest of
        a few batch sizes that holds them (`spec.expansion_sizes`) instead of paying for a full prefill and
        decode. Within that, the program holds one copy of the expansion per width of the steps part
        (`_widths`) and runs the narrowest that fits the longest row. A row's samples depend on its own index
        only, so the gathering changes no result. `at_root` (static): no row has steps yet, so the only size and
        width compiled are all rows and the narrowest width (what the switches would pick).
        """
        b = tokens.shape[0]
        sizes = (b,) if at_root else batch_sizes(b, self.spec.expansion_sizes)
        widths = self._widths()[:1] if at_root else self._widths()
        order = jnp.argsort(~expand, stable=True)  # the rows to expand first, in their order
        longest = jnp.max(jnp.where(expand, length - prompts.length, 1))

        def at_size(size: int) -> Expansion:
            rows = jnp.arange(b) if size == b else order[:size]
            sub = (prompts, tokens, length) if size == b else (_take_prompts(prompts, rows), tokens[rows],
                                                               length[rows])
            out = smallest_fit(widths, longest, lambda w: self._expand_at_width(
                models, key, *sub, ~expand[rows], rows, b, w))
            if size == b:
                return out
            # Scatter back; the padding rows past the expanded ones must not overwrite anything.
            return put_rows(Expansion.empty(b, out, self.spec.pad_id), jnp.where(expand[rows], rows, b), out)

        out = smallest_fit(sizes, jnp.sum(expand), at_size)
        return out.replace(prior_logits=jnp.where(expand[:, None], out.prior_logits, INVALID_LOGIT))

    def _expand_at_width(self, models: _Models, key, prompts: Prompts, tokens, length, skip, rows, batch: int,
                         width: int) -> Expansion:
        """`_expand` for a batch of b partial solutions whose steps fit in `width` tokens.

        The partial solutions are rows `rows` [b] of the search's `batch`; a row's random draws depend on its
        index in the whole batch (see `first_row`), not on which rows are expanded with it. Rows in `skip` get
        no candidates. The steps after the prompt (their last `width` tokens, left-padded) are prefilled once on
        top of the prompt's cached keys and values; each action type's template runs on top of that, and its
        samples continue from there, sharing it. A candidate's step score is read from the sampler's last hidden
        state when the verifier's value head shares the policy's backbone, else by `verifier.extend_scores`.
        """
        spec, b, (policy, verifier) = self.spec, tokens.shape[0], models
        p = self._prompt_width
        steps, mask = right_align(tokens, length, spec.pad_id, width, start=prompts.length)
        mask = jnp.where(skip[:, None], 0, mask)  # nothing to prefill for a row that gets no candidates
        room = max(t.shape[0] for t in self.tables.templates)  # the templates run on top of the prefix
        cache = KVCache.init(policy.config, b, p + width + room, dtype=policy.transformer.dtype)
        cache = cache.replace(k=cache.k.at[:, :, :, :p].set(prompts.cache.k),
                              v=cache.v.at[:, :, :, :p].set(prompts.cache.v),
                              mask=cache.mask.at[:, :p].set(prompts.cache.mask), index=jnp.asarray(p, jnp.int32))
        hidden, cache = self._prefill(policy, steps, mask, cache)
        last = jnp.where((length > prompts.length)[:, None], hidden[:, -1], prompts.last_hidden)  # no steps yet
        last_logits = policy.logits_from_hidden(last[:, None])[:, 0]
        groups = []
        for g, action in enumerate(self.space.types):
            template = jnp.asarray(self.tables.templates[g])
            t = template.shape[0]
            if t:
                logits, group_cache = policy(jnp.broadcast_to(template, (b, t)), cache=cache)
                logits = logits[:, -1]
            else:
                logits, group_cache = last_logits, cache
            config = dataclasses.replace(spec.sampling, max_new_tokens=spec.max_step_tokens - t)
            n = action.num_samples
            total = self.total_rows or batch
            keys = jax.random.split(jax.random.fold_in(key, g), total * n).reshape(total, n)[self.first_row + rows]
            keys = keys.reshape(b * n)
            space = tokens.shape[1] - length - t  # a candidate never overflows its row: it is cut to fit
            out = sample_from_cache(policy, logits, group_cache, keys, config, eos_ids=spec.eos_ids,
                                    pad_id=spec.pad_id,
                                    stop_table=self.tables.step_end if action.until_step_end else None,
                                    samples_per_prompt=n, skip=skip | (space < 1), max_tokens=space)
            new = out.tokens.reshape(b, n, -1)
            cand = jnp.concatenate([jnp.broadcast_to(template, (b, n, t)), new], axis=-1)
            lens = out.lengths.reshape(b, n)
            logp = out.logprobs.reshape(b, n, -1).sum(-1) / jnp.maximum(lens, 1)  # length-normalised
            logp = jnp.where((space < 1)[:, None], INVALID_LOGIT, logp)  # not even the template fits
            ended_eos = jnp.isin(jnp.take_along_axis(new, jnp.maximum(lens - 1, 0)[..., None], -1)[..., 0],
                                 jnp.asarray(spec.eos_ids or (-1,)))
            last_hidden = out.last_hidden.reshape(b, n, -1)
            groups.append((cand, t + lens, logp, ended_eos, last_hidden, jnp.sum(lens, axis=1)))
        cand, lens, logp, ended_eos, last_hidden = (jnp.concatenate([g[i] for g in groups], axis=1)
                                                    for i in range(5))
        if spec.verifier_shares_backbone:
            scores, read = verifier.from_hidden(last_hidden), jnp.zeros((b,), jnp.int32)
        else:
            scores = verifier.extend_scores(tokens, length, cand, lens, width=p + width, prompt_len=prompts.length)
            read = jnp.where(skip, 0, verifier.extend_cost(length, lens, width=p + width))
        return Expansion(
            candidates=cand, candidate_len=lens,
            prior_logits=jnp.where(_duplicates(cand, lens), INVALID_LOGIT, logp),
            candidate_ends=ended_eos | self._contains_answer(cand), step_scores=scores,
            generated_tokens=sum(g[5] for g in groups), verifier_tokens=read.astype(jnp.int32))

    def _prefill(self, policy, steps: Int[Array, "B W"], mask: Int[Array, "B W"], cache: KVCache):
        """The steps' forward pass on top of the prompts' cache: hidden states [B, W, E] and the cache.

        With `spec.prefill_packing`, its matmuls run on the real tokens only (`Packing`): the partial solutions
        of an expansion have 0 to max_depth steps, padded to the longest, so a padded prefill is mostly
        padding. The program holds one copy per capacity (those fractions of B x W, and all of it) and runs
        the smallest that holds the real tokens.
        """
        if not self.spec.prefill_packing:
            return policy.transformer(steps, mask, cache=cache)
        b, w = steps.shape
        capacities = {math.ceil(f * b * w) for f in self.spec.prefill_packing} | {b * w}
        return smallest_fit(capacities, jnp.sum(mask), lambda c: policy.transformer(
            steps, mask, cache=cache, packing=Packing.of(mask, c)))

    def _contains_answer(self, cand: Int[Array, "B K S"]) -> Bool[Array, "B K"]:
        b, k, s = cand.shape
        flat = cand.reshape(b * k, s)

        def scan_token(buffer_hit, token):
            buffer, hit = buffer_hit
            buffer, now = update_stop_buffer(self.tables.answer, buffer, token)
            return (buffer, hit | now), None

        init = (init_stop_buffer(self.tables.answer, b * k), jnp.zeros((b * k,), bool))
        (_, hit), _ = jax.lax.scan(scan_token, init, flat.T)
        return hit.reshape(b, k)

    # -- nodes ------------------------------------------------------------------------------------------

    def _new_node(self, models: _Models, key, prompts: Prompts, partial: PartialSolution, live, own_value,
                  at_root: bool = False):
        """The NodeState of `partial` with its candidates, its prior logits (invalid where the node is terminal)
        and the value it backs up: its best child's (rolled forward), or `own_value` [B] when it visits no child
        (spec.visit_best_child off and no roll-forward), or its score when terminal. Rows outside `live` (copies
        below a terminal node, replaced by the caller) are not expanded."""
        spec, verifier, p = self.spec, models.verifier, partial
        ex = self._expand(models, key, prompts, p.tokens, p.length, live & ~p.terminal, at_root)
        prior = jnp.where(self.validity[p.node_type], ex.prior_logits, INVALID_LOGIT)
        values = combine(p.score[:, None], ex.step_scores, verifier.aggregation)
        valid = is_valid_action(prior)
        best = jnp.argmax(jnp.where(valid, values, -jnp.inf), axis=1).astype(jnp.int32)
        has_best = jnp.any(valid, axis=1) & ~p.terminal
        rows = jnp.arange(best.shape[0])
        best_value, generated, read = values[rows, best], ex.generated_tokens, ex.verifier_tokens
        if spec.rollout_steps:
            rolled, roll_generated, roll_read = self._rolled_value(models, key, prompts, p, ex, values, best, has_best)
            best_value = jnp.where(has_best, rolled, best_value)
            generated, read = generated + roll_generated, read + roll_read
        visits_child = spec.visit_best_child or spec.rollout_steps > 0
        value = jnp.where(has_best & visits_child, best_value, jnp.where(p.terminal, p.score, own_value))
        phantom = has_best & spec.visit_best_child
        node = NodeState(
            tokens=p.tokens, length=p.length, prompt_len=prompts.length, step_ends=p.step_ends, depth=p.depth,
            node_type=p.node_type, terminal=p.terminal, score=p.score,
            terminal_value=jnp.where(p.terminal, p.score, 0.0), candidates=ex.candidates,
            candidate_len=ex.candidate_len, candidate_ends=ex.candidate_ends, candidate_values=values,
            rolled_slot=jnp.where(phantom, best, NO_SLOT), rolled_value=jnp.where(phantom, best_value, 0.0),
            generated_tokens=generated, verifier_tokens=read,
        )
        return node, prior, value

    def root_fn(self, params, key, prompts: Prompts) -> mctx.RootFnOutput:
        """Root nodes: the prompts (`encode_prompts`; tokens [B, L], L = spec.max_len). A root that does not
        visit its best child backs up the verifier's value of the prompt alone."""
        models = self._models(params)
        b = prompts.length.shape[0]
        if self.spec.verifier_shares_backbone:
            prompt_value = models.verifier.from_hidden(prompts.last_hidden)
        else:
            prompt, mask = right_align(prompts.tokens, prompts.length, self.spec.pad_id, self._prompt_width)
            prompt_value = models.verifier.values_at(prompt, mask, jnp.full((b, 1), prompt.shape[1] - 1),
                                                     jnp.full((b,), prompt.shape[1]))[:, 0]  # no solution yet
        root = PartialSolution(
            tokens=prompts.tokens, length=prompts.length, step_ends=jnp.zeros((b, self.spec.max_depth), jnp.int32),
            depth=jnp.zeros((b,), jnp.int32), node_type=jnp.full((b,), self.space.root_type, jnp.int32),
            terminal=jnp.zeros((b,), bool), score=jnp.full((b,), initial_score(models.verifier.aggregation)))
        node, prior, value = self._new_node(models, key, prompts, root, jnp.ones((b,), bool), prompt_value,
                                            at_root=True)
        return mctx.RootFnOutput(prior_logits=prior, value=value, embedding=node)

    def recurrent_fn(self, params, key, action: Int[Array, " B"], parent: NodeState, prompts: Prompts):
        """Takes candidate `action` at each parent: the child node, its reward/discount/value and priors.

        The child's score is its candidate's, scored when the parent was expanded. mctx calls this with four
        arguments: bind `prompts` first (`functools.partial(..., prompts=prompts)`).
        """
        models = self._models(params)
        stay = parent.terminal
        # Below a terminal node nothing is sampled (marked terminal here; replaced by the parent below).
        child = self._take_step(_partial(parent), parent, parent.candidate_values, action)
        child = child.replace(terminal=child.terminal | stay)
        node, prior, value = self._new_node(models, key, prompts, child, ~stay, child.score)
        # Below a terminal node nothing changes: the same node and score are backed up again. The copy keeps
        # generated_tokens = 0 (nothing was sampled for it), so summing over nodes counts each token once.
        node = jax.tree.map(lambda p, c: jnp.where(_expand(stay, c), p, c), parent, node)
        node = node.replace(generated_tokens=jnp.where(stay, 0, node.generated_tokens),
                            verifier_tokens=jnp.where(stay, 0, node.verifier_tokens))
        value = jnp.where(stay, parent.terminal_value, value)
        # A terminal edge carries its score as reward with discount 0; its node value is the score too, so
        # the node's running mean stays equal to it.
        out = mctx.RecurrentFnOutput(reward=jnp.where(node.terminal, value, 0.0),
                                     discount=jnp.where(node.terminal, 0.0, 1.0), prior_logits=prior, value=value)
        return out, node

    def _take_step(self, partial: PartialSolution, candidates: NodeState | Expansion, values: Float[Array, "B K"],
                   slot: Int[Array, " B"]) -> PartialSolution:
        """Each partial solution with its candidate `slot` appended (candidates are sampled to fit their row):
        the step's type and value (`values`, the children's) become the solution's, and it is terminal where the
        step finishes it, reaches max_depth or fills the row."""
        rows = jnp.arange(slot.shape[0])
        step_len = candidates.candidate_len[rows, slot]
        room = partial.tokens.shape[1] - partial.length
        kept = jnp.minimum(step_len, room)
        depth = partial.depth + 1
        length = partial.length + kept
        tokens = jax.vmap(_append)(partial.tokens, partial.length, candidates.candidates[rows, slot], kept)
        step_ends = jax.vmap(lambda ends, d, n: ends.at[d - 1].set(n, mode="drop"))(partial.step_ends, depth, length)
        finished = candidates.candidate_ends[rows, slot] | (depth >= self.spec.max_depth) | (step_len >= room)
        return PartialSolution(tokens=tokens, length=length, step_ends=step_ends, depth=depth,
                               node_type=self.slot_types[slot], terminal=finished, score=values[rows, slot])

    def _rolled_value(self, models: _Models, key, prompts: Prompts, partial: PartialSolution, ex: Expansion,
                      values: Float[Array, "B K"], best: Int[Array, " B"], has_best: Bool[Array, " B"]):
        """ReST-MCTS*'s greedy roll-forward from each node's best child: r steps, each taking the best of K
        freshly sampled candidates by value, and the child's value V <- (1 - alpha) V + alpha * max V along the
        roll (V unchanged when the child ends the solution).

        Returns the rolled values [B] and the tokens the roll sampled [B] and its verifier read [B].
        """
        spec = self.spec
        rows = jnp.arange(best.shape[0])
        child = self._take_step(partial, ex, values, best)
        start_value = values[rows, best]

        def roll(i, carry):
            current, most, generated, read = carry
            step = self._expand(models, jax.random.fold_in(key, 1000 + i), prompts, current.tokens,
                                current.length, ~current.terminal)
            generated, read = generated + step.generated_tokens, read + step.verifier_tokens
            step_values = combine(current.score[:, None], step.step_scores, models.verifier.aggregation)
            valid = is_valid_action(jnp.where(self.validity[current.node_type], step.prior_logits, INVALID_LOGIT))
            pick = jnp.argmax(jnp.where(valid, step_values, -jnp.inf), axis=1)
            moves = ~current.terminal & jnp.any(valid, axis=1)
            most = jnp.where(moves, jnp.maximum(most, step_values[rows, pick]), most)
            taken = self._take_step(current, step, step_values, pick)
            current = jax.tree.map(lambda new, old: jnp.where(_expand(moves, new), new, old), taken, current)
            return current.replace(terminal=current.terminal | ~moves), most, generated, read

        zeros = jnp.zeros_like(partial.length)
        start = child.replace(terminal=child.terminal | ~has_best)
        _, most, generated, read = jax.lax.fori_loop(0, spec.rollout_steps, roll,
                                                     (start, jnp.zeros_like(start_value), zeros, zeros))
        ended = ex.candidate_ends[rows, best] | ~has_best
        rolled = (1 - spec.rollout_alpha) * start_value + spec.rollout_alpha * most
        return jnp.where(ended, start_value, rolled), generated, read

    def _models(self, params) -> _Models:
        policy_state, verifier_state = params
        return _Models(nnx.merge(self.policy_graphdef, policy_state), nnx.merge(self.verifier_graphdef, verifier_state))


def _append(row: Int[Array, " L"], length, piece: Int[Array, " S"], count) -> Int[Array, " L"]:
    """row with the first `count` tokens of `piece` written at `length` (the rest of row unchanged)."""
    positions = jnp.arange(row.shape[0])
    source = jnp.clip(positions - length, 0, piece.shape[0] - 1)
    inside = (positions >= length) & (positions < length + count)
    return jnp.where(inside, piece[source], row)


def _partial(node: NodeState) -> PartialSolution:
    return PartialSolution(tokens=node.tokens, length=node.length, step_ends=node.step_ends, depth=node.depth,
                           node_type=node.node_type, terminal=node.terminal, score=node.score)


def _take_prompts(prompts: Prompts, rows: Int[Array, " R"]) -> Prompts:
    return Prompts(tokens=prompts.tokens[rows], length=prompts.length[rows], last_hidden=prompts.last_hidden[rows],
                   cache=prompts.cache.take_rows(rows))


def _duplicates(cand: Int[Array, "B K S"], lens: Int[Array, "B K"]) -> Bool[Array, "B K"]:
    """True for a candidate equal to an earlier one of the same node (same tokens and length)."""
    same = jnp.all(cand[:, :, None] == cand[:, None, :], axis=-1) & (lens[:, :, None] == lens[:, None, :])
    earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)
    return jnp.any(same & earlier[None], axis=-1)


def _expand(mask: Bool[Array, " B"], like: Array) -> Bool[Array, "..."]:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))
