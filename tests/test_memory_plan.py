"""`python -m jaxreason plan`: bytes per device against hand counts, on 1 and 8 (fake) devices."""

import pytest

from jaxreason.cli import main
from jaxreason.memory_plan import GIB, load_plan_config, plan_config
from jaxreason.models.char_tokenizer import build_char_tokenizer

VOCAB = len(build_char_tokenizer())
# A scratch ReST-MCTS* run: E 32, M 64, 2 layers, 4 heads of 8 over 2 key/value heads, tied embeddings.
CONFIG = """\
algorithm: rest_mcts
policy:
  scratch: {hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 8}
policy_train: {batch_size: 16, max_len: 64}
prm_train: {batch_size: 16, max_len: 64}
search: {num_candidates: 3, max_depth: 4, batch_size: 16, sampling: {max_new_tokens: 16}}
mesh: {data: -1, fsdp: 1, tensor: 1}
"""
LAYER_MATRICES = 32 * 4 * 8 * 2 + 32 * 2 * 8 * 2 + 3 * 32 * 64  # q, o; k, v; gate, up, down: all have `embed`
NORMS = 2 * 2 * 32 + 32  # two per layer and the final one: replicated
EMBED = VOCAB * 32


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG)
    return path


def _policy(config_file, devices, *overrides):
    return plan_config(load_plan_config(config_file, overrides), devices).models[0]


def test_parameters_by_hand_on_one_and_eight_devices(config_file):
    whole = 4 * (2 * LAYER_MATRICES + NORMS + EMBED)
    assert _policy(config_file, 1).params == whole
    assert _policy(config_file, 8).params == whole  # data=8: every device holds all of them
    # fsdp=8 splits every `embed` dimension (the embedding table's too), not the norms
    assert _policy(config_file, 8, "mesh.data=1", "mesh.fsdp=-1").params == 4 * (
        2 * LAYER_MATRICES // 8 + NORMS + EMBED // 8)


def test_adamw_state_is_two_float32_copies_and_the_step_counts(config_file):
    for devices, overrides in ((1, ()), (8, ("mesh.data=1", "mesh.fsdp=8"))):
        m = _policy(config_file, devices, *overrides)
        assert m.gradients == m.params
        assert m.optimizer == 2 * m.params + 2 * 4  # mu, nu; Adam's and the schedule's int32 counts


def test_rows_activations_and_caches(config_file):
    plan = plan_config(load_plan_config(config_file), 8)
    policy, prm = plan.models
    assert (policy.kind, prm.kind) == ("CausalLM", "ValueModel")
    assert (policy.rows, plan.search_rows) == (2, 2)  # 16 rows over data=8
    assert prm.params == policy.params + 4 * (32 + 1)  # tied embeddings: no LM head to drop; a head and bias
    assert 0 < policy.activations_other < policy.activations  # remat off in the config; on saves less
    # PRM: a prefix cache of P + W + S = 256 + 4 x 16 + 16 slots for each row and its 3 candidates' copies
    rows, slots = 2 * (1 + 3), 256 + 64 + 16
    assert prm.kv_cache == 2 * 2 * rows * 2 * slots * 8 * 4 + rows * slots + 4  # k, v [L B K S D]; mask; index


def test_command_prints_the_tables(config_file, capsys):
    main(["plan", "--config", str(config_file), "--devices", "8", "mesh.data=1", "mesh.fsdp=8"])
    out = capsys.readouterr().out
    assert "8 device(s), mesh data=1 fsdp=8 tensor=1" in out
    assert "policy (CausalLM" in out and "prm (ValueModel" in out
    assert "fits in 80 GiB per device" in out
    assert f"{_policy(config_file, 8, 'mesh.data=1', 'mesh.fsdp=8').params / GIB:.2f}" in out


def test_configs_without_a_model_or_mesh_are_one_line_errors(tmp_path, capsys):
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text("algorithm: rest_mcts\nmesh: {data: -1}\n")
    search = tmp_path / "search.yaml"
    search.write_text("policy: {scratch: {}}\n")
    for path, message in ((no_model, "policy"), (search, "missing key 'algorithm'")):
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "--config", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxreason plan: error:") and message in err and len(err.splitlines()) == 1

    fsdp4 = tmp_path / "fsdp4.yaml"
    fsdp4.write_text(CONFIG.replace("fsdp: 1", "fsdp: 4"))
    with pytest.raises(ValueError, match="10 devices are not divisible by 4"):
        plan_config(load_plan_config(fsdp4), 10)
