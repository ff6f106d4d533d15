"""V-STaR's verifier: a language model trained by DPO on (correct, incorrect) solution pairs, read as the implicit
reward of DPO, beta (log pi_V(y | x) - log pi_ref(y | x)) (`jaxreason.train.losses.dpo_score`), against the
reference it was trained from (the SFT generator).

The log-ratio accumulates token by token, so the value of a partial solution that ends at a position is the
sigmoid of the score of everything up to it; a whole solution's is read at its last token (`score_position`),
as every verifier's is. The sum starts at each row's second real token: the prompt's tokens add a term that is the
same for every solution of a problem (so samples of a problem rank exactly by the paper's score), which shifts
the scores of different problems apart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxreason.models.llama import CausalLM
from jaxreason.models.lora import lora_disabled
from jaxreason.train.losses import dpo_score, token_logprobs
from jaxreason.verifiers.base import AGGREGATIONS, Verifier, register_verifier


class DPOVerifier(Verifier):
    """`model` (pi_V) scored against `reference` (pi_ref); both read the same tokenizer. With `reference` None,
    `model` carries LoRA adapters and the reference is the model with them off (`lora_disabled`): no second copy."""

    def __init__(self, model: CausalLM, reference: CausalLM | None, beta: float, aggregation: str = "last"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if reference is None and not any(hasattr(m, "lora_scale") for _, m in nnx.iter_graph(model)):
            raise ValueError("a DPO verifier without a reference model needs LoRA adapters on its model "
                             "(models.lora.add_lora): the reference is the model with them off")
        if reference is not None and model.config.vocab_size != reference.config.vocab_size:
            raise ValueError(f"the verifier's vocabulary ({model.config.vocab_size} ids) differs from its "
                             f"reference's ({reference.config.vocab_size})")
        self.model, self.reference = model, reference
        self.beta, self.aggregation = float(beta), aggregation

    @property
    def reference_model(self) -> CausalLM:
        """pi_ref's weights: `reference`, or `model` itself, whose reference is its base (`lora_disabled`)."""
        return self.model if self.reference is None else self.reference

    def rewards(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"]) -> Float[Array, "B T"]:
        """The implicit reward of each row's tokens up to and including each position (0 at the first real
        token and on padding's own columns)."""
        # a token counts when it and the token before it are real: the first real token has no context
        counted = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        policy = jnp.cumsum(token_logprobs(self.model(tokens, mask), tokens) * counted, axis=1)
        if self.reference is None:
            with lora_disabled(self.model):
                reference_logits = self.model(tokens, mask)
        else:
            reference_logits = self.reference(tokens, mask)
        reference = jnp.cumsum(token_logprobs(reference_logits, tokens) * counted, axis=1)
        return jnp.pad(dpo_score(policy, jax.lax.stop_gradient(reference), self.beta), ((0, 0), (1, 0)))

    def values_at(self, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], positions: Int[Array, "B S"],
                  solution_start: Int[Array, " B"] | None = None) -> Float[Array, "B S"]:
        del solution_start  # the prompt adds the same term to every solution of a problem (module docstring)
        return jax.nn.sigmoid(jnp.take_along_axis(self.rewards(tokens, mask), positions, axis=1))


register_verifier("dpo", lambda model, reference, beta=0.1, **options: DPOVerifier(model, reference, beta, **options))
