"""The fast scoring paths of search against plain full-width verifier passes: cached candidates
(`ValueVerifier.extend_scores` and the base `Verifier`'s default), a shared backbone, bucketed prefix widths; the
roll-forward's value and budget; and an expansion of some rows equal to expanding them all."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import CONFIG, TOKENIZER

from jaxreason.models import CausalLM, ValueModel
from jaxreason.models.kv_cache import KVCache
from jaxreason.sampling import SamplingConfig
from jaxreason.sampling.alignment import right_align
from jaxreason.sampling.buckets import batch_sizes
from jaxreason.search.actions import ActionSpace
from jaxreason.search.expansion import ExpansionSpec, StepSearch, build_step_tables
from jaxreason.search.node import NO_SLOT
from jaxreason.search.selection import INVALID_LOGIT, is_valid_action
from jaxreason.verifiers import ValueVerifier, Verifier

SAMPLING = SamplingConfig(max_new_tokens=24, temperature=1.0)


@pytest.fixture(scope="module")
def models():
    """The policy, a value model on its backbone and one with a backbone of its own (random heads)."""
    policy = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    shared = ValueModel(CONFIG, backbone=policy.transformer, rngs=nnx.Rngs(1))
    shared.head[...] = jax.random.normal(jax.random.key(2), shared.head[...].shape)
    shared.bias[...] = jnp.asarray(0.3)
    own = ValueModel(CONFIG, rngs=nnx.Rngs(3))
    own.head[...] = jax.random.normal(jax.random.key(4), own.head[...].shape)
    return policy, shared, own


def _rows(lengths, width, seed):
    tokens = np.array(jax.random.randint(jax.random.key(seed), (len(lengths), width), 3, CONFIG.vocab_size))
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    return jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32)


def _full_pass(model: ValueModel, tokens, length) -> np.ndarray:
    """[B] the value of each left-aligned row at its last real token, from one pass over the whole row."""
    padded, mask = right_align(tokens, length)
    return np.asarray(jax.nn.sigmoid(model(padded, mask)[:, -1]))


def test_value_model_with_cache_equals_full_pass(models):
    _, prm, _ = models
    tokens, length = _rows([7, 12, 3], 16, 0)
    padded, mask = right_align(tokens, length)
    full = prm(padded, mask)
    cache = KVCache.init(CONFIG, 3, 16)
    first, cache = prm(padded[:, :10], mask[:, :10], cache=cache)
    second, cache = prm(padded[:, 10:], mask[:, 10:], cache=cache)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1) * np.asarray(mask), full * mask, atol=1e-5)
    assert int(cache.index) == 16


@pytest.mark.parametrize("width", [None, 8])
@pytest.mark.parametrize("cached", [True, False])
def test_extend_scores_equal_full_width_passes(models, cached, width):
    """`ValueVerifier.extend_scores` (the prefix cached once, K candidates on top) and the base `Verifier`'s
    default (every concatenation scored in full) both give each left-aligned partial solution followed by each
    candidate the value a full pass over the concatenation gives; with `width`, a longer partial solution keeps
    its last `width` tokens. A candidate of length 0 gets the partial solution's own value. `extend_cost`
    counts the tokens each reads."""
    _, prm, _ = models
    verifier = ValueVerifier(prm)
    prefix_tokens, prefix_len = _rows([5, 11, 8], 12, 1)
    cand, _ = _rows([6] * 6, 6, 2)
    cand = cand.reshape(3, 2, 6)
    cand_len = jnp.asarray([[6, 2], [0, 4], [1, 6]], jnp.int32)
    cand = jnp.where(jnp.arange(6) < cand_len[..., None], cand, 0)
    extend = verifier.extend_scores if cached else lambda *a, **k: Verifier.extend_scores(verifier, *a, **k)
    got = np.asarray(extend(prefix_tokens, prefix_len, cand, cand_len, width=width))
    kept = prefix_len if width is None else jnp.minimum(prefix_len, width)
    assert width is None or int(prefix_len[1]) > width  # the cut is exercised
    rows = [np.concatenate([prefix_tokens[b, prefix_len[b] - kept[b]:prefix_len[b]], cand[b, k, :cand_len[b, k]]])
            for b in range(3) for k in range(2)]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
    want = _full_pass(prm, jnp.asarray(tokens), jnp.asarray([len(r) for r in rows]))
    np.testing.assert_allclose(got.reshape(-1), want, atol=1e-5)
    cost = verifier.extend_cost if cached else lambda *a, **k: Verifier.extend_cost(verifier, *a, **k)
    prefix_reads = kept if cached else 2 * kept
    np.testing.assert_array_equal(cost(prefix_len, cand_len, width=width), prefix_reads + cand_len.sum(1))


def test_right_align_to_a_narrower_width():
    tokens, length = _rows([3, 5], 8, 3)
    full, full_mask = right_align(tokens, length)
    narrow, narrow_mask = right_align(tokens, length, width=5)
    np.testing.assert_array_equal(narrow, full[:, 3:])
    np.testing.assert_array_equal(narrow_mask, full_mask[:, 3:])


@pytest.mark.parametrize("shared", [False, True])
def test_node_values_equal_a_full_width_prm_pass(models, shared):
    """Root and child scores and values (bucketed prefix width; read from the policy's prefill when the value
    model shares its backbone) equal the value model applied to the whole partial solution at the search's full
    width, and each candidate's value that of the partial solution followed by it. Without the best child's visit
    and roll-forward, a node backs up its own value: the prompt's at the root, its score below."""
    policy, shared_prm, own_prm = models
    prm = shared_prm if shared else own_prm
    space = ActionSpace.single_step(3)
    width = 128
    spec = ExpansionSpec(max_len=width, prompt_width=64, sampling=SAMPLING, max_depth=4, pad_id=0,
                         eos_ids=(TOKENIZER.eos_token_id,), verifier_shares_backbone=shared, visit_best_child=False)
    tables = build_step_tables(TOKENIZER, space, "\n", "The answer is", CONFIG.vocab_size)
    policy_def, policy_state = nnx.split(policy)
    verifier_def, verifier_state = nnx.split(ValueVerifier(prm))
    search = StepSearch(policy_def, verifier_def, space, spec, tables)
    assert search._widths() == (32, 64, 96)  # of the steps after the prompt (4 steps x 24 tokens at most)
    params = (policy_state, verifier_state)
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
    np.testing.assert_array_equal(root.embedding.score, 0.0)  # "last" starts from 0 before any step
    for depth, (node, value) in enumerate(zip(nodes, values)):
        full = _full_pass(prm, node.tokens, node.length)
        np.testing.assert_allclose(value, full, atol=1e-5)
        if depth:
            np.testing.assert_allclose(node.score, full, atol=1e-5)
        assert (np.asarray(node.rolled_slot) == NO_SLOT).all() and (np.asarray(node.rolled_value) == 0).all()
        if depth < 3:  # the candidates of the last node are not checked: some rows are terminal there
            for k in range(3):
                extended = jax.vmap(lambda row, n, c, m: jnp.where(
                    (jnp.arange(width) >= n) & (jnp.arange(width) < n + m),
                    c[jnp.clip(jnp.arange(width) - n, 0, c.shape[0] - 1)], row))(
                    node.tokens, node.length, node.candidates[:, k], node.candidate_len[:, k])
                want = _full_pass(prm, extended, jnp.minimum(node.length + node.candidate_len[:, k], width))
                np.testing.assert_allclose(node.candidate_values[:, k], want, atol=1e-5, err_msg=f"slot {k}")
        reads = np.where(node.terminal, 0, node.length + node.candidate_len.sum(1))
        np.testing.assert_array_equal(node.verifier_tokens, 0 if shared else reads)


