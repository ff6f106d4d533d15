"""A shortened self-play run end to end on a tiny scratch model: the rounds, the gold-reward baseline, the verifier
comparison, the run folder; a finished run resumed trains nothing again; config errors."""

import json

import numpy as np
import pytest

from jaxreason.algorithms.registry import load_algorithm_config
from jaxreason.algorithms.selfplay_report import selfplay_seed_summary
from jaxreason.cli import main
from jaxreason.data.trace_store import TraceStore
from jaxreason.models import load_pretrained

CONFIG = "configs/selfplay/arith_tiny.yaml"
FIT = "{num_steps: 3, batch_size: 8, max_len: %d, optimizer: {learning_rate: 0.001, warmup_steps: 1}}"
SHORT = [
    "policy.scratch.hidden_size=32", "policy.scratch.intermediate_size=64", "policy.scratch.num_layers=2",
    "policy.scratch.head_dim=8",
    "problems.task.options={min_ops: 1, max_ops: 1, max_operand: 12, max_factor: 2, ops: '+', check_steps: true}",
    "problems.gold=48", "problems.verifier=4", "problems.train=8", "problems.test=4",
    "sft.num_steps=60", "sft.batch_size=8", "sft.max_len=64", "sft.optimizer.learning_rate=0.01",
    "rounds=2", "steps_per_round=2", "prompts_per_step=2", "group_size=4", "sampling.max_new_tokens=24",
    "genrm.samples_per_problem=2", "genrm.sampling.max_new_tokens=24", f"genrm.train={FIT % 80}",
    f"reward_model={FIT % 64}", "evaluation.sampling.max_new_tokens=24", "checkpoint_every=1",
    "comparison.problems=2", "comparison.num_samples=4", "comparison.sampling.max_new_tokens=24",
    "comparison.cot_sampling.max_new_tokens=16", f"comparison.train={FIT % 112}",
    "verifier_lora={rank: 4, alpha: 8}",  # every verifier trains adapters (the two-process test trains them whole)
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("selfplay") / "run"
    main(["train", "--config", CONFIG, *SHORT, f"run_dir={run_dir}"])
    return run_dir


def test_run_writes_rounds_comparison_report_and_models(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["selfplay"] == rounds[0]["grpo_gold"]  # both start at policy_0 with the same evaluation
    assert rounds[0]["selfplay_tokens"] == 0 < rounds[1]["selfplay_tokens"] < rounds[2]["selfplay_tokens"]
    for r in rounds[1:]:
        assert 0 <= r["selfplay_reward"] <= 1 and 0 <= r["grpo_gold_gold_accuracy"] <= 1
        assert r["grpo_gold_reward"] == r["grpo_gold_gold_accuracy"]  # its reward is the gold check
    comparison = metrics["comparison"]
    assert comparison["k"] == [1, 2, 3, 4]
    names = {"genrm", "genrm_cot", "orm", "reward_model", "dpo", "judge", "majority", "pass"}
    assert set(comparison["curves"]) == names
    for curve in comparison["curves"].values():
        assert all(0 <= x <= 1 for x in curve)
    assert np.all(np.diff(comparison["curves"]["pass"]) >= 0)
    training = metrics["training"]
    assert {"sft", "genrm_0", "genrm_2", "reward_model_0", "reward_model_2", "genrm_cot", "orm", "dpo"} <= set(training)
    report = (finished / "report.md").read_text()
    assert "GRPO (gold reward)" in report and "GenRM-CoT" in report and "Bradley-Terry RM" in report
    assert (finished / "selfplay.png").stat().st_size > 0
    for name in ("generator", "genrm", "grpo_gold", "genrm_cot", "dpo_verifier"):
        assert load_pretrained(str(finished / "models" / name))[0].config.hidden_size == 32
    assert (finished / "models" / "reward_model").exists() and (finished / "models" / "orm").exists()


def test_store_holds_d0_and_every_rl_step_labelled(finished):
    store = TraceStore(finished / "traces")
    try:
        assert len(store.select(iteration=0)) == 4 * 2  # verifier problems x samples
        for step in range(1, 5):
            assert len(store.select(iteration=step)) == 2 * 4  # prompts x group
        assert not len(store.select(iteration=5))
    finally:
        store.close()


def test_resume_of_a_finished_run_trains_nothing_again(finished, capsys):
    before = (finished / "stages.json").read_text()
    history = (finished / "selfplay" / "history.json").read_text()
    main(["train", "--config", CONFIG, *SHORT, f"run_dir={finished}", "--resume"])
    assert (finished / "stages.json").read_text() == before
    assert (finished / "selfplay" / "history.json").read_text() == history
    assert "selfplay: held-out greedy" in capsys.readouterr().out
    assert "Best-of-4 GenRM (direct)" in selfplay_seed_summary([str(finished)])


@pytest.mark.parametrize("override, message", [
    ("reward=gold", "reward must be one of"),
    ("comparison.verifiers=[genrm, oracle]", "unknown"),
    ("comparison.problems=999", "exceeds problems.test"),
    ("group_size=1", "group_size must be >= 2"),
])
def test_bad_config_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_algorithm_config(CONFIG, [override])


@pytest.mark.parametrize("name", ["arith_tiny.yaml", "smollm2_arith.yaml", "gsm8k.yaml"])
def test_shipped_configs_load(name):
    algorithm, config = load_algorithm_config(f"configs/selfplay/{name}", [])
    assert algorithm.name == "selfplay" and config.rounds >= 2 and config.reward == "genrm"
