"""The search-tree node embedding: a partial solution as token ids, never a KV cache.

mctx stores one embedding per node ([B, num_simulations + 1, ...] in `Tree.embeddings`), so every field has
a leading batch axis and a fixed size.
"""

from __future__ import annotations

import chex
from jaxtyping import Array, Bool, Float, Int


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
      terminal_value: [B] the value a terminal node backs up (the PRM's score of the finished solution).
      candidates: [B, K, S] the K candidate next steps (slot k = action k), each left-aligned.
      candidate_len: [B, K] real tokens of each candidate.
      candidate_ends: [B, K] taking the candidate ends the solution.
      candidate_values: [B, K] the PRM's score of the partial solution followed by each candidate: the value
        of the child that taking it creates.
      generated_tokens: [B] tokens sampled to create this node's candidates (and its roll-forward).
    """

    tokens: Int[Array, "B L"]
    length: Int[Array, "B"]
    prompt_len: Int[Array, "B"]
    step_ends: Int[Array, "B D"]
    depth: Int[Array, "B"]
    node_type: Int[Array, "B"]
    terminal: Bool[Array, "B"]
    terminal_value: Float[Array, "B"]
    candidates: Int[Array, "B K S"]
    candidate_len: Int[Array, "B K"]
    candidate_ends: Bool[Array, "B K"]
    candidate_values: Float[Array, "B K"]
    generated_tokens: Int[Array, "B"]
