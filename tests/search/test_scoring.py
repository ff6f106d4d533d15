"""The fast scoring paths of search against plain full-width PRM passes: cached candidates, a shared backbone,
bucketed prefix widths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreason.models import CausalLM, ModelConfig, ValueModel
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.models.kv_cache import KVCache
from jaxreason.search.actions import ActionSpace
from jaxreason.search.expansion import ExpansionSpec, StepSearch, build_step_tables
from jaxreason.search.scoring import candidate_values, prefix_values, right_align
from jaxreason.search.selection import INVALID_LOGIT

TOKENIZER = build_char_tokenizer()
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, eos_token_id=TOKENIZER.eos_token_id,
                     pad_token_id=TOKENIZER.pad_token_id)


@pytest.fixture(scope="module")
def models():
    policy = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    shared = ValueModel(CONFIG, backbone=policy.transformer, rngs=nnx.Rngs(1))
    shared.head[...] = jax.random.normal(jax.random.key(2), shared.head[...].shape)
    shared.bias[...] = jnp.asarray(0.3)
    return policy, shared


def _rows(lengths, width, seed):
    tokens = np.array(jax.random.randint(jax.random.key(seed), (len(lengths), width), 3, CONFIG.vocab_size))
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    return jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32)


def test_value_model_with_cache_equals_full_pass(models):
    _, prm = models
    tokens, length = _rows([7, 12, 3], 16, 0)
    padded, mask = right_align(tokens, length)
    full = prm(padded, mask)
    cache = KVCache.init(CONFIG, 3, 16)
    first, cache = prm(padded[:, :10], mask[:, :10], cache=cache)
    second, cache = prm(padded[:, 10:], mask[:, 10:], cache=cache)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1) * np.asarray(mask), full * mask, atol=1e-5)
    assert int(cache.index) == 16


def test_candidate_values_equal_full_width_passes(models):
    _, prm = models
    prefix_tokens, prefix_len = _rows([5, 11, 8], 12, 1)
    cand, _ = _rows([6] * 6, 6, 2)
    cand = cand.reshape(3, 2, 6)
    cand_len = jnp.asarray([[6, 2], [0, 4], [1, 6]], jnp.int32)
    cand = jnp.where(jnp.arange(6) < cand_len[..., None], cand, 0)
    padded, mask = right_align(prefix_tokens, prefix_len)
    got = candidate_values(prm, padded, mask, cand, cand_len)
    for b in range(3):
        for k in range(2):
            n, m = int(prefix_len[b]), int(cand_len[b, k])
            row = jnp.concatenate([prefix_tokens[b, :n], cand[b, k, :m]])[None]
            want = prefix_values(prm, row, jnp.ones_like(row))[0]
            np.testing.assert_allclose(got[b, k], want, atol=1e-5, err_msg=f"prefix {b} candidate {k}")


def test_right_align_to_a_narrower_width():
    tokens, length = _rows([3, 5], 8, 3)
    full, full_mask = right_align(tokens, length)
    narrow, narrow_mask = right_align(tokens, length, width=5)
    np.testing.assert_array_equal(narrow, full[:, 3:])
    np.testing.assert_array_equal(narrow_mask, full_mask[:, 3:])


@pytest.mark.parametrize("shared", [False, True])
def test_node_values_equal_a_full_width_prm_pass(models, shared):
    """Root and child values (bucketed prefix width; read from the policy's prefill when the PRM shares its
    backbone) equal the PRM applied to the whole partial solution at the search's full width."""
    policy, prm = models
    space = ActionSpace.single_step(3)
    width = 128
    spec = ExpansionSpec(max_len=width, prompt_width=64, max_step_tokens=24, max_depth=4, temperature=1.0,
                         pad_id=0, eos_ids=(TOKENIZER.eos_token_id,), prm_shares_backbone=shared)
    tables = build_step_tables(TOKENIZER, space, "\n", "The answer is", CONFIG.vocab_size)
    policy_def, policy_state = nnx.split(policy)
    prm_def, prm_state = nnx.split(prm)
    search = StepSearch(policy_def, prm_def, space, spec, tables)
    assert search._widths() == (32, 64, 96)  # of the steps after the prompt (4 steps x 24 tokens at most)
    params = (policy_state, prm_state)
    tokens, length = _rows([9, 60], width, 4)
    prompts = jax.jit(search.encode_prompts)(params, tokens, length)
    root = jax.jit(search.root_fn)(params, jax.random.key(0), prompts)
    recurrent = jax.jit(search.recurrent_fn)
    node, values = root.embedding, [root.value]
    nodes = [node]
    for step in range(3):
        longest = jnp.argmax(node.candidate_len, axis=1)  # grow the rows as fast as the candidates allow
        out, node = recurrent(params, jax.random.key(step + 1), longest, node, prompts)
        values.append(out.value)
        nodes.append(node)
    assert int(nodes[-1].length[1]) - 60 > 32  # the second row's steps outgrew the narrow width
    for node, value in zip(nodes, values):
        padded, mask = right_align(node.tokens, node.length)
        np.testing.assert_allclose(value, prefix_values(prm, padded, mask), atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_roll_forward_value_and_budget(models, shared):
    """r = 1: a new non-terminal node's value is (1 - alpha) V + alpha * (the best PRM value among its own K
    candidates), and nothing more is sampled; r = 2 samples the next candidates too and counts their tokens in
    the budget. A terminal node keeps its PRM value."""
    policy, prm = models
    if not shared:
        prm = ValueModel(CONFIG, rngs=nnx.Rngs(3))
        prm.head[...] = jax.random.normal(jax.random.key(4), prm.head[...].shape)
    space = ActionSpace.single_step(3)
    tables = build_step_tables(TOKENIZER, space, "\n", "The answer is", CONFIG.vocab_size)
    policy_def, policy_state = nnx.split(policy)
    prm_def, prm_state = nnx.split(prm)
    params = (policy_state, prm_state)
    tokens, length = _rows([9, 20, 14, 30], 96, 5)

    def child(rollout_steps):
        spec = ExpansionSpec(max_len=96, max_step_tokens=16, max_depth=6, temperature=1.0, pad_id=0,
                             eos_ids=(TOKENIZER.eos_token_id,), prm_shares_backbone=shared,
                             rollout_steps=rollout_steps, rollout_alpha=0.25)
        search = StepSearch(policy_def, prm_def, space, spec, tables)
        prompts = search.encode_prompts(params, tokens, length)
        root = search.root_fn(params, jax.random.key(0), prompts)
        return search.recurrent_fn(params, jax.random.key(1), jnp.asarray([0, 2, 1, 0]), root.embedding, prompts)

    plain_out, plain = child(0)
    rolled_out, rolled = child(1)
    open_ = ~np.asarray(plain.terminal)
    assert open_.any() and not open_.all(), open_  # both cases are checked
    padded, mask = right_align(plain.tokens, plain.length)
    values = candidate_values(prm, padded, mask, plain.candidates, plain.candidate_len)
    best = values.max(axis=1)
    want = np.where(open_, 0.75 * plain_out.value + 0.25 * best, plain_out.value)
    np.testing.assert_allclose(rolled_out.value, want, atol=1e-5)
    np.testing.assert_array_equal(rolled.generated_tokens, plain.generated_tokens)

    _, two = child(2)
    extra = np.asarray(two.generated_tokens - plain.generated_tokens)
    # The second step samples after the best candidate unless that candidate ended the solution.
    goes_on = open_ & ~np.asarray(plain.candidate_ends)[np.arange(4), np.asarray(values.argmax(axis=1))]
    assert goes_on.any()
    assert np.all(extra[goes_on] > 0) and np.all(extra[goes_on] <= 3 * 16) and np.all(extra[~goes_on] == 0)


@pytest.mark.parametrize("sizes", [(1.0, 0.75, 0.5), (1.0, 0.375)])
def test_expanding_some_rows_gathers_them_and_changes_no_result(models, sizes):
    """With 3 of 8 rows to expand, the expansion runs on a smaller batch (the smallest of 8, 6, 4 rows that
    holds them, or of 8 and 3) and gives those rows what expanding all 8 gives them (the same samples; the
    values up to float rounding, as another batch size sums in another order); the others get no candidates."""
    from jaxreason.sampling.generate import batch_sizes

    assert batch_sizes(8, sizes) == ((8, 6, 4) if len(sizes) == 3 else (8, 3))
    policy, prm = models
    space = ActionSpace.single_step(2)
    spec = ExpansionSpec(max_len=96, prompt_width=32, max_step_tokens=12, max_depth=4, temperature=1.0, pad_id=0,
                         eos_ids=(TOKENIZER.eos_token_id,), prm_shares_backbone=True, expansion_sizes=sizes)
    tables = build_step_tables(TOKENIZER, space, "\n", "The answer is", CONFIG.vocab_size)
    policy_def, policy_state = nnx.split(policy)
    prm_def, prm_state = nnx.split(prm)
    search = StepSearch(policy_def, prm_def, space, spec, tables)
    params = (policy_state, prm_state)
    tokens, length = _rows([9, 20, 14, 30, 5, 12, 25, 7], 96, 6)
    prompt_len = jnp.minimum(length, 8)
    some = jnp.asarray([False, True, False, False, True, False, True, False])

    @jax.jit
    def expand(rows):
        prompts = search.encode_prompts(params, tokens, prompt_len)
        return search._expand_nodes(policy, prm, jax.random.key(7), prompts, tokens, length, rows)

    everything, gathered = expand(jnp.ones(8, bool)), expand(some)
    for name, full, part in zip(("candidates", "lengths", "priors", "ends", "generated", "values"), everything,
                                gathered):
        np.testing.assert_allclose(np.asarray(part)[np.asarray(some)], np.asarray(full)[np.asarray(some)],
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.asarray(gathered[1])[~np.asarray(some)], 0)
    assert np.all(np.asarray(gathered[2])[~np.asarray(some)] <= INVALID_LOGIT)
    assert np.asarray(gathered[4])[np.asarray(some)].min() > 0
