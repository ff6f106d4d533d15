"""On-policy rollouts: G sampled episodes per prompt, drawn by the jitted sampler from the weights being trained.

An episode holds J >= 1 attempts in one sequence: the prompt, attempt 1, then for each later attempt a fixed
instruction (SCoRe's "there might be an error ...") and the attempt itself. Each attempt is one call of the
jitted sampler (prefill and a `lax.while_loop` decode over a KV cache); between attempts the host only appends
the instruction. Every row is laid out from column 0 and right-padded, with `token_turn` saying which attempt
produced each token.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import struct
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from jaxreason import sharding
from jaxreason.distributed import addressable
from jaxreason.models.llama import CausalLM
from jaxreason.sampling.generate import SamplingConfig, generate
from jaxreason.sampling.prompts import pad_left

NOT_TRAINED = -1  # token_turn of the prompt, the instructions and the padding


@struct.dataclass
class Episodes:
    """R = N prompts x G samples episodes of J attempts, rows prompt-major (row n * G + g).

    Attributes:
      tokens: [R, T] int32 ids: prompt, attempt 1, instruction 1, attempt 2, ..., then padding.
      attention_mask: [R, T] int32, 1 on real tokens.
      token_turn: [R, T] int32, j on the tokens attempt j generated (its EOS included), NOT_TRAINED elsewhere.
      logprobs: [R, T] float32, the sampler's log-probability of each generated token (0 elsewhere).
      turn_lengths: [R, J] int32 tokens generated per attempt.
      truncated: [R, J] bool, the attempt ran to max_new_tokens without ending.
      prompt_index: [R] int32, the prompt of each row.
    """

    tokens: Int[Array, "R T"]
    attention_mask: Int[Array, "R T"]
    token_turn: Int[Array, "R T"]
    logprobs: Float[Array, "R T"]
    turn_lengths: Int[Array, "R J"]
    truncated: Bool[Array, "R J"]
    prompt_index: Int[Array, " R"]

    @property
    def num_turns(self) -> int:
        return self.turn_lengths.shape[1]

    def attempt(self, j: int) -> list[np.ndarray]:
        """Attempt j's token ids of each row."""
        tokens, turn = np.asarray(self.tokens), np.asarray(self.token_turn)
        return [tokens[r][turn[r] == j] for r in range(tokens.shape[0])]

    def loss_mask(self) -> Int[Array, "R T"]:
        """1 on the generated tokens (the ones a policy gradient trains), 0 elsewhere."""
        return (np.asarray(self.token_turn) >= 0).astype(np.int32)


def sample_episodes(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    sampling: SamplingConfig,
    *,
    group_size: int,
    eos_ids: tuple[int, ...],
    pad_id: int,
    instructions: Sequence[Sequence[int]] = (),
    width: int | None = None,
    mesh: Mesh | None = None,
) -> Episodes:
    """`group_size` = G episodes per prompt of 1 + len(instructions) attempts each, from `model`'s weights.

    Args:
      model: the policy; pass the module whose state the train step updates (`PolicyTrainer.policy`), not a copy.
      prompts: N prompt id lists.
      key: attempt j of row r draws from `fold_in(fold_in(key, j), r)`, so a row does not depend on the batch.
      sampling: the sampler's settings (a new one compiles a new program).
      instructions: the ids inserted before attempts 2, 3, ... (J - 1 lists).
      width: T, the padded sequence length (default: the longest row rounded up to 64, few compiled shapes).
      mesh: split the rows over the mesh's batch axes (when the row count divides over them).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not prompts:
        raise ValueError("sample_episodes: no prompts")
    rows = len(prompts) * group_size
    sequences = [list(map(int, prompts[r // group_size])) for r in range(rows)]
    turns = [[[] for _ in range(rows)] for _ in range(1 + len(instructions))]
    logprobs = [[[] for _ in range(rows)] for _ in range(len(turns))]
    truncated = np.zeros((rows, len(turns)), bool)
    for j in range(len(turns)):
        if j:
            sequences = [s + list(map(int, instructions[j - 1])) for s in sequences]
        prefixes, per_prefix = (prompts, group_size) if j == 0 else (sequences, 1)
        tokens, mask = pad_left(prefixes, pad_id)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.fold_in(key, j), np.arange(rows))
        tokens, mask, keys = _on_mesh((tokens, mask, keys), mesh, len(prefixes))
        out = generate(model, tokens, mask, keys, sampling, eos_ids=eos_ids, pad_id=pad_id,
                       samples_per_prompt=per_prefix)
        new, lp, lengths, stopped = (np.asarray(x) for x in addressable((out.tokens, out.logprobs, out.lengths,
                                                                        out.stopped)))
        for r in range(rows):
            turns[j][r] = new[r, :lengths[r]].tolist()
            logprobs[j][r] = lp[r, :lengths[r]].tolist()
            sequences[r] = sequences[r] + turns[j][r]
        truncated[:, j] = ~stopped & (lengths >= sampling.max_new_tokens)
    return layout_episodes(prompts, instructions, turns, logprobs, truncated, group_size, pad_id, width)


def _on_mesh(arrays, mesh: Mesh | None, rows: int):
    """(tokens, mask, keys) with their rows split over the mesh's batch axes (when the rows divide over them)."""
    if mesh is None or sharding.batch_devices(mesh) == 1 or rows % sharding.batch_devices(mesh):
        return arrays
    return sharding.put_rows(arrays, mesh)


def layout_episodes(prompts, instructions, turns, logprobs, truncated, group_size: int, pad_id: int,
                    width: int | None) -> Episodes:
    """The [R, T] arrays of the episodes: each row's segments in order from column 0, then padding. turns[j][r]
    and logprobs[j][r] are attempt j's ids and log-probs in row r, whose prompt is prompts[r // group_size]."""
    rows = len(turns[0])
    segments = []
    for r in range(rows):
        row = [(list(prompts[r // group_size]), NOT_TRAINED, None)]
        for j in range(len(turns)):
            if j:
                row.append((list(instructions[j - 1]), NOT_TRAINED, None))
            row.append((turns[j][r], j, logprobs[j][r]))
        segments.append(row)
    longest = max(sum(len(ids) for ids, _, _ in row) for row in segments)
    width = width or -(-longest // 64) * 64
    if longest > width:
        raise ValueError(f"an episode of {longest} tokens does not fit width {width}")
    tokens = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    token_turn = np.full((rows, width), NOT_TRAINED, np.int32)
    lp = np.zeros((rows, width), np.float32)
    for r, row in enumerate(segments):
        at = 0
        for ids, turn, values in row:
            tokens[r, at:at + len(ids)] = ids
            mask[r, at:at + len(ids)] = 1
            token_turn[r, at:at + len(ids)] = turn
            if values is not None:
                lp[r, at:at + len(ids)] = values
            at += len(ids)
    turn_lengths = np.asarray([[len(turns[j][r]) for j in range(len(turns))] for r in range(rows)], np.int32)
    return Episodes(tokens=tokens, attention_mask=mask, token_turn=token_turn, logprobs=lp,
                    turn_lengths=turn_lengths.reshape(rows, len(turns)), truncated=truncated,
                    prompt_index=np.arange(rows, dtype=np.int32) // group_size)