@pytest.mark.parametrize("shared", [False, True])
def test_roll_forward_value_and_budget(models, shared):
    """The roll-forward starts at a new node's best candidate (by value). r = 0 without the best child's visit:
    the node backs up its own score. r = 1: it backs up (1 - alpha) V + alpha * (the best value one fresh step
    further), V its best candidate's value, and samples up to K more steps for it, unless that candidate ended the
    solution (then V, nothing more sampled); with the visit (`visit_best_child`) the node records that child and
    its rolled value. r = 2 without the visit (a running-mean search with the roll on): the same first step and up
    to K more, and no child recorded. A terminal node keeps its score and samples nothing."""
    policy, shared_prm, own_prm = models
    prm = shared_prm if shared else own_prm
    space = ActionSpace.single_step(3)
    tables = build_step_tables(TOKENIZER, space, "\n", "The answer is", CONFIG.vocab_size)
    policy_def, policy_state = nnx.split(policy)
    verifier_def, verifier_state = nnx.split(ValueVerifier(prm))
    params = (policy_state, verifier_state)
    tokens, length = _rows([9, 20, 14, 30], 96, 5)
    step = 16

    def child(rollout_steps, visit_best_child=False):
        spec = ExpansionSpec(max_len=96, sampling=dataclasses.replace(SAMPLING, max_new_tokens=step), max_depth=6,
                             pad_id=0, eos_ids=(TOKENIZER.eos_token_id,), verifier_shares_backbone=shared,
                             rollout_steps=rollout_steps, rollout_alpha=0.25, visit_best_child=visit_best_child)
        search = StepSearch(policy_def, verifier_def, space, spec, tables)
        prompts = search.encode_prompts(params, tokens, length)
        root = search.root_fn(params, jax.random.key(0), prompts)
        return search.recurrent_fn(params, jax.random.key(1), jnp.asarray([0, 2, 1, 0]), root.embedding, prompts)

    plain_out, plain = child(0)
    rolled_out, rolled = child(1, visit_best_child=True)
    open_ = ~np.asarray(plain.terminal)
    assert open_.any() and not open_.all(), open_  # both cases are checked
    np.testing.assert_allclose(plain_out.value, plain.score, atol=1e-6)
    values = np.where(is_valid_action(np.asarray(plain_out.prior_logits)), np.asarray(plain.candidate_values),
                      -np.inf)
    best = values.argmax(axis=1)
    best_value = values.max(axis=1)
    best_ends = np.asarray(plain.candidate_ends)[np.arange(4), best]
    goes_on = open_ & ~best_ends
    assert goes_on.any()
    # The same node either way: the roll changes only its value and budget.
    np.testing.assert_array_equal(rolled.candidates, plain.candidates)
    np.testing.assert_allclose(rolled.candidate_values, plain.candidate_values, atol=1e-6)
    value = np.asarray(rolled_out.value)
    np.testing.assert_allclose(value[~open_], np.asarray(plain.score)[~open_], atol=1e-6)
    np.testing.assert_allclose(value[open_ & best_ends], best_value[open_ & best_ends], atol=1e-6)
    # (1 - alpha) V + alpha * m with m a verifier value in [0, 1]
    m = (value[goes_on] - 0.75 * best_value[goes_on]) / 0.25
    assert np.all((m >= -1e-5) & (m <= 1 + 1e-5))
    extra = np.asarray(rolled.generated_tokens - plain.generated_tokens)
    assert np.all(extra[goes_on] > 0) and np.all(extra[goes_on] <= 3 * step) and np.all(extra[~goes_on] == 0)
    assert np.all(np.asarray(rolled.verifier_tokens - plain.verifier_tokens)[~goes_on] == 0)
    if not shared:  # the roll's verifier reads: the rolled partial solution and its K fresh candidates
        assert np.all(np.asarray(rolled.verifier_tokens - plain.verifier_tokens)[goes_on] > extra[goes_on])

    np.testing.assert_array_equal(rolled.rolled_slot, np.where(open_, best, NO_SLOT))
    np.testing.assert_allclose(rolled.rolled_value, np.where(open_, value, 0.0), atol=1e-6)

    two_out, two = child(2)
    extra_two = np.asarray(two.generated_tokens - plain.generated_tokens)
    assert np.all(extra_two >= extra) and np.all(extra_two - extra <= 3 * step)
    assert (np.asarray(two.rolled_slot) == NO_SLOT).all()
    stays = ~goes_on  # terminal, or the best candidate ended the solution: nothing to roll
    np.testing.assert_allclose(np.asarray(two_out.value)[stays], value[stays], atol=1e-6)


