"""Training and scoring read a score at the same position: a PRM fitted to known step targets gives the same
numbers back through every scoring path (value-target batches, batch scoring with each aggregation, the last
token of left-padded rows as beam search and the search's root read it, K candidates on a cached prefix as the
search's node values, the sampler's last hidden state on a shared backbone, and the nodes of a real search), for
a value head alone and for one that also reads its LM's likelihood."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreason.data.batching import shuffled_batches
from jaxreason.data.trace_batches import value_batch
from jaxreason.data.trace_store import Trace, pad_traces
from jaxreason.models import CausalLM, ModelConfig, ValueModel
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.sampling import SamplingConfig, generate, pad_left
from jaxreason.search import MCTSConfig, search_trees
from jaxreason.sharding import make_mesh
from jaxreason.tasks import get_task
from jaxreason.train.fit import FitConfig, fit
from jaxreason.train.objectives import value_objective
from jaxreason.train.optimizer import OptimizerConfig
from jaxreason.verifiers import StepSplitter, ValueVerifier, Verifier, score_solutions

TOKENIZER = build_char_tokenizer()
EOS, PAD = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id
CONFIG = ModelConfig(vocab_size=len(TOKENIZER), hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=12, eos_token_id=EOS, pad_token_id=PAD)
SPLIT = StepSplitter(TOKENIZER, "\n")
SOLUTIONS = [  # prompt, solution as generated (EOS where it ended)
    ("Q: What is 2 + 3?\n", "2 + 3 = 5\nThe answer is 5", True),
    ("Q: What is 2 + 3?\n", "2 + 3 = 6\nThe answer is 6", True),
    ("Q: What is 4 * 2 + 1?\n", "4 * 2 = 8\n8 + 1 = 9\nThe answer is 9", True),
    ("Q: What is 4 * 2 + 1?\n", "4 * 2 = 6\n6 + 1 = 7\nThe answer is 7", True),
    ("Q: What is 7 - 3?\n", "7 - 3 = 4\nThe answer is 4", False),  # cut before its EOS
    ("Q: What is 9 - 5 - 1?\n", "9 - 5 = 4\n4 - 1 = 3\nThe answer is 3", True),
]


def _ids(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module", params=[False, True], ids=["head", "head_and_likelihood"])
def fitted(tmp_path_factory, request):
    """A PRM fitted to random step targets, and the traces (with their targets) it was fitted to; the PRM reads
    its LM's likelihood too in the second parameter."""
    rng = np.random.default_rng(0)
    traces = []
    for i, (prompt, solution, ends_on_eos) in enumerate(SOLUTIONS):
        p, s = _ids(prompt), _ids(solution) + ([EOS] if ends_on_eos else [])
        ends = SPLIT(s) + len(p)
        traces.append(Trace(problem_id=i, iteration=0, tokens=np.asarray(p + s, np.int32), prompt_len=len(p),
                            step_ends=ends, step_values=rng.uniform(0.1, 0.9, len(ends)).astype(np.float32),
                            reward=0.0, flags=0))
    model = ValueModel(CONFIG, likelihood=request.param, rngs=nnx.Rngs(0))
    config = FitConfig(num_steps=300, batch_size=len(traces), max_len=64,
                       optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=10, weight_decay=0.0))
    batches = shuffled_batches(lambda idx: value_batch([traces[i] for i in idx], 64, PAD), len(traces),
                               len(traces), 0)
    fit(model, value_objective("mse"), batches, config, mesh=make_mesh(devices=jax.devices()[:1]),
        directory=tmp_path_factory.mktemp("prm"), seed=0, description="prm")
    return model, traces


def _trained_positions(model, traces) -> list[np.ndarray]:
    """Each trace's values where its targets were trained (the value-target batch's mask)."""
    batch = pad_traces(traces, 64, PAD)
    start = jnp.asarray([t.prompt_len for t in traces])
    values = np.asarray(model.values(jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]), start))
    return [values[b, batch["value_mask"][b] == 1] for b in range(len(traces))]


def test_the_fit_reaches_its_targets(fitted):
    model, traces = fitted
    for got, trace in zip(_trained_positions(model, traces), traces):
        np.testing.assert_allclose(got, trace.step_values, atol=0.05)
    # a generated EOS ends the last step, and the last target sits on it
    assert traces[0].step_ends[-1] == len(traces[0].tokens) and traces[0].tokens[-1] == EOS
    assert traces[4].tokens[-1] != EOS


def test_batch_scoring_reads_the_trained_positions(fitted):
    model, traces = fitted
    trained = _trained_positions(model, traces)
    prompts = [t.tokens[:t.prompt_len] for t in traces]
    solutions = [t.tokens[t.prompt_len:] for t in traces]
    for how, reduce in (("last", lambda v: v[-1]), ("min", np.min), ("product", np.prod)):
        scored = score_solutions(ValueVerifier(model, aggregation=how), prompts, solutions, SPLIT, pad_id=PAD)
        for got, want in zip(scored.step_scores, trained):
            np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(scored.scores, [reduce(v) for v in trained], atol=1e-5)
        np.testing.assert_array_equal(scored.verifier_tokens, [len(t.tokens) for t in traces])


