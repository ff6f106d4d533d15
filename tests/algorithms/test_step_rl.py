"""Per-step RL against RFT: first pits, per-step advantages on the right tokens, the data-efficiency ratio (all
against hand computations), the advantage-weighted update's direction, and a shortened run end to end with
its resume."""

import importlib
import json
import math

import jax
import numpy as np
import pytest

from jaxreason.algorithms import step_rl
from jaxreason.algorithms.registry import load_algorithm_config
from jaxreason.algorithms.step_rl import first_pit, pit_statistics, pooled_prefix_values, step_advantage_rows
from jaxreason.algorithms.step_rl_report import data_efficiency, rft_data_needed
from jaxreason.cli import main
from jaxreason.models import load_pretrained
from jaxreason.rl.trainer import PolicyGradientConfig, PolicyTrainer
from jaxreason.sharding import MeshConfig, make_mesh
from jaxreason.train.optimizer import OptimizerConfig
from jaxreason.verifiers.positions import StepSplitter
from tests.tiny import PAD, TOKENIZER, policy

CONFIG = "configs/step_rl/arith_tiny.yaml"
SHORT = [
    "policy.scratch.hidden_size=32", "policy.scratch.intermediate_size=64", "policy.scratch.num_layers=2",
    "policy.scratch.head_dim=8",
    # one addition per problem: after 300 steps the tiny policy solves some samples and fails others
    "problems.task.options={min_ops: 1, max_ops: 1, max_operand: 9, max_factor: 2, ops: '+', check_steps: true}",
    "problems.gold=48", "problems.train=16", "problems.test=8",
    "sft.num_steps=300", "sft.batch_size=8", "sft.max_len=48", "sft.optimizer.learning_rate=0.01",
    "sizes=[8, 16]", "samples_per_problem=4", "sampling.max_new_tokens=32", "sampling.temperature=1.0",
    "values.num_rollouts=2", "values.sampling.max_new_tokens=32", "rft.batch_size=8", "rft.epochs=2",
    "rft.max_len=48", "evaluation.sampling.max_new_tokens=32", "checkpoint_every=2",
]


# ---------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("values, threshold, pit", [
    ([0.75, 0.5, 0.0, 0.0], 0.05, 2),  # success drops to 0 after step 2
    ([1.0, 0.0], 0.05, 1),
    ([0.5, 0.0, 0.25, 0.0], 0.05, 1),  # the first pit, not the last
    ([0.5, 0.04, 0.0], 0.05, 1),  # 0.04 counts as about 0 at threshold 0.05 ...
    ([0.5, 0.04, 0.0], 0.0, 2),  # ... and not at threshold 0
    ([0.0, 0.0, 0.0], 0.05, None),  # failed from the prompt on: no step lost anything
    ([0.5, 0.75, 1.0], 0.05, None),  # a positive
])
def test_first_pit(values, threshold, pit):
    assert first_pit(values, threshold) == pit


def test_pit_statistics_by_hand():
    values = [np.array([0.5, 0.75, 0.0, 0.0]),  # negative, pit at step 2: A = (0.25, -0.75, 0)
              np.array([0.25, 0.0]),  # negative, pit at step 1: A = (-0.25,)
              np.array([0.0, 0.0, 0.0]),  # negative, no pit
              np.array([0.5, 0.5, 1.0])]  # positive: A = (0, 0.5)
    stats = pit_statistics(values, [False, False, False, True], 0.05, first_wrong=[1, 0, None, None])
    assert stats["negatives"] == 3 and stats["positives"] == 1 and stats["with_pit"] == 2
    assert stats["pit_fraction"] == pytest.approx(2 / 3)
    assert stats["mean_pit_step"] == pytest.approx(1.5) and stats["mean_negative_steps"] == pytest.approx(2.0)
    assert stats["mean_pit_place"] == pytest.approx((2 / 3 + 1 / 1) / 2)
    assert stats["advantage_at_pit"] == pytest.approx((-0.75 - 0.25) / 2)
    assert stats["advantage_elsewhere_in_negatives"] == pytest.approx((0.25 + 0.0) / 2)
    assert stats["advantage_in_positives"] == pytest.approx(0.25)
    assert stats["pit_is_most_negative_step"] == 1.0
    assert stats["pits_with_first_wrong_step"] == 2 and stats["pit_at_first_wrong_step"] == 1.0
    assert pit_statistics(values, [False] * 4, 0.05)["pit_at_first_wrong_step"] is None


