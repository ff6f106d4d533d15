"""Search and sampling with the weights sharded over the mesh (fsdp, tensor) give what the replicated run gives,
and the weights they read really are sharded and in the compute dtype; the host-side loops (continuations, batch
scoring, the discriminator) split their rows over a mesh and give what they give without one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import nnx
from jax.sharding import PartitionSpec
from test_mcts_lm import PROBLEMS, SEARCH, _assert_same_searches, mcts
from tiny import CONFIG, PAD, TOKENIZER

from jaxreason.models import CausalLM
from jaxreason.sampling import SamplingConfig, encode_prompts, generate
from jaxreason.sampling.continuations import sample_continuations
from jaxreason.sampling.generate import _generate_jit
from jaxreason.sampling.placement import inference_state
from jaxreason.search.mcts import search_params
from jaxreason.sharding import MeshConfig, make_mesh
from jaxreason.tasks import get_task
from jaxreason.verifiers import ValueVerifier
from jaxreason.verifiers.batch import score_solutions
from jaxreason.verifiers.discriminator import Candidate, DiscriminatorConfig, check_consistency
from jaxreason.verifiers.positions import StepSplitter

FSDP = MeshConfig(data=2, fsdp=4, tensor=1)
FSDP_TENSOR = MeshConfig(data=2, fsdp=2, tensor=2)
SAMPLED = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def models():
    """The policy and a PRM of its own with a random head (as in test_mcts_lm, so the programs are shared)."""
    prm = tiny.value_model(1)
    prm.head[...] = jax.random.normal(jax.random.key(2), prm.head[...].shape)
    return tiny.policy(0), ValueVerifier(prm)


def _per_device_bytes(state) -> int:
    """The bytes of `state`'s arrays held on the first device."""
    device = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards if s.device == device)


@pytest.mark.parametrize("mesh_config", [FSDP, FSDP_TENSOR], ids=["fsdp4", "fsdp2_tensor2"])
def test_search_params_are_sharded_by_the_rules(models, mesh_config):
    """Matrices split over fsdp (and heads, MLP and vocabulary over tensor); a data-only mesh replicates."""
    policy, verifier = models
    mesh = make_mesh(mesh_config)
    _, (policy_state, verifier_state) = search_params(policy, verifier, mesh)
    q = policy_state["transformer"]["layers"]["attention"]["q"].get_value()
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    gate = verifier_state["model"]["transformer"]["layers"]["mlp"]["gate"].get_value()
    assert gate.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    _, replicated = search_params(policy, verifier, make_mesh(MeshConfig(data=-1)))
    whole = _per_device_bytes(replicated)
    assert whole == _per_device_bytes(nnx.state(policy)) + _per_device_bytes(nnx.state(verifier))
    # Only vectors (norm scales, the value head) stay whole: each device holds little more than its share.
    assert _per_device_bytes((policy_state, verifier_state)) < whole / (mesh_config.fsdp * mesh_config.tensor) * 1.2


@pytest.mark.parametrize("mesh_config", [FSDP, FSDP_TENSOR], ids=["fsdp4", "fsdp2_tensor2"])
def test_search_with_sharded_weights_gives_the_same_trees(models, mesh_config):
    """ReST-MCTS* over the mesh, weights sharded, equals the replicated data-only search and the one-device one."""
    policy, verifier = models
    one = mcts(policy, verifier, PROBLEMS, SEARCH, jax.random.key(5))
    replicated = mcts(policy, verifier, PROBLEMS, SEARCH, jax.random.key(5), mesh=make_mesh(MeshConfig(data=-1)))
    sharded = mcts(policy, verifier, PROBLEMS, SEARCH, jax.random.key(5), mesh=make_mesh(mesh_config))
    _assert_same_searches(one, replicated)
    _assert_same_searches(one, sharded)


def _generate(model, mesh=None):
    tokens, mask = encode_prompts(TOKENIZER, ["What is 5 + 6?", "12 + 7 =", "x", "Q: 3 * 4?\nA:"] * 2)
    return generate(model, tokens, mask, jax.random.key(3), SAMPLED, pad_id=PAD, samples_per_prompt=2, mesh=mesh)


@pytest.mark.parametrize("mesh_config", [FSDP, FSDP_TENSOR], ids=["fsdp4", "fsdp2_tensor2"])
def test_sampling_with_sharded_weights_gives_the_same_tokens(mesh_config):
    """8 prompts x 2 samples, rows split over data x fsdp: the same tokens, lengths and log-probs."""
    policy = tiny.policy(0)
    one = _generate(policy)
    sharded = _generate(policy, make_mesh(mesh_config))
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(sharded.lengths), np.asarray(one.lengths))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(one.logprobs), atol=1e-5)


