"""Reasoning traces read off a finished search tree whose embeddings are `NodeState`s.

The tree is fetched to the host once; the rest is numpy. A node is reported when it was expanded
(node_visits > 0) and is not an expansion below a terminal node: mctx expands one node per simulation, so a
simulation that ends at a terminal node adds a copy of it below (same embedding, the terminal score backed up
again). Copies count in their terminal ancestor's visits but are not partial solutions of their own.
Where `max_depth` cut a simulation mctx re-expanded an existing leaf and overwrote it; each node keeps its own
embedding, so its tokens always name its own path.

A node's K candidate steps are sampled (and paid for) when it is created, but only the ones a simulation takes
become nodes. A candidate that finishes the solution (`candidate_ends`) is a finished solution all the same:
those of reported nodes are returned as `sampled_solutions`, so self-training sees every solution it paid for.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import mctx
import numpy as np

from jaxreason.search.node import NodeState
from jaxreason.search.selection import is_valid_action


class Decoder(Protocol):
    """What `decode` needs of a tokenizer (any Hugging Face tokenizer qualifies)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclasses.dataclass(frozen=True)
class SearchPath:
    """One root-to-node path of a search tree: a partial solution, or a finished one if it ends at a terminal node.

    With d the number of steps:
      nodes: [d + 1] node indices, the root first.
      actions: [d] candidate slot taken at each step.
      values: [d + 1] each node's search value (mctx `node_values`, after the search's backup).
      scores: [d + 1] each node's verifier score (`NodeState.score`; the root's is the aggregation's start).
      visits: [d + 1] each node's visit count.
      qvalues: [d] each edge's Q: reward + discount * value of the child.
      terminal: [d + 1] whether each node ends the solution.
      tokens: [length] the last node's token ids: the prompt, then the steps.
      prompt_len: number of prompt tokens at the start of `tokens`.
      step_ends: [d] one past the last token of each step in `tokens`.
      terminal_value: the finished solution's score if the path ends at a terminal node, else None.
      text: the decoded steps (`tokens[prompt_len:]`), once `decode` has been called.
    """

    nodes: np.ndarray
    actions: np.ndarray
    values: np.ndarray
    scores: np.ndarray
    visits: np.ndarray
    qvalues: np.ndarray
    terminal: np.ndarray
    tokens: np.ndarray
    prompt_len: int
    step_ends: np.ndarray
    terminal_value: float | None
    text: str | None = None

    @property
    def depth(self) -> int:
        return len(self.actions)

    def node_tokens(self, i: int) -> np.ndarray:
        """Token ids of the partial solution at the path's i-th node (0: the prompt alone)."""
        return self.tokens[: self.prompt_len if i == 0 else self.step_ends[i - 1]]

    def step_tokens(self) -> list[np.ndarray]:
        """Token ids of each step."""
        starts = np.concatenate([[self.prompt_len], self.step_ends[:-1]]).astype(int)
        return [self.tokens[s:e] for s, e in zip(starts, self.step_ends, strict=True)]

    def decode(self, tokenizer: Decoder) -> SearchPath:
        # Without the EOS a finished step ends on: answer checks that read the whole text (Countdown's, code
        # run in the sandbox) fail on it, as on any sample's (`decode_completions` skips it too).
        text = tokenizer.decode(self.tokens[self.prompt_len :].tolist(), skip_special_tokens=True)
        return dataclasses.replace(self, text=text)


@dataclasses.dataclass(frozen=True)
class TreeTraces:
    """What one problem's (one batch row's) search found.

    paths: one path per reported node, in node-index order, so `paths[0]` is the root alone.
    best_by_visits: from the root, the most visited child each time, down to a leaf (ties: lowest slot).
    best_by_value: from the root, the child of highest Q each time, down to a leaf (ties: lowest slot).
    terminals: the paths that end at terminal nodes (the finished solutions), in node-index order; each
      one's `terminal_value` is its score.
    sampled_solutions: finished solutions that are a reported non-terminal node's valid candidate never taken
      (no node): the node's path plus that step, with `nodes` ending in -1, its score the candidate's value,
      NaN search value and Q, 0 visits and `terminal_value` None. In node-index order, then slot order.
    """

    paths: tuple[SearchPath, ...]
    best_by_visits: SearchPath
    best_by_value: SearchPath
    terminals: tuple[SearchPath, ...]
    sampled_solutions: tuple[SearchPath, ...] = ()

    def decode(self, tokenizer: Decoder) -> TreeTraces:
        return TreeTraces(
            paths=tuple(p.decode(tokenizer) for p in self.paths),
            best_by_visits=self.best_by_visits.decode(tokenizer),
            best_by_value=self.best_by_value.decode(tokenizer),
            terminals=tuple(p.decode(tokenizer) for p in self.terminals),
            sampled_solutions=tuple(p.decode(tokenizer) for p in self.sampled_solutions),
        )


