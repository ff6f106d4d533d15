"""Flax NNX decoder for the Llama family: Llama 2/3, Mistral, Qwen2/2.5 and SmolLM2.

GQA attention with RoPE (optionally Llama 3 scaled), RMSNorm, SwiGLU MLP, optional q/k/v biases, tied or
untied embeddings and an optional sliding window. Layers are stacked on a leading `layers` axis and run with
`jax.lax.scan`, so compile time does not grow with depth. Every parameter carries logical axis names
(`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`, `norm`) that `jaxreason.sharding` maps
to mesh axes.

Positions and padding: callers pass `attention_mask` ([B, T], 1 for real tokens); positions default to the
number of real tokens before each one, so left- and right-padded batches give the same logits as unpadded
rows. With a `KVCache`, new tokens are written at `cache.index` and attend to every earlier real slot.

Shared prefixes: with `prefix` (a filled, read-only `KVCache` of P rows) and a batch of P x R rows, row r also
attends to prefix row r // R, before its own cache. Decoding R samples of one prompt this way reads the
prompt's keys and values once per step instead of once per sample (no repeated copy of the prompt's cache).
A decode that has dropped its finished rows passes a `PrefixGrid` saying which sample of which prefix row
each remaining row is, and keeps that one read.

Packing: with a `Packing` of the mask's real tokens, everything but attention runs on those only (see
`jaxreason.models.packing`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxreason.models.config import ModelConfig
from jaxreason.models.kv_cache import KVCache, PrefixGrid
from jaxreason.models.lora import effective_kernel
from jaxreason.models.packing import Packing

_INIT_STD = 0.02
_MASKED = -1e30  # finite, so a row with every key masked (a padding query) gives no NaN


def _param(rngs: nnx.Rngs, shape, names, dtype, init: str = "normal") -> nnx.Param:
    if init == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    # Logical names only; `jaxreason.sharding` turns them into NamedShardings under a mesh.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dot(spec: str, x: Array, kernel: Array) -> Array:
    """A projection by a weight matrix (`jnp.einsum(spec, x, kernel)`, in `x`'s dtype) that accumulates in
    float32, forward and backward.

    With bfloat16 inputs this is what makes XLA's CPU backend use its bfloat16 matmul kernels; a bfloat16
    result type makes it convert both to float32. The custom gradient keeps the backward products in bfloat16
    too (the transpose of a float32 result would multiply float32 cotangents). Only for projections: XLA:CPU's
    fallback for the attention's batched products (`DotThunk`) does not implement bfloat16 x bfloat16 ->
    float32, so those keep plain einsums.
    """
    return jnp.einsum(spec, x, kernel, preferred_element_type=jnp.float32).astype(x.dtype)


def _dot_forward(spec, x, kernel):
    return _dot(spec, x, kernel), (x, kernel)


def _dot_backward(spec, residuals, grad):
    x, kernel = residuals
    (x_axes, kernel_axes), out_axes = spec.split("->")[0].split(","), spec.split("->")[1]
    grad = grad.astype(x.dtype)
    dx = jnp.einsum(f"{out_axes},{kernel_axes}->{x_axes}", grad, kernel, preferred_element_type=jnp.float32)
    dkernel = jnp.einsum(f"{x_axes},{out_axes}->{kernel_axes}", x, grad, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dot.defvjp(_dot_forward, _dot_backward)


@jax.custom_jvp
def take_layer(stack: Array, i: Int[Array, ""]) -> Array:
    """`stack[i]` of a 16-bit float stack [L, ...], sliced as its raw bits.

    XLA:CPU slices 16-bit floats in float32: it converts the whole stack, and inside a loop it keeps that float32
    copy, so every pass over the layers reads twice the stack's bytes and converts each slice back. Integers are
    sliced as they are. The tangent is the plain slice of the tangent stack, so gradients are the usual ones."""
    bits = jax.lax.bitcast_convert_type(stack, jnp.uint16)
    return jax.lax.bitcast_convert_type(jax.lax.dynamic_index_in_dim(bits, i, keepdims=False), stack.dtype)


@take_layer.defjvp
def _take_layer_jvp(primals, tangents):
    stack, i = primals
    return take_layer(stack, i), jax.lax.dynamic_index_in_dim(tangents[0], i, keepdims=False)


def _is_16_bit_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 2


@jax.custom_jvp
def update_slice(x: Array, update: Array, *start) -> Array:
    """`jax.lax.dynamic_update_slice(x, update, start)`, on the raw bits of a 16-bit float `x` (which XLA:CPU
    would otherwise convert whole to float32 and back for the write: a cache read and written twice per step)."""
    if not _is_16_bit_float(x):
        return jax.lax.dynamic_update_slice(x, update, start)
    bits = jax.lax.dynamic_update_slice(jax.lax.bitcast_convert_type(x, jnp.uint16),
                                        jax.lax.bitcast_convert_type(update.astype(x.dtype), jnp.uint16), start)
    return jax.lax.bitcast_convert_type(bits, x.dtype)


@update_slice.defjvp
def _update_slice_jvp(primals, tangents):
    x, update, *start = primals
    return update_slice(x, update, *start), jax.lax.dynamic_update_slice(tangents[0], tangents[1], start)


def _bits(x):
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if _is_16_bit_float(x) else x


def scan_layers(body, h, stacks):
    """`jax.lax.scan(body, h, stacks)` over the layers axis of every leaf of `stacks`. Where a leaf is a 16-bit
    float (bf16 weights or caches of inference), the scan runs over the layer index instead, slicing those leaves
    with `take_layer` and the others with a dynamic index. Both give the same values and gradients, but the
    gradient of a stack indexed inside the loop is accumulated with a whole-stack add per layer, so stacks of
    other dtypes (float32 master weights in training) keep the plain scan."""
    leaves = jax.tree.leaves(stacks)
    if not any(_is_16_bit_float(x) for x in leaves):
        return jax.lax.scan(body, h, stacks)

    def by_index(carry, i):
        return body(carry, jax.tree.map(lambda x: take_layer(x, i) if _is_16_bit_float(x)
                                        else jax.lax.dynamic_index_in_dim(x, i, keepdims=False), stacks))

    return jax.lax.scan(by_index, h, jnp.arange(leaves[0].shape[0]))


def rope_frequencies(config: ModelConfig) -> Float[Array, " head_dim/2"]:
    """Inverse RoPE frequencies, with Llama 3 scaling when configured (as transformers computes them)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(
    x: Float[Array, "B T H D"], positions: Int[Array, "B T"], inv_freq: Float[Array, " D/2"]
) -> Float[Array, "B T H D"]:
    """Rotates halves (x[:D/2], x[D/2:]) as in the Hugging Face Llama layout."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def default_positions(attention_mask: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Position of each token = number of real tokens before it (padding does not shift positions)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, (size,), ("norm",), param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: Float[Array, "... E"]) -> Float[Array, "... E"]:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention; K/V for cached decoding are passed in and returned, never stored."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), param_dtype)
        self.k = _param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v = _param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), param_dtype)
        if config.attention_bias:
            self.q_bias = _param(rngs, (h, d), ("heads", "head_dim"), param_dtype, init="zeros")
            self.k_bias = _param(rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, init="zeros")
            self.v_bias = _param(rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, init="zeros")
        self.config = config
        self.dtype = dtype

    def _prefix_allowed(self, pre_mask: Bool[Array, "P W"], positions: Int[Array, "N T"], t: int):
        """[P, R, T, W] which prefix slots the T queries of each of N = P x R rows (prefix-major) may attend to."""
        p, w = pre_mask.shape
        r = positions.shape[0] // p
        allowed = jnp.broadcast_to(pre_mask[:, None, None, :], (p, r, t, w))
        if self.config.sliding_window is not None:  # distance in tokens: the prefix may hold padding gaps
            pre_positions = jnp.cumsum(pre_mask, axis=1) - 1
            distance = positions.reshape(p, r, t)[..., None] - pre_positions[:, None, None, :]
            allowed &= distance < self.config.sliding_window
        return allowed

    def __call__(
        self,
        x: Float[Array, "B T E"],
        positions: Int[Array, "B T"],
        inv_freq: Float[Array, " D/2"],
        query_slots: Int[Array, " T"],
        key_mask: Bool[Array, "B S"],
        cache_kv: tuple[Float[Array, "B K S D"], Float[Array, "B K S D"]] | None,
        cache_index: Int[Array, ""] | None,
        prefix_kv: tuple[Float[Array, "P K W D"], Float[Array, "P K W D"], Bool[Array, "P W"], PrefixGrid | None]
        | None = None,
        packing: Packing | None = None,
    ) -> tuple[Float[Array, "B T E"], tuple[Float[Array, "B K T D"], Float[Array, "B K T D"]] | None]:
        """The attention output and, with a cache (this layer's keys and values), the new tokens' keys and
        values in the cache's layout (the caller writes them into the cache).

        With `packing`, `x` [1, N, E] and `positions` [1, N] are the packed tokens of a [B, T] batch: the
        projections run on those, the attention itself in the [B, T] layout (`query_slots`, `key_mask` and
        the cache are as without packing), and the output is packed again, [1, N, E]."""
        cfg, dt = self.config, self.dtype
        q = _dot("bte,ehd->bthd", x, effective_kernel(self, "q").astype(dt))
        k = _dot("bte,ekd->btkd", x, effective_kernel(self, "k").astype(dt))
        v = _dot("bte,ekd->btkd", x, effective_kernel(self, "v").astype(dt))
        if cfg.attention_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if packing is not None:
            q, k, v = (packing.unpack(a[0]) for a in (q, k, v))
        if cache_kv is not None:
            k_layer, v_layer = cache_kv
            new_cache = (k.astype(k_layer.dtype).transpose(0, 2, 1, 3), v.astype(v_layer.dtype).transpose(0, 2, 1, 3))
            start = (0, 0, cache_index, 0)
            k_all = update_slice(k_layer, new_cache[0], *start)
            v_all = update_slice(v_layer, new_cache[1], *start)
            keys = "bksd"  # the cache's layout
        else:
            k_all, v_all, new_cache = k, v, None
            keys = "bskd"
        b, t, h, d = q.shape
        groups = h // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, groups, d)
        scores = jnp.einsum(f"btkgd,{keys}->bkgts", q, k_all.astype(dt)).astype(jnp.float32) / math.sqrt(d)
        key_slots = jnp.arange(key_mask.shape[1])
        allowed = key_slots[None, :] <= query_slots[:, None]  # [T, S] causal in slot order
        if cfg.sliding_window is not None:
            allowed &= query_slots[:, None] - key_slots[None, :] < cfg.sliding_window
        allowed = allowed[None, :, :] & key_mask[:, None, :]  # [B, T, S]
        scores = jnp.where(allowed[:, None, None], scores, _MASKED)
        if prefix_kv is None:
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = _weighted_values(probs, v_all.astype(dt), keys)
        else:
            # One softmax over [prefix keys, own keys]; the prefix rows are read once per group of R rows.
            k_pre, v_pre, pre_mask, grid = prefix_kv
            if t == 1:
                grid_positions = positions if grid is None else grid.to_grid(positions)
                out = _decode_with_prefix(q, scores, v_all.astype(dt), k_pre.astype(dt), v_pre.astype(dt),
                                          self._prefix_allowed(pre_mask, grid_positions, t), dt, grid)
            else:
                p, w = pre_mask.shape
                q_groups = q.reshape(p, b // p, t, cfg.num_kv_heads, groups, d)
                pre_scores = jnp.einsum("prtkgd,pkwd->prkgtw", q_groups, k_pre.astype(dt)).astype(jnp.float32)
                pre_allowed = self._prefix_allowed(pre_mask, positions, t)
                pre_scores = jnp.where(pre_allowed[:, :, None, None], pre_scores / math.sqrt(d), _MASKED)
                pre_scores = pre_scores.reshape(b, cfg.num_kv_heads, groups, t, w)
                probs = jax.nn.softmax(jnp.concatenate([pre_scores, scores], axis=-1), axis=-1).astype(dt)
                pre_probs = probs[..., :w].reshape(p, b // p, cfg.num_kv_heads, groups, t, w)
                pre_out = jnp.einsum("prkgtw,pkwd->prtkgd", pre_probs, v_pre.astype(dt))
                out = pre_out.reshape(b, t, cfg.num_kv_heads, groups, d) + _weighted_values(
                    probs[..., w:], v_all.astype(dt), keys)
        out = out.reshape(b, t, h, d)
        if packing is not None:
            out = packing.pack(out)[None]
        return _dot("bthd,hde->bte", out, effective_kernel(self, "o").astype(dt)), new_cache


def _decode_with_prefix(q, scores, v_own, k_pre, v_pre, pre_allowed, dt, grid: PrefixGrid | None = None):
    """Attention of one new token per row over its prefix row's keys and its own cache.

    q [B, 1, K, G, D]; scores [B, K, G, 1, S] (own keys, scaled and masked); v_own [B, K, S, D]; k_pre, v_pre
    [P, K, W, D]; the rows sit in a [P, R] grid of the prefix rows' samples, B = P x R in order unless `grid`
    places them; pre_allowed [P, R, 1, W] in grid order. The prefix products are laid out as batched matmuls
    over (P, K) with the R x G queries of a prefix row as one [R G, D] matrix, so the prefix's keys and values
    are read in place (once per prefix row, however many of its samples are left), and the two softmax parts
    share one max and one sum instead of being concatenated.
    """
    b, _, kv, g, d = q.shape
    p, _, w, _ = k_pre.shape
    if grid is None:
        r, to_grid, from_grid = b // p, (lambda x: x), (lambda x: x)
    else:
        r, to_grid, from_grid = grid.samples, grid.to_grid, grid.from_grid
    q_rows = to_grid(q).reshape(p, r, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(p, kv, r * g, d)
    pre = jnp.einsum("pkmd,pkwd->pkmw", q_rows, k_pre).astype(jnp.float32) / math.sqrt(d)
    pre = jnp.where(pre_allowed.reshape(p, 1, r, 1, w), pre.reshape(p, kv, r, g, w), _MASKED)
    own = to_grid(scores).reshape(p, r, kv, g, -1).transpose(0, 2, 1, 3, 4)  # [P, K, R, G, S]
    top = jnp.maximum(jnp.max(pre, axis=-1, keepdims=True), jnp.max(own, axis=-1, keepdims=True))
    pre, own = jnp.exp(pre - top), jnp.exp(own - top)
    total = jnp.sum(pre, axis=-1) + jnp.sum(own, axis=-1)  # [P, K, R, G]
    pre_out = jnp.einsum("pkmw,pkwd->pkmd", pre.reshape(p, kv, r * g, w).astype(dt), v_pre).reshape(p, kv, r, g, d)

    def rows(x):  # [P, K, R, ...] in grid order -> [B, K, ...] in the rows' order
        return from_grid(jnp.swapaxes(x, 1, 2).reshape(p * r, kv, *x.shape[3:]))

    own_out = _weighted_values(rows(own)[:, :, :, None].astype(dt), v_own, "bksd")[:, 0]  # [B, K, G, D]
    out = (rows(pre_out) + own_out) / rows(total)[..., None].astype(dt)
    return out.reshape(b, 1, kv, g, d)


def _weighted_values(probs: Float[Array, "B K G T S"], values: Array, keys: str) -> Float[Array, "B T K G D"]:
    """The attention output: `probs`-weighted sums of `values` ([B, K, S, D] for "bksd", else [B, S, K, D]).

    For one query token (decoding) a broadcast multiply and sum: XLA's CPU batched matmul spends more on its
    B x K tiny [G, S] x [S, D] products than on the arithmetic.
    """
    if probs.shape[3] == 1 and keys == "bksd":
        return jnp.sum(probs[:, :, :, 0, :, None] * values[:, :, None], axis=-2, dtype=jnp.float32).astype(
            values.dtype)[:, None]
    return jnp.einsum(f"bkgts,{keys}->btkgd", probs, values)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        self.gate = _param(rngs, (e, m), ("embed", "mlp"), param_dtype)
        self.up = _param(rngs, (e, m), ("embed", "mlp"), param_dtype)
        self.down = _param(rngs, (m, e), ("mlp", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, x: Float[Array, "B T E"]) -> Float[Array, "B T E"]:
        dt = self.dtype
        gate = jax.nn.silu(_dot("bte,em->btm", x, effective_kernel(self, "gate").astype(dt)))
        up = _dot("bte,em->btm", x, effective_kernel(self, "up").astype(dt))
        return _dot("btm,me->bte", gate * up, effective_kernel(self, "down").astype(dt))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attention = Attention(config, **kw)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(config, **kw)

    def __call__(self, x, positions, inv_freq, query_slots, key_mask, cache_kv, cache_index, prefix_kv=None,
                 packing=None):
        attn, new_cache = self.attention(
            self.attention_norm(x), positions, inv_freq, query_slots, key_mask, cache_kv, cache_index, prefix_kv,
            packing,
        )
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), new_cache


class Transformer(nnx.Module):
    """Embeddings, the stacked decoder layers and the final norm: token ids to hidden states.

    Shared by `CausalLM` (adds the LM head) and `jaxreason.models.ValueModel` (adds a scalar head).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        attention_mask: Int[Array, "B T"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        prefix: KVCache | None = None,
        packing: Packing | None = None,
        prefix_grid: PrefixGrid | None = None,
    ) -> tuple[Float[Array, "B T E"], KVCache | None]:
        """Hidden states after the final norm, and the cache with these tokens written (None without one).

        `prefix` (read-only, P rows; B a multiple of P; needs `cache`): row r continues prefix row r // (B / P).
        `prefix_grid` (decoding, one token per row): the rows are those of the grid's slots instead, any number.
        `packing` (of `attention_mask`'s real tokens, see `jaxreason.models.packing`): the embeddings, norms,
        projections and MLP run on the packed tokens only; the hidden states of the tokens it leaves out (the
        padding) come back zero, and their keys and values are zero in the cache (masked, as without it).
        """
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if prefix is not None and (cache is None or (b % prefix.mask.shape[0] and prefix_grid is None)):
            raise ValueError(f"a shared prefix of {prefix.mask.shape[0]} rows needs a cache and a batch that is a "
                             f"multiple of it, got batch {b}{'' if cache is not None else ' and no cache'}")
        if prefix_grid is not None and (prefix is None or t != 1 or prefix_grid.rows.shape[0] != prefix.mask.shape[0]):
            raise ValueError(f"a prefix grid of {prefix_grid.rows.shape[0]} prefix rows needs a shared prefix of as "
                             f"many rows and one token per row, got {t} tokens and "
                             f"{'no prefix' if prefix is None else f'a prefix of {prefix.mask.shape[0]} rows'}")
        if positions is None:
            offset = 0 if cache is None else cache.num_real_tokens()[:, None]
            if prefix is not None:
                prefix_rows = (jnp.repeat(jnp.arange(prefix.mask.shape[0]), b // prefix.mask.shape[0])
                               if prefix_grid is None else prefix_grid.prefix_rows())
                offset = offset + prefix.num_real_tokens()[prefix_rows][:, None]
            positions = offset + default_positions(attention_mask)
        if packing is not None:
            tokens, positions = packing.pack(tokens)[None], packing.pack(positions)[None]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        inv_freq = rope_frequencies(self.config)
        if cache is None:
            query_slots = jnp.arange(t)
            key_mask = attention_mask.astype(bool)
            cache_index = None
        else:
            query_slots = cache.index + jnp.arange(t)
            key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask.astype(bool), cache.index, 1)
            cache_index = cache.index

        graphdef, layer_state = nnx.split(self.layers)

        def body(h, inputs):
            state, layer_kv, prefix_kv = inputs
            layer = nnx.merge(graphdef, state)
            prefix_kv = None if prefix_kv is None else (*prefix_kv, prefix.mask, prefix_grid)
            h, new_kv = layer(h, positions, inv_freq, query_slots, key_mask, layer_kv, cache_index, prefix_kv,
                              packing)
            # A 16-bit cache's new keys and values leave the scan as raw bits (stacked, then written, without a
            # float32 round trip); what gets written to a cache carries no gradient.
            return h, None if new_kv is None else jax.tree.map(_bits, new_kv)

        if self.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        # The scan hands each layer its slice of the caches and collects only the new tokens' keys and values,
        # written into the all-layer buffers once, after it: carrying the buffers through the scan and updating
        # one layer per iteration made XLA copy them whole at every layer.
        kv = None if cache is None else (cache.k, cache.v)
        prefix_kv = None if prefix is None else (prefix.k, prefix.v)
        x, new_kv = scan_layers(body, x, (layer_state, kv, prefix_kv))
        x = self.norm(x)
        if packing is not None:
            x = packing.unpack(x[0])
        if cache is None:
            return x, None
        new_k, new_v = (jax.lax.bitcast_convert_type(n, c.dtype) if n.dtype != c.dtype else n
                        for n, c in zip(new_kv, (cache.k, cache.v)))
        start = (0, 0, 0, cache.index, 0)
        return x, KVCache(k=update_slice(cache.k, new_k, *start), v=update_slice(cache.v, new_v, *start),
                          mask=key_mask, index=cache.index + t)


class CausalLM(nnx.Module):
    """Llama-family causal language model: token ids [B, T] to next-token logits [B, T, vocab]."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.transformer = Transformer(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), param_dtype)

    def logits_from_hidden(self, hidden: Float[Array, "B T E"]) -> Float[Array, "B T V"]:
        dt = hidden.dtype
        if self.config.tie_word_embeddings:
            return _dot("bte,ve->btv", hidden, self.transformer.embed[...].astype(dt)).astype(jnp.float32)
        return _dot("bte,ev->btv", hidden, self.lm_head[...].astype(dt)).astype(jnp.float32)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        attention_mask: Int[Array, "B T"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        prefix: KVCache | None = None,
        packing: Packing | None = None,
        prefix_grid: PrefixGrid | None = None,
    ) -> Float[Array, "B T V"] | tuple[Float[Array, "B T V"], KVCache]:
        """float32 logits; with a cache, also the updated cache. `prefix`, `packing`, `prefix_grid`: see
        `Transformer.__call__`."""
        hidden, new_cache = self.transformer(tokens, attention_mask, positions, cache, prefix, packing, prefix_grid)
        logits = self.logits_from_hidden(hidden)
        return logits if cache is None else (logits, new_cache)
