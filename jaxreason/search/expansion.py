"""The mctx adapter for step-level reasoning search: `root_fn` and `recurrent_fn` driven by a policy and a PRM.

Creating a node samples its K candidate next steps in one batched call, so the node's prior logits (the
candidates' length-normalised log-probabilities) are known when `recurrent_fn` returns. The prompts' keys and
values are computed once per search (`encode_prompts`); a node's prefill covers only its steps, on top of a
copy of its prompt's cache, and its K samples decode from that one shared prefix. Taking action k appends
candidate k to the partial solution; the PRM scores the result. A step that ends the solution (final-answer
marker, EOS, depth or length limit) makes a terminal node: its score goes into `reward` with discount 0, and
an expansion below it changes nothing and backs up the same score again.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import mctx
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from jaxreason.models.kv_cache import KVCache
from jaxreason.models.packing import Packing
from jaxreason.sampling.generate import SamplingConfig, batch_sizes, sample_from_cache
from jaxreason.sampling.stopping import StopTable, build_stop_table, init_stop_buffer, update_stop_buffer
from jaxreason.search.actions import ActionSpace
from jaxreason.search.node import NodeState
from jaxreason.search.scoring import candidate_values, prefix_values, right_align
from jaxreason.search.selection import INVALID_LOGIT


@dataclasses.dataclass(frozen=True)
class ExpansionSpec:
    """Static sizes and sampling settings of one search program."""

    max_len: int  # L: prompt + all steps
    max_step_tokens: int  # S: one step (template included)
    max_depth: int  # D: steps from the root; a node at this depth is terminal
    prompt_width: int = 0  # P: room for the longest prompt (0: max_len); a longer prompt keeps its last P tokens
    temperature: float = 0.7
    top_p: float = 1.0
    rollout_steps: int = 0  # ReST-MCTS*'s greedy roll-forward length r (0: off)
    rollout_alpha: float = 0.5  # V <- (1 - alpha) V + alpha * max V along the roll
    pad_id: int = 0
    eos_ids: tuple[int, ...] = ()
    prm_shares_backbone: bool = False  # the PRM's value is read from the policy's prefill (no second pass)
    expansion_sizes: tuple[float, ...] = (1.0, 0.75, 0.5)  # fractions of the batch an expansion is compiled for
    decode_shrink: tuple[float, ...] = ()  # SamplingConfig.shrink_at of the candidates' decode
    prefill_packing: tuple[float, ...] = ()  # fractions of a padded prefill its real tokens are packed into


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
    length: Int[Array, "B"]
    cache: KVCache
    last_hidden: Float[Array, "B E"]


@struct.dataclass
class StepTables:
    """Host-built token tables, passed to the search program as arrays (template shapes are static)."""

    step_end: StopTable  # the step delimiter
    answer: StopTable  # the final-answer marker
    templates: tuple[Int[Array, "T"], ...]  # token ids of each action type's template


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
    """Builds the root and recurrent functions for a policy/PRM pair over one action space.

    `params` passed to mctx is `(policy_state, prm_state)`; the graph definitions are fixed here. A search
    split over devices sees its own rows only: `first_row` (traced) is the index of its first row in the whole
    batch of `total_rows` (static; None: this search's own batch), so that every row draws the random numbers
    it would draw in one unsplit search.
    """

    def __init__(self, policy_graphdef, prm_graphdef, action_space: ActionSpace, spec: ExpansionSpec,
                 tables: StepTables, first_row: Int[Array, ""] | int = 0, total_rows: int | None = None):
        self.first_row = first_row
        self.total_rows = total_rows
        self.policy_graphdef = policy_graphdef
        self.prm_graphdef = prm_graphdef
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

    def encode_prompts(self, params, tokens: Int[Array, "B L"], prompt_len: Int[Array, "B"]) -> Prompts:
        """Prefills the left-aligned prompts once, for the whole search."""
        policy, _ = self._models(params)
        width = self._prompt_width
        prompt, mask = right_align(tokens, prompt_len, self.spec.pad_id, width)
        cache = KVCache.init(policy.config, tokens.shape[0], width, dtype=policy.transformer.dtype)
        hidden, cache = policy.transformer(prompt, mask, cache=cache)
        return Prompts(tokens=tokens, length=prompt_len, cache=cache, last_hidden=hidden[:, -1])

    def _expand_nodes(self, policy, prm, key, prompts: Prompts, tokens, length, expand, at_root: bool = False):
        """The K candidate steps after each partial solution in `expand` [B], with their PRM values.

        Rows outside `expand` (terminal nodes, copies below them) get no candidates: length 0, an invalid prior,
        value 0. In a search many simulations end on a terminal node, so the rows to expand are gathered into
        the smallest of a few batch sizes that holds them (`spec.expansion_sizes`) instead of paying for a full
        prefill and decode. Within that, the program holds one copy of the expansion per width of the steps part
        (`_widths`) and runs the narrowest that fits the longest row. A row's samples depend on its own index
        only, so the gathering changes no result. `at_root` (static): no row has steps yet, so the only size and
        width compiled are all rows and the narrowest width (what the switches would pick).

        Returns candidates [B, K, S], lengths [B, K], prior logits [B, K], ends-solution [B, K], the number of
        generated tokens [B] and the candidates' values [B, K].
        """
        b = tokens.shape[0]
        sizes = (b,) if at_root else batch_sizes(b, self.spec.expansion_sizes)
        widths = self._widths()[:1] if at_root else self._widths()
        order = jnp.argsort(~expand, stable=True)  # the rows to expand first, in their order
        longest = jnp.max(jnp.where(expand, length - prompts.length, 1))
        width_index = jnp.minimum(jnp.sum(jnp.asarray(widths[:-1]) < longest), len(widths) - 1)

        def at_size(size):
            if size == b:
                rows, sub = jnp.arange(b), (prompts, tokens, length)
            else:
                rows = order[:size]
                sub = (_take_prompts(prompts, rows), tokens[rows], length[rows])
            branches = [lambda w=w: self._expand_at_width(policy, prm, key, *sub, ~expand[rows], rows, b, w)
                        for w in widths]
            out = jax.lax.switch(width_index, branches)
            if size == b:
                return out
            # Scatter back; the padding rows past the expanded ones must not overwrite anything.
            target = jnp.where(expand[rows], rows, b)
            empty = (jnp.full_like(out[0], self.spec.pad_id, shape=(b, *out[0].shape[1:])),
                     *(jnp.zeros((b, *x.shape[1:]), x.dtype) for x in out[1:]))
            return tuple(e.at[target].set(x, mode="drop") for e, x in zip(empty, out))

        size_index = jnp.sum(jnp.asarray(sizes[1:]) >= jnp.sum(expand))  # sizes are descending
        cand, lens, logp, ends, generated, values = jax.lax.switch(
            size_index, [lambda s=s: at_size(s) for s in sizes])
        logp = jnp.where(expand[:, None], logp, INVALID_LOGIT)
        return cand, lens, logp, ends, generated, values

    def _expand_at_width(self, policy, prm, key, prompts: Prompts, tokens, length, skip, rows, batch: int,
                         width: int):
        """`_expand_nodes` for a batch of b partial solutions whose steps fit in `width` tokens.

        The partial solutions are rows `rows` [b] of the search's `batch`; a row's random draws depend on its
        index in the whole batch (see `first_row`), not on which rows are expanded with it. Rows in `skip` get
        no candidates. The steps after the prompt (their last `width` tokens, left-padded) are prefilled once on
        top of the prompt's cached keys and values; each action type's template runs on top of that, and its
        samples continue from there, sharing it. A candidate's value is the PRM's score of the partial solution
        followed by it: read from the sampler's last hidden state when the PRM shares the policy's backbone,
        else one PRM pass over the prefix with the K candidates on top (`candidate_values`).
        """
        spec, b = self.spec, tokens.shape[0]
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
            config = SamplingConfig(max_new_tokens=spec.max_step_tokens - t, temperature=spec.temperature,
                                    top_p=spec.top_p, shrink_at=spec.decode_shrink)
            n = action.num_samples
            total = self.total_rows or batch
            keys = jax.random.split(jax.random.fold_in(key, g), total * n).reshape(total, n)[self.first_row + rows]
            keys = keys.reshape(b * n)
            room = tokens.shape[1] - length - t  # a candidate never overflows its row: it is cut to fit
            out = sample_from_cache(policy, logits, group_cache, keys, config, eos_ids=spec.eos_ids,
                                    pad_id=spec.pad_id,
                                    stop_table=self.tables.step_end if action.until_step_end else None,
                                    samples_per_prompt=n, skip=skip | (room < 1), max_tokens=room)
            new = out.tokens.reshape(b, n, -1)
            cand = jnp.concatenate([jnp.broadcast_to(template, (b, n, t)), new], axis=-1)
            lens = out.lengths.reshape(b, n)
            logp = out.logprobs.reshape(b, n, -1).sum(-1) / jnp.maximum(lens, 1)  # length-normalised
            logp = jnp.where((room < 1)[:, None], INVALID_LOGIT, logp)  # not even the template fits
            ended_eos = jnp.isin(jnp.take_along_axis(new, jnp.maximum(lens - 1, 0)[..., None], -1)[..., 0],
                                 jnp.asarray(spec.eos_ids or (-1,)))
            last_hidden = out.last_hidden.reshape(b, n, -1)
            groups.append((cand, t + lens, logp, ended_eos, last_hidden, jnp.sum(lens, axis=1)))
        cand, lens, logp, ended_eos, last_hidden = (jnp.concatenate([g[i] for g in groups], axis=1)
                                                    for i in range(5))
        generated = sum(g[5] for g in groups)
        if spec.prm_shares_backbone:
            values = jax.nn.sigmoid(prm.logits_from_hidden(last_hidden))
        else:
            values = candidate_values(prm, *right_align(tokens, length, spec.pad_id, p + width), cand, lens)
        ends = ended_eos | self._contains_answer(cand)
        logp = jnp.where(_duplicates(cand, lens), INVALID_LOGIT, logp)
        return cand, lens, logp, ends, generated, values

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
        capacities = sorted({math.ceil(f * b * w) for f in self.spec.prefill_packing} | {b * w})
        index = jnp.sum(jnp.asarray(capacities[:-1]) < jnp.sum(mask))
        return jax.lax.switch(index, [
            lambda c=c: policy.transformer(steps, mask, cache=cache, packing=Packing.of(mask, c))
            for c in capacities])

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

    def _new_node(self, policy, prm, key, prompts, tokens, length, step_ends, depth, node_type, terminal, value,
                  live, at_root: bool = False):
        """A NodeState with its candidates; priors are invalid where the node is terminal.

        Rows outside `live` (copies below a terminal node, replaced by the caller) are not expanded.
        """
        cand, cand_len, logp, ends, generated, cand_values = self._expand_nodes(
            policy, prm, key, prompts, tokens, length, live & ~terminal, at_root)
        prior = jnp.where(self.validity[node_type], logp, INVALID_LOGIT)
        node = NodeState(
            tokens=tokens, length=length, prompt_len=prompts.length, step_ends=step_ends, depth=depth,
            node_type=node_type, terminal=terminal, terminal_value=jnp.where(terminal, value, 0.0),
            candidates=cand, candidate_len=cand_len, candidate_ends=ends, candidate_values=cand_values,
            generated_tokens=generated,
        )
        return node, prior

    def root_fn(self, params, key, prompts: Prompts) -> mctx.RootFnOutput:
        """Root nodes: the prompts (`encode_prompts`; tokens [B, L], L = spec.max_len)."""
        policy, prm = self._models(params)
        b = prompts.length.shape[0]
        if self.spec.prm_shares_backbone:
            value = jax.nn.sigmoid(prm.logits_from_hidden(prompts.last_hidden))
        else:
            value = prefix_values(prm, *right_align(prompts.tokens, prompts.length, self.spec.pad_id,
                                                    self._prompt_width))
        node, prior = self._new_node(
            policy, prm, key, prompts, prompts.tokens, prompts.length,
            jnp.zeros((b, self.spec.max_depth), jnp.int32), jnp.zeros((b,), jnp.int32),
            jnp.full((b,), self.space.root_type, jnp.int32), jnp.zeros((b,), bool), value, jnp.ones((b,), bool),
            at_root=True,
        )
        return mctx.RootFnOutput(prior_logits=prior, value=value, embedding=node)

    def recurrent_fn(self, params, key, action: Int[Array, "B"], parent: NodeState, prompts: Prompts):
        """Takes candidate `action` at each parent: the child node, its reward/discount/value and priors.

        The child's value is its candidate's, scored when the parent was expanded. mctx calls this with four
        arguments: bind `prompts` first (`functools.partial(..., prompts=prompts)`).
        """
        policy, prm = self._models(params)
        spec = self.spec
        rows = jnp.arange(action.shape[0])
        tokens, length, depth, ends = self._take_step(
            parent.tokens, parent.length, parent.depth, parent.candidates[rows, action],
            parent.candidate_len[rows, action], parent.candidate_ends[rows, action])
        step_ends = jax.vmap(lambda ends, d, n: ends.at[d - 1].set(n, mode="drop"))(parent.step_ends, depth, length)
        stay = parent.terminal
        # Below a terminal node nothing is sampled (marked terminal here; replaced by the parent below).
        terminal = ends | stay
        value = parent.candidate_values[rows, action]
        child, prior = self._new_node(
            policy, prm, key, prompts, tokens, length, step_ends, depth, self.slot_types[action], terminal, value,
            ~stay,
        )
        if spec.rollout_steps:
            rolled, roll_tokens = self._rolled_value(policy, prm, key, prompts, child, value)
            value = jnp.where(terminal, value, rolled)
            child = child.replace(generated_tokens=child.generated_tokens + jnp.where(terminal, 0, roll_tokens))
        # Below a terminal node nothing changes: the same node and score are backed up again. The copy keeps
        # generated_tokens = 0 (nothing was sampled for it), so summing over nodes counts each token once.
        child = jax.tree.map(lambda p, c: jnp.where(_expand(stay, c), p, c), parent, child)
        child = child.replace(generated_tokens=jnp.where(stay, 0, child.generated_tokens))
        score = jnp.where(stay, parent.terminal_value, value)
        # A terminal edge carries its score as reward with discount 0; its node value is the score too, so
        # the node's running mean stays equal to it.
        out = mctx.RecurrentFnOutput(reward=jnp.where(terminal, score, 0.0), discount=jnp.where(terminal, 0.0, 1.0),
                                     prior_logits=prior, value=score)
        return out, child

    def _take_step(self, tokens: Int[Array, "B L"], length: Int[Array, "B"], depth: Int[Array, "B"],
                   step: Int[Array, "B S"], step_len: Int[Array, "B"], finishes: Bool[Array, "B"]):
        """Appends one candidate step to each partial solution (candidates are sampled to fit their row).

        Returns tokens [B, L], length [B], depth [B] and whether the solution ends there [B]: the step finishes
        it, reaches max_depth or fills the row.
        """
        room = tokens.shape[1] - length
        kept = jnp.minimum(step_len, room)
        depth = depth + 1
        ends = finishes | (depth >= self.spec.max_depth) | (step_len >= room)
        return jax.vmap(_append)(tokens, length, step, kept), length + kept, depth, ends

    def _rolled_value(self, policy, prm, key, prompts: Prompts, node: NodeState, value: Float[Array, "B"]):
        """ReST-MCTS*'s greedy roll-forward from a new node: r steps, each taking the PRM's best valid candidate
        (the node's own K first, then freshly sampled ones), and V <- (1 - alpha) V + alpha * max V along the roll.

        Returns the rolled value [B] and the tokens sampled for the roll [B] (part of the search's budget).
        """
        spec = self.spec
        rows = jnp.arange(node.length.shape[0])

        def take_best(tokens, length, depth, node_type, cand, cand_len, ends, values, done, best):
            values = jnp.where(self.validity[node_type], values, -1.0)
            pick = jnp.argmax(values, axis=1)
            best = jnp.where(done, best, jnp.maximum(best, values[rows, pick]))
            taken, taken_len, depth, ends = self._take_step(
                tokens, length, depth, cand[rows, pick], cand_len[rows, pick], ends[rows, pick])
            tokens = jnp.where(done[:, None], tokens, taken)
            length = jnp.where(done, length, taken_len)
            done = done | ends
            node_type = jnp.where(done, node_type, self.slot_types[pick])
            return tokens, length, depth, node_type, done, best

        def roll(i, carry):
            (tokens, length, depth, node_type, done, best), generated = carry
            cand, cand_len, _, ends, sampled, values = self._expand_nodes(
                policy, prm, jax.random.fold_in(key, 1000 + i), prompts, tokens, length, ~done)
            generated = generated + jnp.where(done, 0, sampled)
            return take_best(tokens, length, depth, node_type, cand, cand_len, ends, values, done, best), generated

        first = take_best(node.tokens, node.length, node.depth, node.node_type, node.candidates, node.candidate_len,
                          node.candidate_ends, node.candidate_values, node.terminal, jnp.zeros_like(value))
        (*_, best), generated = jax.lax.fori_loop(1, spec.rollout_steps, roll, (first, jnp.zeros_like(node.length)))
        return (1 - spec.rollout_alpha) * value + spec.rollout_alpha * best, generated

    def _models(self, params):
        policy_state, prm_state = params
        return nnx.merge(self.policy_graphdef, policy_state), nnx.merge(self.prm_graphdef, prm_state)


def _append(row: Int[Array, "L"], length, piece: Int[Array, "S"], count) -> Int[Array, "L"]:
    """row with the first `count` tokens of `piece` written at `length` (the rest of row unchanged)."""
    positions = jnp.arange(row.shape[0])
    source = jnp.clip(positions - length, 0, piece.shape[0] - 1)
    inside = (positions >= length) & (positions < length + count)
    return jnp.where(inside, piece[source], row)


def _take_prompts(prompts: Prompts, rows: Int[Array, "R"]) -> Prompts:
    return Prompts(tokens=prompts.tokens[rows], length=prompts.length[rows], last_hidden=prompts.last_hidden[rows],
                   cache=prompts.cache.take_rows(rows))


def _duplicates(cand: Int[Array, "B K S"], lens: Int[Array, "B K"]) -> Bool[Array, "B K"]:
    """True for a candidate equal to an earlier one of the same node (same tokens and length)."""
    same = jnp.all(cand[:, :, None] == cand[:, None, :], axis=-1) & (lens[:, :, None] == lens[:, None, :])
    earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)
    return jnp.any(same & earlier[None], axis=-1)


def _expand(mask: Bool[Array, "B"], like: Array) -> Bool[Array, "..."]:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))
