"""The PRM's objective: value regression at step ends, and with an LM weight, next-token cross-entropy on the
correct solutions' tokens beside it (what keeps the language model a likelihood-reading PRM relies on)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreason.data.trace_batches import value_batch
from jaxreason.data.trace_store import FLAG_CORRECT, Trace
from jaxreason.models import ModelConfig, ValueModel
from jaxreason.train import losses
from jaxreason.train.objectives import value_objective

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=8, tie_word_embeddings=True)


def _trace(tokens, prompt_len, correct):
    return Trace(problem_id=0, iteration=0, tokens=np.asarray(tokens, np.int32), prompt_len=prompt_len,
                 step_ends=np.asarray([len(tokens)], np.int32), step_values=np.asarray([float(correct)], np.float32),
                 reward=float(correct), flags=FLAG_CORRECT if correct else 0)


TRACES = [_trace([5, 6, 7, 8, 9], 2, True), _trace([5, 6, 7, 10], 2, False), _trace([4, 11, 12, 13, 14, 3], 1, True)]


def test_the_batch_marks_the_correct_solutions_tokens_and_where_solutions_start():
    batch = value_batch(TRACES, 8, 0, lm_mask=True)
    np.testing.assert_array_equal(batch["solution_start"], [2, 2, 1])
    np.testing.assert_array_equal(batch["lm_mask"], [[0, 0, 1, 1, 1, 0, 0, 0],
                                                     [0, 0, 0, 0, 0, 0, 0, 0],  # wrong: no LM target
                                                     [0, 1, 1, 1, 1, 1, 0, 0]])
    assert "lm_mask" not in value_batch(TRACES, 8, 0)


@pytest.mark.parametrize("likelihood", [False, True])
def test_the_lm_term_is_the_value_loss_plus_weighted_cross_entropy(likelihood):
    model = ValueModel(CONFIG, likelihood=likelihood, rngs=nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in value_batch(TRACES, 8, 0, lm_mask=True).items()}
    plain, plain_metrics = value_objective("bce")(model, batch, jax.random.key(0))
    loss, metrics = value_objective("bce", 0.5)(model, batch, jax.random.key(0))
    hidden, _ = model.transformer(batch["tokens"], batch["attention_mask"])
    lm, _ = losses.sft_loss(model.lm_logits(hidden), batch["tokens"], batch["lm_mask"])
    np.testing.assert_allclose(metrics["value_loss"], plain, rtol=1e-6)
    np.testing.assert_allclose(loss, plain + 0.5 * lm, rtol=1e-6)
    assert float(lm) > 0 and metrics["loss"] == loss and plain_metrics["num_tokens"] == 3
    # the LM term's gradient reaches the embedding that the likelihood reads
    grads = nnx.grad(lambda m: value_objective("bce", 0.5)(m, batch, None)[0] -
                     value_objective("bce")(m, batch, None)[0])(model)
    assert float(jnp.abs(grads.transformer.embed[...]).max()) > 0


def test_training_the_head_alone_keeps_the_backbone_and_its_language_model(tmp_path):
    from jaxreason.data.batching import shuffled_batches
    from jaxreason.models.value_head import HEAD_PARAMETERS
    from jaxreason.sharding import make_mesh
    from jaxreason.train.fit import FitConfig, fit
    from jaxreason.train.optimizer import OptimizerConfig

    untied = ModelConfig(**{**CONFIG.__dict__, "tie_word_embeddings": False})
    model = ValueModel(untied, likelihood=True, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    batches = shuffled_batches(lambda idx: value_batch([TRACES[i] for i in idx], 8, 0), len(TRACES), 3, 0)
    fit(model, value_objective("bce"), batches,
        FitConfig(num_steps=3, batch_size=3, max_len=8, optimizer=OptimizerConfig(learning_rate=0.1, warmup_steps=0)),
        mesh=make_mesh(devices=jax.devices()[:1]), directory=tmp_path, seed=0, description="head",
        trainable=HEAD_PARAMETERS)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for name in ("head", "bias", "scale"):
        assert not np.array_equal(after[name], before[name]), name
    for frozen in ("transformer", "lm_head"):
        jax.tree.map(np.testing.assert_array_equal, after[frozen], before[frozen])
