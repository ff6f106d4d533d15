"""GRPO's shortened run with actor-critic advantages (`advantage=gae`) through the CLI, and its exact resume."""

import json
import os
import signal

import pytest
from test_grpo import CONFIG, SHORT

from jaxreason.algorithms import grpo
from jaxreason.algorithms.grpo import run_grpo
from jaxreason.algorithms.registry import RunInterrupted, load_algorithm_config
from jaxreason.cli import main

# no SFT and no sampled evaluation: the critic's mechanics, not the policy's skill
GAE = ["advantage=gae", "critic.lam=0.9", "sft=null", "evaluation.num_samples=0"]


def _history(run_dir):
    rows = json.loads((run_dir / "grpo" / "history.json").read_text())
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo_gae") / "run"
    main(["train", "--config", CONFIG, *SHORT, *GAE, f"run_dir={run_dir}"])
    return run_dir


def test_the_step_records_carry_the_critics_fit(finished):
    steps = json.loads((finished / "metrics.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:
        assert s["critic_loss"] > 0 and 0 < s["value_mae"] < 1 and s["kl"] >= -1e-6
    # the critic's weights lie beside the policy's in the finished run's weights (as in its checkpoints)
    saved = json.loads((finished / "grpo" / "weights" / "_METADATA").read_text())
    paths = " ".join(saved["tree_metadata"])
    assert "policy" in paths and "critic" in paths


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

        return fn

    config = load_algorithm_config(CONFIG, [*SHORT, *GAE, f"run_dir={tmp_path}"])[1]
    monkeypatch.setattr(grpo, "task_reward", stopping_reward)
    with pytest.raises(RunInterrupted, match="after step 3"):
        run_grpo(config)
    monkeypatch.setattr(grpo, "task_reward", reward)
    run_grpo(config, resume=True)
    assert _history(tmp_path) == _history(finished)
