"""Jit-compiled batched generation: one prefill, then a `lax.while_loop` decode over a KV cache.

Prompts are left-padded so that every row's next token is written at the same cache slot; the cache lives
in the loop carry, which XLA updates in place. Each row draws from its own key stream
(`fold_in(row_key, step)`), so a row's output does not depend on what else is in the batch. `generate` reads
the weights in the model's compute dtype and, given a mesh, sharded by the training rules with the rows split
over the batch axes (`jaxreason.sampling.placement`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from jaxreason import sharding
from jaxreason.models.kv_cache import KVCache, PrefixGrid
from jaxreason.models.llama import CausalLM
from jaxreason.sampling.buckets import batch_sizes, put_rows
from jaxreason.sampling.placement import inference_state
from jaxreason.sampling.stopping import StopTable, init_stop_buffer, update_stop_buffer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks)
    # Fractions of the rows the decode continues with once no more of them are still live: finished rows drop
    # out of the batch, so later steps cost less. Each is another compiled copy of the decode step.
    shrink_at: tuple[float, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not all(0 < f < 1 for f in self.shrink_at):
            raise ValueError(f"shrink_at must be fractions in (0, 1), got {self.shrink_at}")


@struct.dataclass
class GenerateOutput:
    """Generated completions.

    Attributes:
      tokens: [B, N] new token ids; positions at or past `lengths` hold the pad id.
      logprobs: [B, N] log-probability of each new token under the model (temperature 1, no filtering);
        0 past `lengths`.
      lengths: [B] number of new tokens, the EOS or stop-completing token included.
      stopped: [B] True where the row ended on EOS or a stop string rather than on max_new_tokens.
      last_hidden: [B, E] the model's final hidden state at the row's last new token (0 for an empty row): a
        value head on the same backbone scores prompt + completion from it without another pass.
    """

    tokens: Int[Array, "B N"]
    logprobs: Float[Array, "B N"]
    lengths: Int[Array, " B"]
    stopped: Bool[Array, " B"]
    last_hidden: Float[Array, "B E"]


def sample_logits(logits: Float[Array, " V"], key: PRNGKeyArray, config: SamplingConfig) -> Int[Array, ""]:
    """Draws one token id from one row of logits with temperature, top-k and top-p (nucleus) filtering."""
    if config.temperature == 0:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_k:
        kth = jax.lax.top_k(logits, config.top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1:
        probs = jax.nn.softmax(logits)
        logits = jnp.where(probs >= nucleus_threshold(probs, config.top_p), logits, -jnp.inf)
    return draw_categorical(key, logits)


_DRAW_BLOCK = 256


def draw_categorical(key: PRNGKeyArray, logits: Float[Array, " V"]) -> Int[Array, ""]:
    """One token id drawn with probability softmax(logits), by inverting the CDF in two levels.

    A block of 256 ids is picked by its share of the mass, then an id within it: two uniform draws per row,
    where `jax.random.categorical` draws a Gumbel variate per vocabulary entry. Ids of zero probability
    (logit -inf) are never drawn.
    """
    v = logits.shape[0]
    blocks = -(-v // _DRAW_BLOCK)
    weights = jnp.exp(logits - jnp.max(logits))
    weights = jnp.pad(weights, (0, blocks * _DRAW_BLOCK - v)).reshape(blocks, _DRAW_BLOCK)
    u = jax.random.uniform(key, (2,))

    def invert(w: Float[Array, " N"], u: Float[Array, ""]) -> Int[Array, ""]:
        cdf = jnp.cumsum(w)
        index = jnp.sum(cdf <= u * cdf[-1])
        # u * total can round up to the total: stay on the last entry with mass.
        return jnp.minimum(index, jnp.max(jnp.where(w > 0, jnp.arange(w.shape[0]), 0)))

    block = invert(weights.sum(axis=1), u[0])
    return (block * _DRAW_BLOCK + invert(weights[block], u[1])).astype(jnp.int32)


def nucleus_threshold(probs: Float[Array, " V"], top_p: float) -> Float[Array, ""]:
    """The largest probability t such that the tokens with probability >= t carry mass >= top_p.

    Bisection on t instead of sorting the vocabulary: 32 vectorised passes are much cheaper than a 50k-way
    sort per row on CPU, and the result equals the sorted-prefix rule up to ties within max_p / 2**32.
    """

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        enough = jnp.sum(jnp.where(probs >= mid, probs, 0.0)) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, bisect, (jnp.zeros(()), jnp.max(probs) * (1 + 1e-6)))
    return lo


def generate(
    model: CausalLM,
    prompt_tokens: Int[Array, "B P"],
    prompt_mask: Int[Array, "B P"],
    key: PRNGKeyArray,
    config: SamplingConfig,
    *,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    stop_table: StopTable | None = None,
    samples_per_prompt: int = 1,
    mesh: Mesh | None = None,
) -> GenerateOutput:
    """Samples up to `config.max_new_tokens` tokens after each left-padded prompt, `samples_per_prompt` = K
    times (rows prompt-major: row b * K + k is sample k of prompt b; each prompt is prefilled once).

    Args:
      model: the causal LM.
      prompt_tokens: [B, P] left-padded prompt ids (see `jaxreason.sampling.pad_left`).
      prompt_mask: [B, P] 1 for real prompt tokens.
      key: one PRNG key, or [B * K] keys (one per output row: a row's draws then depend on its key alone).
      config: sampling settings (static: a new value compiles a new program).
      eos_ids: token ids that end a row.
      pad_id: id written after a row has ended.
      stop_table: stop strings (`jaxreason.sampling.build_stop_table`); a row ends on the token that
        completes one, and that token is kept.
      mesh: shard the weights over it by the rules (`placement.inference_state`), and the rows over its batch
        axes where their number divides over them (the same tokens as without a mesh).
    """
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} must both be [B, P]"
        )
    rows = prompt_tokens.shape[0] * samples_per_prompt
    row_keys = key if _is_key_batch(key, rows) else jax.random.split(key, rows)
    graphdef, state = inference_state(model, mesh)
    batch = (jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_mask, jnp.int32), row_keys)
    if mesh is not None and not prompt_tokens.shape[0] % sharding.batch_devices(mesh):
        batch = sharding.put_rows(batch, mesh)
    return _generate_jit(graphdef, state, *batch, stop_table, config=config, eos_ids=tuple(eos_ids), pad_id=pad_id,
                         samples_per_prompt=samples_per_prompt)


def _is_key_batch(key, batch: int) -> bool:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2 and key.shape[0] == batch


@struct.dataclass
class _LoopState:
    step: Int[Array, ""]
    logits: Float[Array, "B V"]
    cache: KVCache
    tokens: Int[Array, "B N"]
    logprobs: Float[Array, "B N"]
    lengths: Int[Array, " B"]
    done: Bool[Array, " B"]
    stopped: Bool[Array, " B"]
    last_hidden: Float[Array, "B E"]
    stop_buffer: object

    def outputs(self) -> GenerateOutput:
        return GenerateOutput(tokens=self.tokens, logprobs=self.logprobs, lengths=self.lengths, stopped=self.stopped,
                              last_hidden=self.last_hidden)

    def take_rows(self, rows: Int[Array, " R"]) -> _LoopState:
        """The state of rows `rows` (gathered, in that order)."""
        return jax.tree.map(lambda x: x[rows], self.replace(step=None, cache=None)).replace(
            step=self.step, cache=self.cache.take_rows(rows))


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "eos_ids", "pad_id", "samples_per_prompt"))
def _generate_jit(graphdef, state, prompt_tokens, prompt_mask, row_keys, stop_table, *, config, eos_ids, pad_id,
                  samples_per_prompt):
    model = nnx.merge(graphdef, state)
    return sample(model, prompt_tokens, prompt_mask, row_keys, config, eos_ids=eos_ids, pad_id=pad_id,
                  stop_table=stop_table, samples_per_prompt=samples_per_prompt)


def sample(
    model: CausalLM,
    prompt_tokens: Int[Array, "B P"],
    prompt_mask: Int[Array, "B P"],
    row_keys: PRNGKeyArray,
    config: SamplingConfig,
    *,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    stop_table: StopTable | None = None,
    samples_per_prompt: int = 1,
    skip: Bool[Array, " B"] | None = None,
) -> GenerateOutput:
    """The pure sampling program (call it inside your own jit; `generate` is its jitted wrapper).

    Each prompt is prefilled once and its cache shared by its `samples_per_prompt` = K samples, so K
    continuations of one prefix cost one prefill and read its keys once per step. Output rows are
    prompt-major: row b * K + k is sample k of prompt b.

    Args:
      row_keys: [B * K] keys, one per output row.
      skip: [B] prompts to generate nothing for (their rows come back empty, with length 0).
    """
    batch, prompt_len = prompt_tokens.shape
    cache = KVCache.init(model.config, batch, prompt_len, dtype=model.transformer.dtype)
    hidden, cache = model.transformer(prompt_tokens, prompt_mask, cache=cache)
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]  # the vocabulary projection of the last token only
    return sample_from_cache(model, logits, cache, row_keys, config, eos_ids=eos_ids, pad_id=pad_id,
                             stop_table=stop_table, samples_per_prompt=samples_per_prompt, skip=skip)


def sample_from_cache(
    model: CausalLM,
    logits: Float[Array, "B V"],
    cache: KVCache,
    row_keys: PRNGKeyArray,
    config: SamplingConfig,
    *,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    stop_table: StopTable | None = None,
    samples_per_prompt: int = 1,
    skip: Bool[Array, " B"] | None = None,
    max_tokens: Int[Array, " B"] | None = None,
) -> GenerateOutput:
    """`sample` after the prefill: continues from each row's next-token `logits` and its filled `cache`.

    The prompt's cache is read-only here, a prefix shared by its `samples_per_prompt` = K samples (rows
    prompt-major, as in `sample`); the sampled tokens go to a cache of their own, `config.max_new_tokens` slots.
    `max_tokens` [B] caps each prompt's samples below that (a row that reaches its cap ends, not `stopped`).

    With `config.shrink_at`, the decode runs in phases of fewer rows: once at most that many rows are live,
    they are gathered with their caches, and the rest are done. They keep sharing their prompts' cache, each in
    its slot among its prompt's samples (`PrefixGrid`). A row draws from its own key at each step in every
    phase, so the samples are the same either way.
    """
    batch = logits.shape[0]
    k = samples_per_prompt
    n = config.max_new_tokens
    rows = batch * k
    limit = jnp.full((rows,), n) if max_tokens is None else jnp.repeat(jnp.minimum(max_tokens, n), k)
    done = (jnp.zeros((rows,), bool) if skip is None else jnp.repeat(skip, k)) | (limit <= 0)
    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        logits=jnp.repeat(logits, k, axis=0),
        cache=KVCache.init(model.config, rows, n, dtype=cache.k.dtype),
        tokens=jnp.full((rows, n), pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, n), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32),
        done=done,
        stopped=jnp.zeros((rows,), bool),
        last_hidden=jnp.zeros((rows, model.config.hidden_size), model.transformer.dtype),
        stop_buffer=None if stop_table is None else init_stop_buffer(stop_table, rows),
    )
    decode = functools.partial(_decode, model, config=config, eos_ids=eos_ids, pad_id=pad_id, stop_table=stop_table)
    sizes = batch_sizes(rows, config.shrink_at)[1:]
    state = decode(state, cache, row_keys, limit, live_above=sizes[0] if sizes else 0)
    out = state.outputs()
    index = jnp.arange(rows)  # the output row of each row of `state`
    for size, after in zip(sizes, [*sizes[1:], 0]):
        keep = jnp.argsort(state.done, stable=True)[:size]  # the live rows first, in order
        index = index[keep]
        state = state.take_rows(keep)
        grid = PrefixGrid.of(index, batch, k)
        state = decode(state, cache, row_keys[index], limit[index], live_above=after, grid=grid)
        out = put_rows(out, index, state.outputs())
    return out


def _decode(model: CausalLM, state: _LoopState, prefix: KVCache, row_keys: PRNGKeyArray, limit: Int[Array, " R"],
            *, config: SamplingConfig, eos_ids, pad_id, stop_table, live_above: int,
            grid: PrefixGrid | None = None) -> _LoopState:
    """Decode steps until every row is done, the step limit, or no more than `live_above` rows live.

    Row r of `state` continues prefix row r // (R / P) (P the prefix's rows), or the one `grid` says.
    """
    n = config.max_new_tokens
    eos = jnp.asarray(eos_ids if eos_ids and not config.ignore_eos else (-1,), jnp.int32)
    sample_rows = jax.vmap(lambda lg, key: sample_logits(lg, key, config))

    def cond(s: _LoopState):
        return (s.step < n) & (jnp.sum(~s.done) > live_above)

    def body(s: _LoopState) -> _LoopState:
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, s.step)
        token = sample_rows(s.logits, keys)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(s.logits), token[:, None], axis=1)[:, 0]
        live = ~s.done
        token = jnp.where(live, token, pad_id)
        ended = jnp.isin(token, eos)
        stop_buffer = s.stop_buffer
        if stop_table is not None:
            stop_buffer, hit = update_stop_buffer(stop_table, stop_buffer, token)
            ended |= hit
        ended &= live
        full = live & (s.lengths + 1 >= limit)
        hidden, cache = model.transformer(token[:, None], live[:, None].astype(jnp.int32), cache=s.cache,
                                          prefix=prefix, prefix_grid=grid)
        next_logits = model.logits_from_hidden(hidden)
        return _LoopState(
            step=s.step + 1,
            logits=next_logits[:, -1],
            cache=cache,
            tokens=s.tokens.at[:, s.step].set(token),
            logprobs=s.logprobs.at[:, s.step].set(jnp.where(live, logprob, 0.0)),
            lengths=s.lengths + live,
            done=s.done | ended | full,
            stopped=s.stopped | ended,
            last_hidden=jnp.where(live[:, None], hidden[:, -1], s.last_hidden),
            stop_buffer=stop_buffer,
        )

    return jax.lax.while_loop(cond, body, state)
