"""The tiny models the tests share: one shape per kind, so jit (and the persistent compile cache set in
conftest.py) compiles each program once for every test file that uses it."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreason.data.sft_data import SFTDataset
from jaxreason.models import CausalLM, ModelConfig, ValueModel
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.sharding import MeshConfig, make_mesh
from jaxreason.train.objectives import sft_objective
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import init_train_state, make_train_step

TOKENIZER = build_char_tokenizer()
EOS, PAD = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id
# A Llama with the character tokenizer (GQA: 4 heads over 2 key/value heads).
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, eos_token_id=EOS, pad_token_id=PAD)
# The same shape over a 64-id vocabulary, for tests that train on token ids without a tokenizer.
NUMERIC = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)


def policy(seed: int = 0) -> CausalLM:
    """A random tiny policy (`CONFIG`)."""
    return CausalLM(CONFIG, rngs=nnx.Rngs(seed))


def value_model(seed: int = 1, backbone=None) -> ValueModel:
    """A random tiny value model (`CONFIG`), on its own backbone or on `backbone`."""
    return ValueModel(CONFIG, backbone=backbone, rngs=nnx.Rngs(seed))


def memorise(model: CausalLM, tokenizer, task, problems, *, steps: int, max_len: int = 64) -> CausalLM:
    """`model` trained in place on the gold solutions of `problems` (one batch, lr 1e-2) until it reproduces them
    (asserted): a policy whose answers are known."""
    records = [{"prompt": task.prompt(p), "completion": task.format_solution(p.solution_steps, p.answer)}
               for p in problems]
    data = SFTDataset(tokenizer, records, max_len=max_len)
    batch = data.batch(range(len(data)))
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=10, total_steps=steps, weight_decay=0))
    graphdef, state, shardings = init_train_state(model, optimizer, mesh)
    step = make_train_step(graphdef, sft_objective, optimizer, shardings, mesh)
    for _ in range(steps):
        state, metrics = step(state, batch)
    assert float(metrics["accuracy"]) == 1.0
    # Uncommitted on the default device, as a random model's are, so programs compiled for it are reused.
    nnx.update(model, jax.tree.map(jnp.asarray, jax.device_get(state.trainable)))
    return model