def test_identical_prefixes_pool_their_estimates():
    # problem 0: rows 0 and 1 share the prompt and their first step [1, 2]; row 2 (problem 1) shares nothing
    pooled = pooled_prefix_values([0, 0, 1], [[1, 2, 3], [1, 2, 4, 5], [1, 2, 3]],
                                  [[0.5, 1.0, 1.0], [0.25, 0.5, 0.0], [0.0, 0.75, 1.0]], [[2, 3], [2, 4], [2, 3]])
    np.testing.assert_allclose(pooled[0], [0.375, 0.75, 1.0])  # own reward last, unchanged
    np.testing.assert_allclose(pooled[1], [0.375, 0.75, 0.0])
    np.testing.assert_allclose(pooled[2], [0.0, 0.75, 1.0])


def test_per_step_advantages_lie_on_their_steps_tokens():
    prompts = [[5, 6, 7], [5, 6]]
    completions = [[10, 11, 12, 13, 14], [20, 21, 22]]
    # row 0: steps [10 11] [12 13 14], Q = 0.5, 0.0, 0.0 -> A = (-0.5, 0); row 1: one step, Q = 0.25, 1 -> A = 0.75
    episodes, advantages = step_advantage_rows(prompts, completions, [[0.5, 0.0, 0.0], [0.25, 1.0]],
                                               [[2, 5], [3]], pad_id=PAD)
    assert advantages.shape == np.asarray(episodes.tokens).shape == (2, 16)
    expected = np.zeros((2, 16), np.float32)
    expected[0, 3:5] = -0.5  # tokens[0, 3:5] are 10, 11: step 1
    expected[1, 2:5] = 0.75
    np.testing.assert_allclose(advantages, expected)
    np.testing.assert_array_equal(np.asarray(episodes.tokens)[0, :8], [5, 6, 7, 10, 11, 12, 13, 14])
    np.testing.assert_array_equal(np.asarray(episodes.loss_mask())[1, :6], [0, 0, 1, 1, 1, 0])


def test_rft_data_needed_interpolates_in_log_n():
    sizes, rft = [64, 128, 256, 512], [0.40, 0.45, 0.50, 0.55]
    needed, bound = rft_data_needed(sizes, rft, 0.46)  # 1/5 of the way from 128 to 256 in log n
    assert needed == pytest.approx(128 * 2 ** 0.2) and not bound
    assert rft_data_needed(sizes, rft, 0.50) == (pytest.approx(256.0), False)
    assert rft_data_needed(sizes, rft, 0.30) == (64.0, True)  # reached by the first point: at most 64
    assert rft_data_needed(sizes, rft, 0.60) == (None, False)


def test_data_efficiency_by_hand():
    sizes, rft = [64, 128, 256, 512], [0.40, 0.45, 0.50, 0.55]
    out = data_efficiency(sizes, rft, [0.46, 0.52, 0.53, 0.54])
    ratios = [p["ratio"] for p in out["points"]]
    assert ratios == pytest.approx([128 * 2 ** 0.2 / 64, 256 * 2 ** 0.4 / 128, 256 * 2 ** 0.6 / 256,
                                    256 * 2 ** 0.8 / 512])
    # the largest RL accuracy that RFT reaches is 0.54 (n = 512): RFT needs 445.7 problems
    assert out["ratio"] == pytest.approx(256 * 2 ** 0.8 / 512) and out["n_step_rl"] == 512
    assert out["notes"] == ["RL never reaches RFT's best"]
    better = data_efficiency(sizes, rft, [0.56, 0.57, 0.58, 0.60])
    assert better["ratio"] is None and better["notes"] == ["RFT never reaches it"]
    assert "RFT never reaches it" in better["headline"]
    # every RL point at or below RFT's first: RFT needs at most 64 problems, so at most 64 / n
    worse = data_efficiency(sizes, rft, [0.30, 0.35, 0.38, 0.40])
    assert worse["ratio"] == pytest.approx(64 / 512) and worse["upper_bound"]
    assert worse["headline"].startswith("at most 0.12x")
    peak = data_efficiency(sizes, rft, [0.50, 0.50, 0.50, 0.50])  # ties go to the smaller n
    assert peak["n_step_rl"] == 64 and peak["ratio"] == pytest.approx(4.0)


# ---------------------------------------------------------------- the update