def test_bfloat16_weights_are_held_in_bfloat16_except_the_float32_vectors():
    """A bf16 model's matrices are cast once (what every matmul casts them to anyway); its norm scales, read in
    float32, are not, so the samples are the model's own."""
    policy = CausalLM(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    _, state = inference_state(policy, make_mesh(FSDP))
    dtypes = {"/".join(map(str, path)): v.get_value().dtype for path, v in nnx.to_flat_state(state)}
    assert dtypes["transformer/layers/mlp/up"] == dtypes["transformer/embed"] == jnp.bfloat16
    assert dtypes["transformer/norm/scale"] == dtypes["transformer/layers/attention_norm/scale"] == jnp.float32
    tokens, mask = encode_prompts(TOKENIZER, ["12 + 7 =", "x"])
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    cast = generate(policy, tokens, mask, jax.random.key(0), greedy, pad_id=PAD)
    graphdef, master = nnx.split(policy)  # the float32 weights, as they were read before
    uncast = _generate_jit(graphdef, master, jnp.asarray(tokens), jnp.asarray(mask),
                           jax.random.split(jax.random.key(0), 2), None, config=greedy, eos_ids=(), pad_id=PAD,
                           samples_per_prompt=1)
    np.testing.assert_array_equal(np.asarray(cast.tokens), np.asarray(uncast.tokens))


# ---- the host-side loops over a mesh: sample_continuations, score_solutions, the discriminator -----------------

PREFIXES = [[1, 5, 9], [1, 7], [1, 5, 9, 11, 13], [1], [1, 8, 8]]  # 5 rows: chunks of 3 round up to the 8 devices


@pytest.mark.parametrize("mesh_config", [FSDP, MeshConfig(data=-1)], ids=["fsdp4", "data8"])
def test_continuations_over_a_mesh_are_the_same_tokens(mesh_config):
    policy = tiny.policy(0)
    one = sample_continuations(policy, PREFIXES, jax.random.key(4), SAMPLED, eos_ids=(2,), pad_id=PAD, chunk_rows=3)
    split = sample_continuations(policy, PREFIXES, jax.random.key(4), SAMPLED, eos_ids=(2,), pad_id=PAD,
                                 chunk_rows=3, mesh=make_mesh(mesh_config))
    assert len(split) == len(one) == len(PREFIXES)
    for a, b in zip(one, split):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mesh_config", [FSDP, MeshConfig(data=-1)], ids=["fsdp4", "data8"])
def test_scores_over_a_mesh_are_the_same(models, mesh_config):
    _, verifier = models
    prompts, solutions = [p[:2] for p in PREFIXES], [[3, 4, 10, 5, 6, 2], [7, 10, 7], [9], [4, 4, 10, 4], [2]]
    splitter = StepSplitter(TOKENIZER, "\n")
    one = score_solutions(verifier, prompts, solutions, splitter, pad_id=PAD, chunk_rows=3)
    split = score_solutions(verifier, prompts, solutions, splitter, pad_id=PAD, chunk_rows=3,
                            mesh=make_mesh(mesh_config))
    np.testing.assert_allclose(split.scores, one.scores, atol=1e-5)
    np.testing.assert_allclose(split.prompt_scores, one.prompt_scores, atol=1e-5)
    for a, b in zip(one.step_scores, split.step_scores):
        np.testing.assert_allclose(b, a, atol=1e-5)
    np.testing.assert_array_equal(split.verifier_tokens, one.verifier_tokens)


def test_discriminator_over_a_mesh_gives_the_same_completions():
    task = get_task("arith", max_ops=2)
    problems = task.problems("train", n=2, seed=1)
    candidates = [Candidate(task.prompt(p), task.format_solution(p.solution_steps, p.answer), str(p.answer))
                  for p in problems]
    config = DiscriminatorConfig(sampling=SamplingConfig(max_new_tokens=16, temperature=1.0), batch_size=3)
    kwargs = dict(model=tiny.policy(0), tokenizer=TOKENIZER, task=task, config=config, key=jax.random.key(6))
    one = check_consistency(candidates, **kwargs)
    split = check_consistency(candidates, **kwargs, mesh=make_mesh(FSDP))
    assert split.completions == one.completions and split.agreeing == one.agreeing
    assert split.tokens == one.tokens and sum(map(len, one.completions)) == 8