def test_left_padded_last_token_reads_the_solution_score(fitted):
    """Beam search scores beam + step, and the search its root, at the last token of left-padded rows."""
    model, traces = fitted
    tokens, mask = pad_left([t.tokens.tolist() for t in traces], PAD)
    last = jnp.full((len(traces), 1), tokens.shape[1] - 1)
    start = jnp.asarray([tokens.shape[1] - len(t.tokens) + t.prompt_len for t in traces])
    got = ValueVerifier(model).values_at(jnp.asarray(tokens), jnp.asarray(mask), last, start)[:, 0]
    np.testing.assert_allclose(got, [v[-1] for v in _trained_positions(model, traces)], atol=1e-5)


@pytest.mark.parametrize("implementation", ["cached", "full"])
def test_candidates_on_a_prefix_read_their_last_step(fitted, implementation):
    """The search's node values: each trace's last step as a candidate appended to the rest (left-aligned)."""
    model, traces = fitted
    verifier = ValueVerifier(model)
    b, width, s = len(traces), 64, 32
    tokens = np.full((b, width), PAD, np.int32)
    cand = np.full((b, 2, s), PAD, np.int32)
    length, cand_len = np.zeros(b, np.int32), np.zeros((b, 2), np.int32)
    for i, t in enumerate(traces):
        cut = t.step_ends[-2] if len(t.step_ends) > 1 else t.prompt_len
        tokens[i, :cut] = t.tokens[:cut]
        length[i] = cut
        last = t.tokens[cut:]
        cand[i, 0, :len(last)] = last
        cand_len[i] = len(last), 0  # slot 1: no candidate, the partial solution's own value
    args = jnp.asarray(tokens), jnp.asarray(length), jnp.asarray(cand), jnp.asarray(cand_len)
    options = dict(prompt_len=jnp.asarray([t.prompt_len for t in traces]))
    got = (verifier.extend_scores(*args, **options) if implementation == "cached"
           else Verifier.extend_scores(verifier, *args, **options))
    trained = _trained_positions(model, traces)
    np.testing.assert_allclose(got[:, 0], [v[-1] for v in trained], atol=1e-5)
    own = [v[-2] if len(v) > 1 else None for v in trained]
    np.testing.assert_allclose([g for g, o in zip(got[:, 1], own) if o is not None], [o for o in own if o is not None],
                               atol=1e-5)


def test_shared_backbone_reads_the_samplers_last_token():
    """A value head on the policy's backbone reads the sampler's last hidden state: the position of the last
    generated token (its EOS when drawn), the same as scoring the whole row."""
    policy = CausalLM(CONFIG, rngs=nnx.Rngs(3))
    state = nnx.state(policy, nnx.Param)
    nnx.update(policy, jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, state))  # peaked, EOS now and then
    shared = ValueModel(CONFIG, backbone=policy.transformer, rngs=nnx.Rngs(4))
    shared.head[...] = jax.random.normal(jax.random.key(5), shared.head.shape)
    verifier = ValueVerifier(shared)
    prompts = [_ids(p) for p, _, _ in SOLUTIONS]
    tokens, mask = pad_left(prompts, PAD)
    out = generate(policy, tokens, mask, jax.random.key(6), SamplingConfig(max_new_tokens=12, temperature=1.0),
                   eos_ids=(EOS,), pad_id=PAD)
    new, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    scored = score_solutions(verifier, prompts, [new[i, :lengths[i]] for i in range(len(prompts))], SPLIT,
                             pad_id=PAD)
    np.testing.assert_allclose(verifier.from_hidden(out.last_hidden), [v[-1] for v in scored.step_scores],
                               atol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
def test_search_node_scores_equal_batch_scores(fitted, shared):
    """Every node of a real search, and every finished candidate no simulation took, has the score that batch
    scoring gives its path: the search scored each candidate where a trained PRM is read."""
    model, _ = fitted
    policy = CausalLM(CONFIG, rngs=nnx.Rngs(7))
    if shared:
        model = ValueModel(CONFIG, backbone=policy.transformer, rngs=nnx.Rngs(8))
        model.head[...] = jax.random.normal(jax.random.key(9), model.head.shape)
    task = get_task("arith", max_ops=2)
    config = MCTSConfig(num_simulations=6, num_candidates=3, max_depth=3,
                        sampling=SamplingConfig(max_new_tokens=12, temperature=1.0))
    _, trees = search_trees(task.problems("test", n=2, seed=0), policy=policy, verifier=ValueVerifier(model),
                            tokenizer=TOKENIZER, task=task, config=config, key=jax.random.key(10))
    paths = [p for tree in trees for p in (*tree.paths[1:], *tree.sampled_solutions)]
    assert len(paths) > 4
    scored = score_solutions(ValueVerifier(model), [p.tokens[:p.prompt_len] for p in paths],
                             [p.tokens[p.prompt_len:] for p in paths], SPLIT, pad_id=PAD)
    np.testing.assert_allclose([s[-1] for s in scored.step_scores], [p.scores[-1] for p in paths], atol=1e-4)
    # Steps cut by the token cap end off the delimiter; where every step ends on it, the cuts agree too.
    newline = _ids("\n")[0]
    whole = [i for i, p in enumerate(paths) if all(p.tokens[e - 1] == newline for e in p.step_ends[:-1])]
    assert whole
    for i in whole:
        np.testing.assert_array_equal(SPLIT(paths[i].tokens[paths[i].prompt_len:]) + paths[i].prompt_len,
                                      paths[i].step_ends)