def test_the_update_raises_a_positive_step_and_lowers_a_negative_one():
    prompt = TOKENIZER.encode("Q: What is 2 + 3?\n", add_special_tokens=False)
    completion = TOKENIZER.encode("2 + 3 = 5\nThe answer is 6", add_special_tokens=False) + [TOKENIZER.eos_token_id]
    ends = StepSplitter(TOKENIZER, "\n")(completion)
    assert len(ends) == 2
    # Q: prompt 0.5, after the right step 1.0, the wrong answer 0: A = (+0.5, -1.0)
    episodes, advantages = step_advantage_rows([prompt], [completion], [[0.5, 1.0, 0.0]], [ends], pad_id=PAD)
    first = np.asarray(advantages[0]) > 0
    second = np.asarray(advantages[0]) < 0
    assert first.sum() == ends[0] and second.sum() == ends[1] - ends[0]
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    config = PolicyGradientConfig(kl_coef=0.0, optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0,
                                                                         weight_decay=0.0))
    trainer = PolicyTrainer(policy(0), config, mesh=mesh, num_updates=5, seed=0)
    before = trainer.logprobs(episodes.tokens, episodes.attention_mask)[0]
    for step in range(5):
        trainer.update(trainer.batch(episodes, advantages), step)
    after = trainer.logprobs(episodes.tokens, episodes.attention_mask)[0]
    assert after[first].sum() > before[first].sum() + 0.1
    assert after[second].sum() < before[second].sum() - 0.1


# ---------------------------------------------------------------- end to end


def _config(run_dir, *extra):
    return load_algorithm_config(CONFIG, [*SHORT, f"run_dir={run_dir}", *extra])[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("step_rl") / "run"
    main(["train", "--config", CONFIG, *SHORT, f"run_dir={run_dir}"])
    return run_dir


def test_run_writes_report_metrics_plot_and_models(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert [p["n"] for p in metrics["points"]] == [8, 16]
    for p in metrics["points"]:
        assert 0 <= p["rft"] <= 1 and 0 <= p["step_rl"] <= 1
        d = p["data"]
        assert d["samples"] == 4 * p["n"] and d["positives"] + d["negatives"] == d["distinct"] <= d["samples"]
        assert d["positives"] <= d["correct_samples"] <= d["samples"]
        assert p["step_rl_training"]["examples"] == d["distinct"]
        # equal passes: 2 epochs of batches of 8 over each method's own rows
        assert p["step_rl_training"]["steps"] == math.ceil(2 * d["distinct"] / 8)
        if d["positives"]:
            assert p["rft_training"]["steps"] == math.ceil(2 * d["positives"] / 8)
    small, large = (p["data"] for p in metrics["points"])
    assert small["distinct"] <= large["distinct"] and small["rollout_tokens"] < large["rollout_tokens"]
    assert large["negatives"] > 0 and large["positives"] > 0, "the tiny policy should solve some samples, not all"
    assert metrics["pits"]["negatives"] == large["negatives"]
    assert set(metrics["efficiency"]) >= {"points", "ratio", "headline", "notes"}
    report = (finished / "report.md").read_text()
    for text in ("Data-efficiency ratio", "First pits", "data_efficiency.png", "| 16 |"):
        assert text in report
    assert (finished / "data_efficiency.png").stat().st_size > 0
    for name in ("rft", "step_rl"):
        model, _ = load_pretrained(str(finished / "models" / name))
        assert model.config.hidden_size == 32


def test_resume_of_a_finished_run_redoes_no_stage(finished, monkeypatch):
    stages = (finished / "stages.json").read_text()
    metrics = (finished / "metrics.json").read_text()

    def never(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("sample_continuations", "prefix_values", "run_method"):
        monkeypatch.setattr(step_rl, name, never)
    monkeypatch.setattr(PolicyTrainer, "update", never)
    # a restored SFT stage takes no step (`jaxreason.train.fit` the attribute is the function, not the module)
    monkeypatch.setattr(importlib.import_module("jaxreason.train.fit"), "make_train_step", lambda *a, **k: never)
    main(["train", "--config", CONFIG, *SHORT, f"run_dir={finished}", "--resume"])
    assert (finished / "stages.json").read_text() == stages
    assert (finished / "metrics.json").read_text() == metrics


@pytest.mark.parametrize("override, message", [
    ("sizes=[16, 8]", "sizes must be increasing"),
    ("sizes=[8, 32]", "problems.train"),
    ("values.pit_threshold=1.0", "pit_threshold"),
    ("update.minibatch_rows=3", "must divide rft.batch_size"),
    ("rl_start=base", "rl_start must be"),
])
def test_bad_settings_are_named(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, override)
