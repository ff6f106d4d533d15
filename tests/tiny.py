"""The tiny models the tests share: one shape per kind, so jit (and the persistent compile cache set in
conftest.py) compiles each program once for every test file that uses it."""

from flax import nnx

from jaxreason.models import CausalLM, ModelConfig, ValueModel
from jaxreason.models.char_tokenizer import build_char_tokenizer

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
