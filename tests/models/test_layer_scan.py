"""The layer scan over 16-bit weights and caches: slices and cache writes on raw bits give the plain ops' values
and gradients, and a bfloat16 model's compiled decode holds no float32 copy of its stacked weights or caches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tiny import CONFIG, PAD

from jaxreason.models import CausalLM
from jaxreason.models.llama import scan_layers, take_layer, update_slice
from jaxreason.sampling import SamplingConfig
from jaxreason.sampling.generate import _generate_jit
from jaxreason.sampling.placement import inference_state


def test_bit_slices_and_writes_equal_the_plain_ops_with_their_gradients():
    stack = jax.random.normal(jax.random.key(0), (3, 4, 5)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(take_layer(stack, jnp.asarray(2)), stack[2])
    update = jax.random.normal(jax.random.key(1), (3, 2, 5)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(update_slice(stack, update, 0, 1, 0),
                                  jax.lax.dynamic_update_slice(stack, update, (0, 1, 0)))
    weight = jax.random.normal(jax.random.key(2), (3, 2, 5)).astype(jnp.bfloat16)

    def loss(write, s, u):
        return jnp.sum(write(s, u).astype(jnp.float32) * weight[:, :1].astype(jnp.float32))

    ours = jax.grad(lambda s, u: loss(lambda a, b: update_slice(a, b, 0, 1, 0), s, u), argnums=(0, 1))(stack, update)
    plain = jax.grad(lambda s, u: loss(lambda a, b: jax.lax.dynamic_update_slice(a, b, (0, 1, 0)), s, u),
                     argnums=(0, 1))(stack, update)
    for a, b in zip(ours, plain):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.grad(lambda s: jnp.sum(take_layer(s, 1).astype(jnp.float32) ** 2))(stack),
                                  jax.grad(lambda s: jnp.sum(s[1].astype(jnp.float32) ** 2))(stack))


def test_scan_by_index_gives_the_scans_values_and_gradients():
    """Over 16-bit leaves `scan_layers` runs by layer index: the same outputs and gradients as jax.lax.scan."""
    stacks = (jax.random.normal(jax.random.key(0), (3, 4, 4)).astype(jnp.bfloat16), jnp.arange(3.0))
    h = jnp.ones((2, 4), jnp.bfloat16)

    def body(carry, layer):
        w, b = layer
        out = jnp.tanh(carry @ w + b.astype(carry.dtype))
        return out, out.sum(axis=0)

    def loss(scan, stacks):
        out, ys = scan(body, h, stacks)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(ys.astype(jnp.float32) ** 2)

    assert jnp.asarray(loss(scan_layers, stacks)) == loss(jax.lax.scan, stacks)
    ours, plain = (jax.grad(lambda s, scan=scan: loss(scan, s))(stacks) for scan in (scan_layers, jax.lax.scan))
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2)


def test_bfloat16_decode_keeps_no_float32_copy_of_weights_or_caches():
    config = dataclasses.replace(CONFIG, num_layers=3)
    model = CausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = inference_state(model)
    tokens = jnp.ones((2, 8), jnp.int32)
    keys = jax.random.split(jax.random.key(0), 2)
    program = _generate_jit.lower(graphdef, state, tokens, jnp.ones_like(tokens), keys, None,
                                  config=SamplingConfig(max_new_tokens=4), eos_ids=(), pad_id=PAD,
                                  samples_per_prompt=1).compile().as_text()
    stacked = [f"f32[3,{config.hidden_size},{config.intermediate_size}]",  # gate, up
               f"f32[3,{config.intermediate_size},{config.hidden_size}]",  # down
               f"f32[3,2,{config.num_kv_heads},8,{config.head_dim}]",  # the prompt's cache, 8 slots
               f"f32[3,2,{config.num_kv_heads},4,{config.head_dim}]"]  # the samples' cache, 4 slots
    assert not [s for s in stacked if s in program]