def _ancestry(parents: np.ndarray) -> np.ndarray:
    """[B, N, H] the j-th ancestor of each node (column 0: the node itself), -1 past the root."""
    chain = [np.broadcast_to(np.arange(parents.shape[1]), parents.shape)]
    while (chain[-1] >= 0).any():
        up = np.take_along_axis(parents, np.maximum(chain[-1], 0), axis=1)
        chain.append(np.where(chain[-1] >= 0, up, -1))
    return np.stack(chain[:-1], axis=-1)


def _best_leaf(children: np.ndarray, score: np.ndarray, stop: np.ndarray) -> int:
    """Node reached from the root by taking the highest-`score` existing child until `stop` or no child.

    children, score: [N, K] for one row; stop: [N].
    """
    node = 0
    while not stop[node] and (children[node] >= 0).any():
        node = int(children[node, np.argmax(np.where(children[node] >= 0, score[node], -np.inf))])
    return node


def _path(t: mctx.Tree, b: int, nodes: np.ndarray, edge_q: np.ndarray) -> SearchPath:
    """The path through `nodes` (root first) of row b of the host tree `t`; edge_q: [B, N]."""
    emb: NodeState = t.embeddings
    n = nodes[-1]
    return SearchPath(
        nodes=nodes,
        actions=t.action_from_parent[b, nodes[1:]],
        values=t.node_values[b, nodes],
        scores=emb.score[b, nodes],
        visits=t.node_visits[b, nodes],
        qvalues=edge_q[b, nodes[1:]],
        terminal=emb.terminal[b, nodes],
        tokens=emb.tokens[b, n, : emb.length[b, n]],
        prompt_len=int(emb.prompt_len[b, n]),
        step_ends=emb.step_ends[b, n, : emb.depth[b, n]],
        terminal_value=float(emb.terminal_value[b, n]) if emb.terminal[b, n] else None,
    )


def _sampled_solution(t: mctx.Tree, b: int, node: SearchPath, slot: int) -> SearchPath:
    """`node`'s path extended by its candidate `slot`, a finished solution that was never expanded."""
    emb: NodeState = t.embeddings
    n = node.nodes[-1]
    tokens = np.concatenate([node.tokens, emb.candidates[b, n, slot, : emb.candidate_len[b, n, slot]]])
    return SearchPath(
        nodes=np.append(node.nodes, -1),
        actions=np.append(node.actions, slot),
        values=np.append(node.values, np.nan),
        scores=np.append(node.scores, emb.candidate_values[b, n, slot]),
        visits=np.append(node.visits, 0),
        qvalues=np.append(node.qvalues, np.nan),
        terminal=np.append(node.terminal, True),
        tokens=tokens,
        prompt_len=node.prompt_len,
        step_ends=np.append(node.step_ends, len(tokens)),
        terminal_value=None,
    )


def extract_traces(tree: mctx.Tree, tokenizer: Decoder | None = None) -> list[TreeTraces]:
    """Every reported root-to-node path, the two best paths and the finished solutions, one `TreeTraces` per
    batch row.

    tree: a finished batched search tree whose embeddings are `NodeState`s.
    tokenizer: if given, every path's `text` is filled.
    """
    t = jax.device_get(tree)
    terminal = t.embeddings.terminal  # [B, N]
    rows = np.arange(terminal.shape[0])[:, None]
    parent = np.maximum(t.parents, 0)
    below_terminal = (t.parents >= 0) & np.take_along_axis(terminal, parent, axis=1)
    reported = (t.node_visits > 0) & ~below_terminal
    q = t.children_rewards + t.children_discounts * t.children_values  # [B, N, K]
    edge_q = q[rows, parent, np.maximum(t.action_from_parent, 0)]  # [B, N] Q of the edge into each node
    ancestry = _ancestry(t.parents)
    depth = (ancestry >= 0).sum(-1) - 1
    emb: NodeState = t.embeddings
    room = emb.tokens.shape[-1] - emb.length  # [B, N]
    # [B, N, K] valid finished candidates never taken; a step cut off by the width is no finished solution
    untaken = (t.children_index < 0) & is_valid_action(t.children_prior_logits) & emb.candidate_ends
    untaken &= emb.candidate_len <= room[..., None]

    traces = []
    for b in range(terminal.shape[0]):
        paths = {
            int(n): _path(t, b, ancestry[b, n, : depth[b, n] + 1][::-1], edge_q) for n in np.flatnonzero(reported[b])
        }
        # Below a terminal node there are only copies, so the best paths stop there.
        best_by_visits = _best_leaf(t.children_index[b], t.children_visits[b], terminal[b])
        best_by_value = _best_leaf(t.children_index[b], q[b], terminal[b])
        sampled = [_sampled_solution(t, b, p, k) for n, p in paths.items() if not terminal[b, n]
                   for k in np.flatnonzero(untaken[b, n])]
        row = TreeTraces(
            paths=tuple(paths.values()),
            best_by_visits=paths[best_by_visits],
            best_by_value=paths[best_by_value],
            terminals=tuple(p for n, p in paths.items() if terminal[b, n]),
            sampled_solutions=tuple(sampled),
        )
        traces.append(row if tokenizer is None else row.decode(tokenizer))
    return traces
