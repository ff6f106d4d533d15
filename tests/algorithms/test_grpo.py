"""A shortened GRPO run end to end on a tiny scratch model, an interrupted run resumed exactly, and the errors."""

import json
import os
import signal

import pytest

from jaxreason.algorithms import grpo
from jaxreason.algorithms.grpo import run_grpo
from jaxreason.algorithms.registry import RunInterrupted, load_algorithm_config
from jaxreason.cli import main
from jaxreason.models import load_pretrained

CONFIG = "configs/grpo/arith_tiny.yaml"
SHORT = [
    "policy.scratch.hidden_size=32", "policy.scratch.intermediate_size=64", "policy.scratch.num_layers=2",
    "policy.scratch.head_dim=8",
    "problems.task.options={min_ops: 1, max_ops: 1, max_operand: 12, max_factor: 2, ops: '+', check_steps: true}",
    "problems.gold=48", "problems.train=16", "problems.test=4",
    "sft.num_steps=100", "sft.batch_size=8", "sft.max_len=64", "sft.optimizer.learning_rate=0.01",
    "num_steps=4", "prompts_per_step=2", "group_size=4", "sampling.max_new_tokens=24",
    "evaluation.every=2", "evaluation.baseline.sampling.max_new_tokens=24", "evaluation.num_samples=2",
    "evaluation.sample_problems=2", "checkpoint_every=2",
]


def _config(run_dir, *extra):
    return load_algorithm_config(CONFIG, [*SHORT, f"run_dir={run_dir}", *extra])[1]


def _history(run_dir):
    rows = json.loads((run_dir / "grpo" / "history.json").read_text())
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    main(["train", "--config", CONFIG, *SHORT, f"run_dir={run_dir}"])
    return run_dir


def test_run_writes_report_metrics_plots_and_the_trained_model(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evaluations"]] == [0, 2, 4]
    for e in metrics["evaluations"]:
        assert set(e) == {"step", "generated_tokens", "greedy", "sample", "self_consistency@2"}
        assert all(0 <= e[k] <= 1 for k in ("greedy", "sample", "self_consistency@2"))
    assert [s["step"] for s in metrics["steps"]] == [1, 2, 3, 4]
    for s in metrics["steps"]:
        # k3 KL is >= 0 exactly; its float32 mean can land a rounding error below
        assert 0 <= s["reward"] <= 1 and s["kl"] >= -1e-6 and s["response_length"] > 0
    tokens = [e["generated_tokens"] for e in metrics["evaluations"]]
    assert tokens[0] == 0 and tokens[1] < tokens[2]
    report = (finished / "report.md").read_text()
    assert "Held-out greedy accuracy" in report and "training_curves.png" in report
    assert (finished / "training_curves.png").stat().st_size > 0
    assert list((finished / "tensorboard" / "grpo").iterdir())
    model, _ = load_pretrained(str(finished / "models" / "policy"))
    assert model.config.hidden_size == 32
    # finished: the weights stay, the checkpoints (optimizer state and all) do not
    assert (finished / "grpo" / "weights").exists() and not (finished / "grpo" / "checkpoints").exists()


def test_a_finished_run_resumes_from_its_weights_without_a_step(finished, monkeypatch):
    before = json.loads((finished / "metrics.json").read_text())
    monkeypatch.setattr(grpo, "group_step", lambda *a, **k: pytest.fail("a finished step ran again"))
    run_grpo(_config(finished), resume=True)
    assert json.loads((finished / "metrics.json").read_text()) == before


def test_resume_after_sigterm_gives_the_same_run(finished, tmp_path, monkeypatch):
    calls = []
    reward = grpo.task_reward

    def stopping_reward(task, tokenizer):
        inner = reward(task, tokenizer)

        def fn(problems, prompts, completions):
            calls.append(1)
            if len(calls) == 3:  # during step 3, after the step-2 checkpoint
                os.kill(os.getpid(), signal.SIGTERM)
            return inner(problems, prompts, completions)

        fn.__name__ = inner.__name__
        return fn

    monkeypatch.setattr(grpo, "task_reward", stopping_reward)
    with pytest.raises(RunInterrupted, match="after step 3"):
        run_grpo(_config(tmp_path))
    monkeypatch.setattr(grpo, "task_reward", reward)
    with pytest.raises(ValueError, match="pass --resume"):
        run_grpo(_config(tmp_path))
    run_grpo(_config(tmp_path), resume=True)
    assert _history(tmp_path) == _history(finished)


def test_a_nan_reward_names_the_function_and_the_problem(tmp_path, monkeypatch):
    def nan_reward(task, tokenizer):
        def fn(problems, prompts, completions):
            return [float("nan")] * len(completions)

        return fn

    monkeypatch.setattr(grpo, "task_reward", nan_reward)
    with pytest.raises(ValueError, match=r"reward function fn returned nan for problem '.+' \(row 0\)"):
        run_grpo(_config(tmp_path, "sft=null"))


@pytest.mark.parametrize("override, message", [
    ("group_size=1", "group_size must be >= 2"),
    ("advantage=ppo", "unknown advantage 'ppo'"),
    ("truncation=drop", "truncation must be one of"),
    ("update.reference=copy", "reference must be one of"),
])
def test_bad_settings_are_named(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, override)
