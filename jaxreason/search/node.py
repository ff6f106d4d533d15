"""The search-tree node embedding: a partial solution as token ids, never a KV cache.

mctx stores one embedding per node ([B, num_simulations + 1, ...] in `Tree.embeddings`), so every field has
a leading batch axis and a fixed size.
"""

from __future__ import annotations

import chex
from jaxtyping import Array, Bool, Float, Int

NO_SLOT = -1
"""`NodeState.rolled_slot` of a node whose best child was not visited on its creation."""


@chex.dataclass(frozen=True)
class NodeState:
    """A batch of partial solutions and the candidate next steps sampled when each was created.

    Attributes:
      tokens: [B, L] prompt followed by the steps so far, left-aligned, padded after `length`.
      length: [B] number of real tokens in `tokens`.
      prompt_len: [B] number of prompt tokens at the start of `tokens`.
      step_ends: [B, D] for each step i < depth, the index in `tokens` one past its last token; 0 after.
      depth: [B] number of steps taken from the root (the root has depth 0).
      node_type: [B] index of the action type that created the node (`ActionSpace.root_type` at the root).
      terminal: [B] the last step ended the solution (final answer, EOS, or the depth/length limit).
      score: [B] the verifier's score of the partial solution (its step scores under the verifier's
        aggregation; at the root, before any step, the aggregation's starting value).
      terminal_value: [B] the value a terminal node backs up (its score); 0 for other nodes.
      candidates: [B, K, S] the K candidate next steps (slot k = action k), each left-aligned.
      candidate_len: [B, K] real tokens of each candidate.
      candidate_ends: [B, K] taking the candidate ends the solution.
      candidate_values: [B, K] the score of the partial solution followed by each candidate: the value of the
        child that taking it creates.
      rolled_slot: [B] the best candidate, visited (and rolled forward) when the node was created, as the
        reference's expansion visits the best new child; `NO_SLOT` when none was (a terminal node, or mctx's
        running-mean backup).
      rolled_value: [B] that child's value after the roll-forward; 0 when `rolled_slot` is `NO_SLOT`.
      generated_tokens: [B] tokens sampled to create this node's candidates (and its roll-forward).
      verifier_tokens: [B] tokens the verifier read to score them (0 when it reads the policy's hidden states).
    """

    tokens: Int[Array, "B L"]
    length: Int[Array, " B"]
    prompt_len: Int[Array, " B"]
    step_ends: Int[Array, "B D"]
    depth: Int[Array, " B"]
    node_type: Int[Array, " B"]
    terminal: Bool[Array, " B"]
    score: Float[Array, " B"]
    terminal_value: Float[Array, " B"]
    candidates: Int[Array, "B K S"]
    candidate_len: Int[Array, "B K"]
    candidate_ends: Bool[Array, "B K"]
    candidate_values: Float[Array, "B K"]
    rolled_slot: Int[Array, " B"]
    rolled_value: Float[Array, " B"]
    generated_tokens: Int[Array, " B"]
    verifier_tokens: Int[Array, " B"]
