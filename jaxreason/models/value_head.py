"""A scalar head on a decoder backbone: the PRM, ORM or verifier of every method.

The head reads the final hidden state at every position and returns one logit per token; `sigmoid` of the
logit at a step's last token is the value of the partial solution up to that step, in [0, 1]. The backbone
is either the model's own `Transformer` or the policy's (pass `backbone=policy.transformer`: NNX shares the
module, so training one trains the other).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxreason.models.config import ModelConfig
from jaxreason.models.kv_cache import KVCache
from jaxreason.models.llama import Transformer


class ValueModel(nnx.Module):
    """Token ids [B, T] -> value logits [B, T] (float32)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        backbone: Transformer | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        head_init: float = 0.3,
        rngs: nnx.Rngs,
    ):
        """`head_init`: the head's initial weights are N(0, (head_init / sqrt(E))^2), so every value starts near
        0.5 but the backbone gets gradient from the first step (a zero head passes it none, and a PRM fitted
        from a copy of the policy then sits on a plateau for hundreds of steps); 0 gives the zero head."""
        self.config = config
        self.transformer = backbone or Transformer(
            config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs
        )
        head = head_init / config.hidden_size ** 0.5 * jax.random.normal(rngs.params(), (config.hidden_size,))
        self.head = nnx.Param(head.astype(param_dtype), out_sharding=("embed",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((), param_dtype), out_sharding=(), eager_sharding=False)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        attention_mask: Int[Array, "B T"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
    ) -> Float[Array, "B T"] | tuple[Float[Array, "B T"], KVCache]:
        """float32 value logits; with a cache (the tokens continue its rows), also the updated cache."""
        hidden, new_cache = self.transformer(tokens, attention_mask, positions, cache)
        logits = self.logits_from_hidden(hidden)
        return logits if cache is None else (logits, new_cache)

    def logits_from_hidden(self, hidden: Float[Array, "... E"]) -> Float[Array, "..."]:
        """The head alone, on hidden states of the backbone (e.g. the policy's, when the PRM shares it)."""
        logits = hidden.astype(jnp.float32) @ self.head[...].astype(jnp.float32)
        return logits + self.bias[...].astype(jnp.float32)

    def values(
        self, tokens: Int[Array, "B T"], attention_mask: Int[Array, "B T"] | None = None
    ) -> Float[Array, "B T"]:
        """Values in [0, 1] at every position."""
        return jax.nn.sigmoid(self(tokens, attention_mask))