@pytest.mark.parametrize("sizes", [(1.0, 0.75, 0.5), (1.0, 0.375)])
def test_expanding_some_rows_gathers_them_and_changes_no_result(models, sizes):
    """With 3 of 8 rows to expand, the expansion runs on a smaller batch (the smallest of 8, 6, 4 rows that
    holds them, or of 8 and 3) and gives those rows what expanding all 8 gives them (the same samples; the
    scores up to float rounding, as another batch size sums in another order); the others get no candidates."""
    assert batch_sizes(8, sizes) == ((8, 6, 4) if len(sizes) == 3 else (8, 3))
    policy, prm, _ = models
    space = ActionSpace.single_step(2)
    spec = ExpansionSpec(max_len=96, prompt_width=32, sampling=dataclasses.replace(SAMPLING, max_new_tokens=12),
                         max_depth=4, pad_id=0, eos_ids=(TOKENIZER.eos_token_id,), verifier_shares_backbone=True,
                         expansion_sizes=sizes)
    tables = build_step_tables(TOKENIZER, space, "\n", "The answer is", CONFIG.vocab_size)
    policy_def, policy_state = nnx.split(policy)
    verifier_def, verifier_state = nnx.split(ValueVerifier(prm))
    search = StepSearch(policy_def, verifier_def, space, spec, tables)
    params = (policy_state, verifier_state)
    tokens, length = _rows([9, 20, 14, 30, 5, 12, 25, 7], 96, 6)
    prompt_len = jnp.minimum(length, 8)
    some = jnp.asarray([False, True, False, False, True, False, True, False])

    @jax.jit
    def expand(rows):
        prompts = search.encode_prompts(params, tokens, prompt_len)
        return search._expand(search._models(params), jax.random.key(7), prompts, tokens, length, rows)

    everything, gathered = expand(jnp.ones(8, bool)), expand(some)
    picked = np.asarray(some)
    for name in ("candidates", "candidate_len", "prior_logits", "candidate_ends", "generated_tokens", "step_scores",
                 "verifier_tokens"):
        full, part = np.asarray(getattr(everything, name)), np.asarray(getattr(gathered, name))
        np.testing.assert_allclose(part[picked], full[picked], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.asarray(gathered.candidate_len)[~picked], 0)
    np.testing.assert_array_equal(np.asarray(gathered.generated_tokens)[~picked], 0)
    assert np.all(np.asarray(gathered.prior_logits)[~picked] <= INVALID_LOGIT)
    assert np.asarray(gathered.generated_tokens)[picked].min() > 0
