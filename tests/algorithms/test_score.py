"""A shortened SCoRe run end to end on a tiny scratch model beside its baselines, an interrupted run resumed
exactly, the report command and the errors."""

import json
import os
import signal

import pytest

from jaxreason.algorithms import score
from jaxreason.algorithms.registry import RunInterrupted, load_algorithm_config
from jaxreason.algorithms.score import run_score
from jaxreason.cli import main
from jaxreason.models import load_pretrained

CONFIG = "configs/score/arith_tiny.yaml"
SHORT = [
    "policy.scratch.hidden_size=32", "policy.scratch.intermediate_size=64", "policy.scratch.num_layers=2",
    "policy.scratch.head_dim=8",
    "problems.task.options={min_ops: 1, max_ops: 1, max_operand: 8, max_factor: 2, ops: '+', check_steps: true}",
    "problems.gold=40", "problems.train=16", "problems.test=4", "instruction=Fix it.",
    "sft.num_steps=300", "sft.batch_size=8", "sft.max_len=64", "sft.optimizer.learning_rate=0.005",
    "format_sft.num_steps=20", "format_sft.batch_size=8", "format_sft.max_len=96",
    "schedule=[{stage: 1, steps: 2}, {stage: 2, steps: 2}]", "prompts_per_step=2", "group_size=4",
    "sampling.max_new_tokens=24", "sampling.temperature=1.0", "baselines.problems=8", "baselines.group_size=4",
    "baselines.train.num_steps=4", "baselines.train.batch_size=8", "baselines.train.max_len=96",
    "evaluation.every=3", "evaluation.num_samples=2", "evaluation.sampling.max_new_tokens=24", "sample_batch=4",
    "checkpoint_every=1",
]


def _config(run_dir, *extra):
    return load_algorithm_config(CONFIG, [*SHORT, f"run_dir={run_dir}", *extra])[1]


def _history(run_dir):
    rows = json.loads((run_dir / "score" / "history.json").read_text())
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("score") / "run"
    main(["train", "--config", CONFIG, *SHORT, f"run_dir={run_dir}"])
    return run_dir


def test_report_has_every_model_and_the_metrics_agree(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "star", "pair_sft", "stage_1", "score"]
    for m in metrics["models"].values():
        assert m["delta"] == pytest.approx(m["acc_t2"] - m["acc_t1"])
        assert m["delta"] == pytest.approx(m["delta_i_to_c"] - m["delta_c_to_i"])
        assert 0 <= m["changed"] <= 1
    # evaluations at step 0, at the end of Stage I (step 2), at step 3 (every 3) and at the end
    assert [(e["step"], e["stage"]) for e in metrics["evaluations"]] == [(0, 0), (2, 1), (3, 2), (4, 2)]
    assert metrics["models"]["stage_1"] == {k: metrics["evaluations"][1][k] for k in metrics["models"]["stage_1"]}
    assert [s["stage"] for s in metrics["steps"]] == [1, 1, 2, 2]
    for s in metrics["steps"]:
        assert 0 <= s["reward_t1"] <= 1 and 0 <= s["reward_t2"] <= 1 and s["length_t2"] > 0
    report = (finished / "report.md").read_text()
    for row in ("| base model + instruction |", "| STaR (self-corrections) |", "| Pair-SFT |", "| SCoRe Stage I |",
                "| SCoRe |"):
        assert row in report
    assert (finished / "self_correction.png").stat().st_size > 0
    assert list((finished / "tensorboard" / "score").iterdir())
    for name in ("policy", "star", "pair_sft"):
        model, _ = load_pretrained(str(finished / "models" / name))
        assert model.config.hidden_size == 32
    episodes = json.loads((finished / "baselines" / "episodes.json").read_text())
    assert len(episodes["first"]) == 8 * 4


def test_resume_after_sigterm_gives_the_same_run(finished, tmp_path, monkeypatch):
    calls = []
    reward = score.task_reward

    def stopping_reward(task, tokenizer):
        inner = reward(task, tokenizer)

        def fn(problems, prompts, completions):
            calls.append(1)
            if len(calls) == 3:  # attempt 1 of step 2 (each step checks two attempts)
                os.kill(os.getpid(), signal.SIGTERM)
            return inner(problems, prompts, completions)

        fn.__name__ = inner.__name__
        return fn

    # the baselines and the base model, from the finished run's folder: only the RL phases run again
    (tmp_path / "stages.json").write_bytes((finished / "stages.json").read_bytes())
    stages = json.loads((finished / "stages.json").read_text())
    assert {"sft", "format", "eval_base", "star", "pair_sft"} <= set(stages)
    for folder in ("sft", "format", "star", "pair_sft", "baselines"):
        os.symlink(finished / folder, tmp_path / folder)
    monkeypatch.setattr(score, "task_reward", stopping_reward)
    with pytest.raises(RunInterrupted, match="after step 2"):
        run_score(_config(tmp_path), resume=True)
    monkeypatch.setattr(score, "task_reward", reward)
    metrics = run_score(_config(tmp_path), resume=True)
    assert _history(tmp_path) == _history(finished)
    assert metrics["models"] == json.loads((finished / "metrics.json").read_text())["models"]


def test_report_command_summarises_seeds(finished, capsys):
    main(["report", str(finished), str(finished)])
    out = capsys.readouterr().out
    delta = json.loads((finished / "metrics.json").read_text())["models"]["score"]["delta"]
    assert f"| SCoRe | Delta(t1, t2) | {delta:+.3f} | {delta:+.3f} | {delta:.3f} +- 0.000 |" in out


@pytest.mark.parametrize("override, message", [
    ("group_size=1", "group_size must be >= 2"),
    ("advantage=ppo", "unknown advantage 'ppo'"),
    ("schedule=[]", "schedule: no phases"),
    ("schedule=[{stage: 3, steps: 1}]", "stage 1 or 2"),
    ("beta2=-1", "must be >= 0"),
    ("evaluation.sampling.temperature=0", "num_samples: 1"),
])
def test_bad_settings_are_named(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, override)


@pytest.mark.parametrize("name", ["arith_tiny.yaml", "smollm2_arith.yaml", "gsm8k.yaml", "humaneval.yaml"])
def test_shipped_configs_load(name):
    algorithm, config = load_algorithm_config(f"configs/score/{name}")
    assert algorithm.name == "score" and config.num_steps > 0
