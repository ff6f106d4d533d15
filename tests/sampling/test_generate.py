"""The jitted sampler against step-by-step recomputation without a cache, on a tiny random model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreason.models import CausalLM, ModelConfig
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.models.kv_cache import KVCache
from jaxreason.sampling import SamplingConfig, build_stop_table, encode_prompts, generate, pad_left, sample_logits
from jaxreason.sampling.generate import draw_categorical, nucleus_threshold, sample_from_cache

TOKENIZER = build_char_tokenizer()
CONFIG = ModelConfig(
    vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id,
)
PROMPTS = ["12 + 7 =", "Q: 3 * 4?\nA:", "x"]
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)
SAMPLED = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def model():
    m = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    # Larger weights than the 0.02 default give peaked, prompt-dependent distributions.
    state = nnx.state(m, nnx.Param)
    nnx.update(m, jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, state))
    return m


def _run(model, config, texts=PROMPTS, key=0, **kw):
    tokens, mask = encode_prompts(TOKENIZER, texts)
    return generate(model, tokens, mask, jax.random.key(key), config, pad_id=TOKENIZER.pad_token_id, **kw)


def test_greedy_equals_uncached_argmax(model):
    out = _run(model, GREEDY)
    for i, text in enumerate(PROMPTS):
        ids = TOKENIZER.encode(text)
        for t in range(GREEDY.max_new_tokens):
            logits = model(jnp.asarray([ids]))[0, -1]
            assert int(out.tokens[i, t]) == int(jnp.argmax(logits)), (text, t)
            ids.append(int(out.tokens[i, t]))
    assert np.all(np.asarray(out.lengths) == GREEDY.max_new_tokens)
    assert not np.any(np.asarray(out.stopped))


def test_logprobs_are_model_log_softmax(model):
    out = _run(model, SAMPLED)
    ids = TOKENIZER.encode(PROMPTS[1]) + np.asarray(out.tokens[1]).tolist()
    logp = jax.nn.log_softmax(model(jnp.asarray([ids]))[0], axis=-1)
    p = len(TOKENIZER.encode(PROMPTS[1]))
    expected = [float(logp[p - 1 + t, ids[p + t]]) for t in range(SAMPLED.max_new_tokens)]
    np.testing.assert_allclose(np.asarray(out.logprobs[1]), expected, rtol=1e-4, atol=1e-4)


def test_row_output_does_not_depend_on_batch(model):
    keys = jax.random.split(jax.random.key(3), len(PROMPTS))
    tokens, mask = encode_prompts(TOKENIZER, PROMPTS)
    batched = generate(model, tokens, mask, keys, SAMPLED)
    for i, text in enumerate(PROMPTS):
        t1, m1 = pad_left([TOKENIZER.encode(text)], TOKENIZER.pad_token_id)
        alone = generate(model, t1, m1, keys[i : i + 1], SAMPLED)
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(batched.tokens[i]))


def test_same_seed_same_output_and_seeds_differ(model):
    a, b, c = _run(model, SAMPLED, key=1), _run(model, SAMPLED, key=1), _run(model, SAMPLED, key=2)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_eos_ends_row_and_pads_after(model):
    greedy = _run(model, GREEDY)
    eos = int(greedy.tokens[0, 4])  # pretend the token greedy emits at step 4 is EOS
    out = _run(model, GREEDY, eos_ids=(eos,))
    first = int(np.argmax(np.asarray(greedy.tokens[0]) == eos))
    assert int(out.lengths[0]) == first + 1 and bool(out.stopped[0])
    assert np.all(np.asarray(out.tokens[0, first + 1 :]) == TOKENIZER.pad_token_id)
    assert np.all(np.asarray(out.logprobs[0, first + 1 :]) == 0)


def test_stop_string_spanning_tokens(model):
    greedy = _run(model, GREEDY)
    text = TOKENIZER.decode(np.asarray(greedy.tokens[1]).tolist())
    stop = text[5:8]  # three characters = three tokens of the char tokenizer
    out = _run(model, GREEDY, stop_table=build_stop_table(TOKENIZER, [stop], CONFIG.vocab_size))
    assert int(out.lengths[1]) == text.index(stop) + len(stop)
    assert bool(out.stopped[1])
    np.testing.assert_array_equal(np.asarray(out.tokens[1, :8]), np.asarray(greedy.tokens[1, :8]))


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = lambda cfg: np.asarray(jax.vmap(lambda k: sample_logits(logits, k, cfg))(keys))
    assert set(draw(SamplingConfig(top_k=2)).tolist()) == {0, 1}
    assert set(draw(SamplingConfig(top_p=0.75)).tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.8
    assert set(draw(SamplingConfig(top_p=0.5)).tolist()) == {0}
    counts = np.bincount(draw(SamplingConfig()), minlength=4) / len(keys)
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    assert int(sample_logits(logits, keys[0], SamplingConfig(temperature=0))) == 0


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_sampling_distribution(temperature):
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
    keys = jax.random.split(jax.random.key(1), 4000)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(temperature=temperature)))(keys))
    expected = np.asarray(jax.nn.softmax(logits / temperature))
    counts = np.bincount(draws, minlength=4) / len(keys)
    np.testing.assert_allclose(counts, expected, atol=0.03)
    assert np.abs(expected - np.asarray(jax.nn.softmax(logits))).max() > 0.1  # far from temperature 1


def _inverse_cdf_reference(key, logits) -> int:
    """`draw_categorical` in float64 numpy: a 256-id block by its mass, then an id in it, from the same uniforms."""
    p = np.exp(np.asarray(logits, np.float64) - np.max(np.asarray(logits, np.float64)))
    blocks = np.pad(p, (0, -len(p) % 256)).reshape(-1, 256)
    u = np.asarray(jax.random.uniform(key, (2,)), np.float64)
    block = int(np.searchsorted(np.cumsum(blocks.sum(1)), u[0] * blocks.sum(), side="right"))
    return block * 256 + int(np.searchsorted(np.cumsum(blocks[block]), u[1] * blocks[block].sum(), side="right"))


def test_draws_follow_the_distribution_across_blocks():
    """Probabilities spread over several 256-id blocks (the last one partial), with impossible ids between."""
    rng = np.random.default_rng(0)
    probs = np.zeros(1000)
    support = rng.choice(1000, size=12, replace=False)
    probs[support] = rng.dirichlet(np.ones(12))
    logits = jnp.log(jnp.asarray(probs, jnp.float32))  # -inf off the support
    keys = jax.random.split(jax.random.key(5), 20000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: draw_categorical(k, logits)))(keys))
    assert set(draws.tolist()) <= set(support.tolist())
    np.testing.assert_allclose(np.bincount(draws, minlength=1000) / len(keys), probs, atol=0.015)
    assert {int(s) // 256 for s in support} == {int(d) // 256 for d in draws}  # every block with mass is reached


def test_sampled_tokens_follow_tempered_logits(model):
    """Each step draws from fold_in(row_key, step) and logits / T (by inverse CDF); log-probs stay at T = 1."""
    config = SamplingConfig(max_new_tokens=8, temperature=0.6)
    row_keys = jax.random.split(jax.random.key(7), len(PROMPTS))
    tokens, mask = encode_prompts(TOKENIZER, PROMPTS)
    out = generate(model, tokens, mask, row_keys, config, pad_id=TOKENIZER.pad_token_id)
    differs_at_temperature_1 = False
    for i, text in enumerate(PROMPTS):
        ids = TOKENIZER.encode(text)
        for t in range(config.max_new_tokens):
            logits = model(jnp.asarray([ids]))[0, -1]
            key = jax.random.fold_in(row_keys[i], t)
            token = int(out.tokens[i, t])
            assert token == _inverse_cdf_reference(key, logits / config.temperature), (text, t)
            differs_at_temperature_1 |= token != _inverse_cdf_reference(key, logits)
            np.testing.assert_allclose(float(out.logprobs[i, t]), float(jax.nn.log_softmax(logits)[token]),
                                       rtol=1e-4, atol=1e-4)
            ids.append(token)
    assert differs_at_temperature_1  # the check above could tell a temperature-1 sampler apart


def test_bad_sampling_config_is_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="shrink_at"):
        SamplingConfig(shrink_at=(0.5, 1.0))


def test_nucleus_threshold_keeps_the_sorted_prefix():
    rng = np.random.default_rng(0)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        for _ in range(20):
            probs = rng.dirichlet(np.full(500, 0.3)).astype(np.float32)
            order = np.argsort(-probs)
            before = np.cumsum(probs[order]) - probs[order]
            expected = set(order[before < top_p].tolist())
            if np.min(np.abs(before - top_p)) < 1e-5:
                continue  # float32 sums cannot settle a boundary this close
            kept = np.flatnonzero(probs >= float(nucleus_threshold(jnp.asarray(probs, jnp.float32), top_p)))
            assert set(kept.tolist()) == expected


def test_samples_per_prompt_share_one_prefill(model):
    """K samples of one prefill equal K separate generations of the same prompt with the same keys."""
    from jaxreason.sampling import sample

    tokens, mask = encode_prompts(TOKENIZER, PROMPTS[:2])
    keys = jax.random.split(jax.random.key(5), 6)  # 2 prompts x 3 samples
    many = jax.jit(lambda t, m, k: sample(model, t, m, k, SAMPLED, samples_per_prompt=3))(tokens, mask, keys)
    repeated = generate(model, np.repeat(tokens, 3, axis=0), np.repeat(mask, 3, axis=0), keys, SAMPLED)
    np.testing.assert_array_equal(np.asarray(many.tokens), np.asarray(repeated.tokens))
    np.testing.assert_allclose(np.asarray(many.logprobs), np.asarray(repeated.logprobs), rtol=1e-5, atol=1e-5)


def test_max_tokens_caps_rows_and_last_hidden_is_the_final_tokens_state(model):
    """Per-prompt caps end rows early (not `stopped`), a cap of 0 samples nothing, and `last_hidden` is the
    backbone's state at each row's last new token, as a full pass over prompt + completion computes it."""
    tokens, mask = encode_prompts(TOKENIZER, PROMPTS)
    cache = KVCache.init(CONFIG, len(PROMPTS), tokens.shape[1])
    hidden, cache = model.transformer(tokens, mask, cache=cache)
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]
    keys = jax.random.split(jax.random.key(6), 2 * len(PROMPTS))
    caps = jnp.asarray([3, 0, 12])
    out = sample_from_cache(model, logits, cache, keys, SAMPLED, samples_per_prompt=2, max_tokens=caps)
    free = sample_from_cache(model, logits, cache, keys, SAMPLED, samples_per_prompt=2)
    np.testing.assert_array_equal(np.asarray(out.lengths), [3, 3, 0, 0, 12, 12])
    assert not np.any(np.asarray(out.stopped))
    np.testing.assert_array_equal(np.asarray(out.tokens[:2, :3]), np.asarray(free.tokens[:2, :3]))  # a cap cuts
    np.testing.assert_array_equal(np.asarray(out.last_hidden[2:4]), 0)
    for row in (0, 1, 4, 5):
        ids = TOKENIZER.encode(PROMPTS[row // 2]) + np.asarray(out.tokens[row, : int(out.lengths[row])]).tolist()
        full, _ = model.transformer(jnp.asarray([ids]))
        np.testing.assert_allclose(np.asarray(out.last_hidden[row]), np.asarray(full[0, -1]), rtol=1e-4, atol=1e-4)


def test_shrinking_decode_gives_the_same_samples(model):
    """Phases of fewer rows (`shrink_at`) gather the live rows with their caches: the same tokens, log-probs,
    lengths, stops and last states as one full-width decode, with caps, skipped prompts and a stop string."""
    texts = PROMPTS * 2
    tokens, mask = encode_prompts(TOKENIZER, texts)
    cache = KVCache.init(CONFIG, len(texts), tokens.shape[1])
    hidden, cache = model.transformer(tokens, mask, cache=cache)
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]
    keys = jax.random.split(jax.random.key(8), 4 * len(texts))
    stop = build_stop_table(TOKENIZER, [" "], CONFIG.vocab_size)
    kw = dict(samples_per_prompt=4, max_tokens=jnp.asarray([12, 2, 7, 12, 0, 5]), stop_table=stop,
              skip=jnp.asarray([False, False, True, False, False, False]), pad_id=TOKENIZER.pad_token_id)
    run = lambda config: jax.jit(lambda lg, c, k: sample_from_cache(model, lg, c, k, config, **kw))(logits, cache, keys)
    whole = run(SAMPLED)
    lengths = np.asarray(whole.lengths)
    assert len(set(lengths.tolist())) > 4 and lengths.max() == 12  # rows finish at many different steps
    for shrink in [(0.5,), (0.75, 0.5, 0.25), (0.05,)]:
        phased = run(dataclasses.replace(SAMPLED, shrink_at=shrink))
        for name in ("tokens", "lengths", "stopped"):
            np.testing.assert_array_equal(np.asarray(getattr(phased, name)), np.asarray(getattr(whole, name)), name)
        for name in ("logprobs", "last_hidden"):
            np.testing.assert_allclose(np.asarray(getattr(phased, name)), np.asarray(getattr(whole, name)),
                                       rtol=1e-5, atol=1e-5, err_msg=name)
