"""A scalar head on a decoder backbone: the PRM, ORM or verifier of every method.

The head reads the final hidden state at every position and returns one logit per token; `sigmoid` of the
logit at a step's last token is the value of the partial solution up to that step, in [0, 1]. The backbone
is either the model's own `Transformer` or the policy's (pass `backbone=policy.transformer`: NNX shares the
module, so training one trains the other).

With `likelihood=True` the value also reads the backbone's own language model: the logit at t adds `scale` times
the lowest log-probability the LM gives any solution token up to t (`likelihood_minimum`). A PRM initialised
from the policy thereby starts from the policy's own surprise at a step ("6 + 7 = 12" has an improbable "2"),
where a value head alone has to learn to recompute every step from sparse labels, and from a few hundred
problems learns their answers instead. The LM is the model's tied embedding or, for an untied config, its own
`lm_head`. Such a model needs to know where each row's solution starts (`solution_start`), since the prompt's
tokens are not the policy's choices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxreason.models.config import ModelConfig
from jaxreason.models.kv_cache import KVCache
from jaxreason.models.llama import Transformer, _param
from jaxreason.train.losses import token_logprobs


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
        likelihood: bool = False,
        rngs: nnx.Rngs,
    ):
        """`head_init`: the head's initial weights are N(0, (head_init / sqrt(E))^2), so every value starts near
        0.5 but the backbone gets gradient from the first step (a zero head passes it none, and a PRM fitted
        from a copy of the policy then sits on a plateau for hundreds of steps); 0 gives the zero head.
        `likelihood`: add the LM's solution likelihood to the logit (module docstring)."""
        self.config = config
        self.likelihood = bool(likelihood)
        self.transformer = backbone or Transformer(
            config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs
        )
        head = head_init / config.hidden_size ** 0.5 * jax.random.normal(rngs.params(), (config.hidden_size,))
        self.head = nnx.Param(head.astype(param_dtype), out_sharding=("embed",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((), param_dtype), out_sharding=(), eager_sharding=False)
        if self.likelihood:
            self.scale = nnx.Param(jnp.ones((), param_dtype), out_sharding=(), eager_sharding=False)
            if not config.tie_word_embeddings:
                self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), param_dtype,
                                      init="zeros")

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        attention_mask: Int[Array, "B T"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        solution_start: Int[Array, " B"] | None = None,
    ) -> Float[Array, "B T"] | tuple[Float[Array, "B T"], KVCache]:
        """float32 value logits; with a cache (the tokens continue its rows), also the updated cache.
        `solution_start`: each row's column of its first solution token (a model that reads the likelihood needs
        it, and scores whole rows: a cache's continuation would lose the tokens before it)."""
        if cache is not None and self.likelihood:
            raise ValueError("a value model that reads the LM's likelihood scores whole rows, not a cache's "
                             "continuation (use likelihood_minimum with previous_hidden and initial)")
        hidden, new_cache = self.transformer(tokens, attention_mask, positions, cache)
        minimum = self.likelihood_minimum(hidden, tokens, attention_mask, solution_start) if self.likelihood else None
        logits = self.logits_from_hidden(hidden, minimum)
        return logits if cache is None else (logits, new_cache)

    def logits_from_hidden(self, hidden: Float[Array, "... E"],
                           minimum: Float[Array, "..."] | None = None) -> Float[Array, "..."]:
        """Value logits from the backbone's final hidden states (e.g. the policy's, when the PRM shares it); a
        model that reads the likelihood adds `scale * minimum` (`likelihood_minimum` at the same positions)."""
        logits = hidden.astype(jnp.float32) @ self.head[...].astype(jnp.float32)
        logits = logits + self.bias[...].astype(jnp.float32)
        if not self.likelihood:
            return logits
        if minimum is None:
            raise ValueError("this value model adds the LM's solution likelihood: pass likelihood_minimum's values")
        return logits + self.scale[...].astype(jnp.float32) * minimum

    def lm_logits(self, hidden: Float[Array, "... E"]) -> Float[Array, "... V"]:
        """The backbone's next-token logits (float32), from the tied embedding or the model's own LM head."""
        if self.config.tie_word_embeddings:
            return (hidden @ self.transformer.embed[...].astype(hidden.dtype).T).astype(jnp.float32)
        return (hidden @ self.lm_head[...].astype(hidden.dtype)).astype(jnp.float32)

    def likelihood_minimum(self, hidden: Float[Array, "B T E"], tokens: Int[Array, "B T"],
                           attention_mask: Int[Array, "B T"] | None, solution_start: Int[Array, " B"] | None,
                           previous_hidden: Float[Array, "B E"] | None = None,
                           initial: Float[Array, " B"] | None = None) -> Float[Array, "B T"]:
        """At each t, the lowest log p(token | tokens before it) under the backbone's LM over the row's solution
        tokens up to t (columns >= `solution_start`), and `initial` (0 when None): 0 before the solution.

        `previous_hidden` [B, E]: the hidden state just before `tokens[:, 0]` (a cached prefix's last), so the
        first token's log-probability is read too; without it a row's first token has no prediction and does not
        count, nor do padding and a token right after padding."""
        if solution_start is None:
            raise ValueError("a value model that reads the LM's likelihood needs each row's solution_start")
        if previous_hidden is not None:  # it predicts tokens[:, 0]; the token put before it is a placeholder
            hidden = jnp.concatenate([previous_hidden[:, None].astype(hidden.dtype), hidden], axis=1)
            found = token_logprobs(self.lm_logits(hidden), jnp.concatenate([tokens[:, :1], tokens], axis=1))
        else:
            found = jnp.pad(token_logprobs(self.lm_logits(hidden), tokens), ((0, 0), (1, 0)))
        column = jnp.arange(tokens.shape[1])[None, :]
        counted = (column >= solution_start[:, None]) & ((column > 0) | (previous_hidden is not None))
        if attention_mask is not None:
            real = attention_mask > 0
            before = jnp.pad(real[:, :-1], ((0, 0), (1, 0)), constant_values=previous_hidden is not None)
            counted = counted & real & before
        minimum = jax.lax.cummin(jnp.where(counted, found, 0.0), axis=1)
        return minimum if initial is None else jnp.minimum(minimum, initial[:, None])

    def logits_and_lm_logits(self, tokens: Int[Array, "B T"], attention_mask: Int[Array, "B T"] | None = None,
                             solution_start: Int[Array, " B"] | None = None
                             ) -> tuple[Float[Array, "B T"], Float[Array, "B T V"]]:
        """Value logits and the backbone's next-token logits from one pass (the PRM's LM term in training)."""
        hidden, _ = self.transformer(tokens, attention_mask)
        minimum = self.likelihood_minimum(hidden, tokens, attention_mask, solution_start) if self.likelihood else None
        return self.logits_from_hidden(hidden, minimum), self.lm_logits(hidden)

    def values(
        self, tokens: Int[Array, "B T"], attention_mask: Int[Array, "B T"] | None = None,
        solution_start: Int[Array, " B"] | None = None,
    ) -> Float[Array, "B T"]:
        """Values in [0, 1] at every position."""
        return jax.nn.sigmoid(self(tokens, attention_mask, solution_start=solution_start))


# The head's own parameters (head, bias, scale): a value model trained on these alone keeps its backbone, and
# the language model whose likelihood it reads, as they were.
HEAD_PARAMETERS = nnx.All(nnx.Param, nnx.Not(nnx.Any(nnx.PathContains("transformer"), nnx.PathContains("lm_head"))))
