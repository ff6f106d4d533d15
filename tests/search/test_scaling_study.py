"""The test-time compute scaling study: budget accounting, difficulty bins, the compute-optimal choice made on
validation and scored on test, and the compute ratio against hand computations; `python -m jaxreason scaling` end
to end on a tiny model, resumed without redoing a stage; every config in configs/scaling/ loads."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxreason.cli import main
from jaxreason.config import load_config
from jaxreason.search import scaling_command
from jaxreason.search.scaling import (
    Setting,
    analyse,
    budget_levels,
    choose,
    compute_optimal,
    compute_ratio,
    difficulty_levels,
    largest_within,
    pool_settings,
    samples_equivalent,
    split_by_level,
)
from jaxreason.search.scaling_command import ScalingConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "scaling").glob("*.yaml"))


def test_samples_equivalent_counts_generated_and_verifier_tokens():
    # problem 0: 10 generated + 30 verifier, problem 1: 20 + 0; one sample is 10 tokens
    assert samples_equivalent(np.array([10, 20]), np.array([30, 0]), 10.0) == 3.0


def test_pool_settings_accuracy_and_tokens():
    groups = np.array([[0, 1], [0, 1]])
    correct = np.array([[1, 0], [0, 1]], float)
    scores = np.array([[0.2, 0.9], [0.1, 0.5]])
    lengths = np.array([[4, 6], [10, 10]], float)
    verified = np.array([[12, 14], [20, 20]], float)
    settings = {s.name: s for s in pool_settings(groups, correct, scores, lengths, verified, [1, 2])}
    assert sorted(settings) == sorted(f"{r}@{n}" for r in ("self_consistency", "best_of_n", "weighted_vote")
                                      for n in (1, 2))
    # n = 1: any rule is one random sample
    for rule in ("self_consistency", "best_of_n", "weighted_vote"):
        np.testing.assert_allclose(settings[f"{rule}@1"].correct, [0.5, 0.5])
    best = settings["best_of_n@2"]
    np.testing.assert_allclose(best.correct, [0, 1])  # the higher score: sample 1 of each problem
    np.testing.assert_allclose(settings["weighted_vote@2"].correct, [0, 1])  # one sample per answer: the same
    np.testing.assert_allclose(settings["self_consistency@2"].correct, [1, 0])  # a tie: the first answer
    # 2 samples cost twice a problem's mean sample; the verifier reads twice its mean solution
    np.testing.assert_allclose(best.generated_tokens, [10, 20])
    np.testing.assert_allclose(best.verifier_tokens, [26, 40])
    np.testing.assert_allclose(settings["self_consistency@2"].verifier_tokens, [0, 0])
    assert best.compute(tokens_per_sample=5.0) == pytest.approx((36 + 60) / 2 / 5)
    assert settings["self_consistency@1"].compute(tokens_per_sample=7.5) == pytest.approx(1.0)


def test_difficulty_levels_are_quantile_bins_with_ties_together():
    rates = np.array([0, 0, 0, 0.25, 0.5, 0.75, 1, 1])
    np.testing.assert_array_equal(difficulty_levels(rates, 4), [4, 4, 4, 3, 2, 2, 1, 1])
    # the order of the problems does not matter
    np.testing.assert_array_equal(difficulty_levels(rates[::-1], 4), [1, 1, 2, 2, 3, 4, 4, 4])
    # three problems at pass rate 1: their run's middle (2.5 of 4) is in the upper half, the 0 alone below it
    np.testing.assert_array_equal(difficulty_levels(np.array([0, 1, 1, 1]), 2), [2, 1, 1, 1])
    np.testing.assert_array_equal(difficulty_levels(np.full(4, 0.5), 3), [1, 1, 1, 1])  # one value: one level
    np.testing.assert_array_equal(difficulty_levels(np.array([0.5, 0.25, 0.0, 0.75]), 4), [2, 3, 4, 1])
    with pytest.raises(ValueError, match="num_bins"):
        difficulty_levels(rates, 0)


def test_split_by_level_halves_every_level():
    levels = np.array([1, 1, 1, 2, 2, 3, 1, 2])
    validation, test = split_by_level(levels, seed=0)
    assert sorted([*validation, *test]) == list(range(8))
    assert np.all(np.diff(validation) > 0) and np.all(np.diff(test) > 0)
    # per level: ceil(n / 2) to validation, the rest to test
    for level, n in ((1, 4), (2, 3), (3, 1)):
        assert np.sum(levels[validation] == level) == (n + 1) // 2
        assert np.sum(levels[test] == level) == n // 2
    np.testing.assert_array_equal(split_by_level(levels, seed=0)[0], validation)  # the seed decides
    assert any(not np.array_equal(split_by_level(levels, seed=s)[0], validation) for s in range(1, 6))


def test_budget_levels():
    assert budget_levels([0.5, 3.0, 4.0]) == [1.0, 2.0, 4.0]
    assert budget_levels([5.0]) == [1.0, 2.0, 4.0, 8.0]
    assert budget_levels([0.3]) == [1.0]


# Three settings of compute 1, 2 and 4 on 8 problems: 0-3 at level 1, 4-7 at level 2; validation 0, 1, 4, 5.
ACCURACY = np.array([
    # level 1: val | test, level 2: val | test
    [1, 1, 1, 0, 0, 0, 0, 0],  # A
    [0, 1, 1, 1, 1, 0, 1, 1],  # B
    [1, 1, 0, 0, 1, 1, 1, 0],  # C
], float)
COMPUTE = np.array([1.0, 2.0, 4.0])
LEVELS = np.array([1, 1, 1, 1, 2, 2, 2, 2])
VALIDATION, TEST = np.array([0, 1, 4, 5]), np.array([2, 3, 6, 7])


def test_choose_best_on_the_given_problems_within_budget():
    assert choose(ACCURACY, COMPUTE, VALIDATION, 0.5) is None
    assert choose(ACCURACY, COMPUTE, VALIDATION[2:], 2.0) == 1  # level 2: B (0.5) over A (0)
    assert choose(ACCURACY, COMPUTE, VALIDATION[:2], 4.0) == 0  # level 1: A and C tie at 1.0; A is cheaper
    assert choose(ACCURACY, COMPUTE, VALIDATION, 4.0) == 2


def test_compute_optimal_chooses_on_validation_and_scores_on_test():
    rows = compute_optimal(ACCURACY, COMPUTE, LEVELS, VALIDATION, TEST, [0.5, 1.0, 2.0, 4.0])
    assert rows[0] == {"budget": 0.5, "accuracy": None, "compute": None, "choice": {}}
    # budget 1: only A; its test accuracy: (1 + 0 + 0 + 0) / 4
    assert rows[1] == {"budget": 1.0, "accuracy": 0.25, "compute": 1.0, "choice": {1: 0, 2: 0}}
    # budget 2: A on level 1 (test 1, 0), B on level 2 (test 1, 1)
    assert rows[2] == {"budget": 2.0, "accuracy": 0.75, "compute": 1.5, "choice": {1: 0, 2: 1}}
    # budget 4: A (tie with C, cheaper) on level 1, C on level 2 (test 1, 0): validation overfits
    assert rows[3] == {"budget": 4.0, "accuracy": 0.5, "compute": 2.5, "choice": {1: 0, 2: 2}}
    # one level: the best fixed setting; at 2, A and B tie on validation (0.5) and A is cheaper
    fixed = compute_optimal(ACCURACY, COMPUTE, np.zeros(8, int), VALIDATION, TEST, [1.0, 2.0, 4.0])
    assert [(r["choice"][0], r["accuracy"]) for r in fixed] == [(0, 0.25), (0, 0.25), (2, 0.25)]
    with pytest.raises(ValueError, match="no validation problems"):
        compute_optimal(ACCURACY, COMPUTE, LEVELS, VALIDATION[:2], TEST, [1.0])


def test_largest_within_and_compute_ratio():
    assert [largest_within(COMPUTE, [0, 2], b) for b in (0.5, 1.0, 2.0, 4.0)] == [None, 0, 0, 2]
    budgets = [1.0, 2.0, 4.0, 8.0]
    assert compute_ratio(budgets, [None, 0.4, 0.6, 0.6], 0.6, 8.0) == {"budget": 4.0, "ratio": 2.0}
    assert compute_ratio(budgets, [0.7, 0.4, 0.6, 0.6], 0.6, 8.0) == {"budget": 1.0, "ratio": 8.0}
    assert compute_ratio(budgets, [0.1, 0.4, 0.5, 0.59], 0.6, 8.0) is None


def _flat(name: str, method: str, accuracy: float, generated: float, verified: float, p: int = 8) -> Setting:
    return Setting(name, method, np.full(p, accuracy), np.full(p, generated), np.full(p, verified))


def test_analyse_reports_the_ratio_at_which_compute_optimal_matches_best_of_n():
    # one sample = 10 tokens: MCTS costs 1, best-of-1 2 and best-of-2 4 samples-equivalent
    settings = [_flat("best_of_n@1", "best_of_n", 0.5, 10, 10), _flat("best_of_n@2", "best_of_n", 0.6, 20, 20),
                _flat("mcts", "mcts", 0.7, 10, 0)]
    metrics = analyse(settings, np.linspace(0, 1, 8), 10.0, num_bins=2, seed=0)
    assert metrics["budgets"] == [1.0, 2.0, 4.0]
    assert [s["compute"] for s in metrics["settings"]] == [2.0, 4.0, 1.0]
    assert metrics["levels"] == {"1": {"problems": 4, "pass_rate_min": pytest.approx(4 / 7), "pass_rate_max": 1.0},
                                 "2": {"problems": 4, "pass_rate_min": 0.0, "pass_rate_max": pytest.approx(3 / 7)}}
    assert (metrics["validation"], metrics["test"]) == (4, 4)
    assert [r["accuracy"] for r in metrics["compute_optimal"]] == pytest.approx([0.7, 0.7, 0.7])
    assert metrics["compute_optimal"][0]["choice"] == {"1": "mcts", "2": "mcts"}
    assert [r["setting"] for r in metrics["reference"]["curve"]] == [None, "best_of_n@1", "best_of_n@2"]
    # best-of-2 (0.6) needs budget 4; the compute-optimal strategy passes it at budget 1
    assert metrics["compute_ratio"] == {"reference": "best_of_n@2", "reference_accuracy": pytest.approx(0.6),
                                        "reference_budget": 4.0, "reference_compute": 4.0, "budget": 1.0,
                                        "ratio": 4.0}
    assert metrics["compute_ratio_at_best"] == metrics["compute_ratio"]
    # best-of-2 below best-of-1: the best best-of-N setting is matched at 2x less compute, the costliest at 4x
    falling = analyse([settings[0], _flat("best_of_n@2", "best_of_n", 0.4, 20, 20), settings[2]],
                      np.linspace(0, 1, 8), 10.0, num_bins=2, seed=0)
    assert (falling["compute_ratio"]["reference"], falling["compute_ratio"]["ratio"]) == ("best_of_n@2", 4.0)
    assert (falling["compute_ratio_at_best"]["reference"], falling["compute_ratio_at_best"]["ratio"]) == (
        "best_of_n@1", 2.0)
    # a worse MCTS: compute-optimal matches best-of-2 only by choosing it, at its own budget
    settings[2] = _flat("mcts", "mcts", 0.3, 10, 0)
    worse = analyse(settings, np.linspace(0, 1, 8), 10.0, num_bins=2, seed=0)
    assert (worse["compute_ratio"]["budget"], worse["compute_ratio"]["ratio"]) == (4.0, 1.0)
    # best-of-2 right on every test problem and wrong on every validation one: never chosen, never matched
    _, test = split_by_level(difficulty_levels(np.linspace(0, 1, 8), 2), seed=0)
    settings[1] = Setting("best_of_n@2", "best_of_n", np.isin(np.arange(8), test).astype(float), np.full(8, 20.0),
                          np.full(8, 20.0))
    never = analyse(settings, np.linspace(0, 1, 8), 10.0, num_bins=2, seed=0)
    assert never["compute_ratio"]["reference_accuracy"] == 1.0
    assert (never["compute_ratio"]["budget"], never["compute_ratio"]["ratio"]) == (None, None)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_scaling_config_loads(path):
    config = load_config(ScalingConfig, path)
    assert {s.method for s in config.runs} >= {"greedy", "beam_search", "mcts", "rstar"}
    assert len(CONFIGS) == 3


# ---------------------------------------------------------------- the command, end to end on a tiny model

TINY = {
    "policy": {"scratch": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                           "num_kv_heads": 2, "head_dim": 8}},
    "problems": {"task": {"name": "arith", "options": {"min_ops": 1, "max_ops": 1, "max_operand": 9}},
                 "gold": 16, "warmup": 4, "test": 8},
    "sft": {"num_steps": 2, "batch_size": 8, "max_len": 48},
    "warmup": {"num_rollouts": 2, "sampling": {"max_new_tokens": 12}},
    "prm_train": {"num_steps": 2, "batch_size": 8, "max_len": 48},
    "budget": {"baseline": {"sampling": {"max_new_tokens": 12}},
               "mcts": {"num_simulations": 2, "num_candidates": 2, "max_depth": 2, "rollout_steps": 0,
                        "sampling": {"max_new_tokens": 8}, "batch_size": 8}},
    "pool": {"num_samples": 4},
    # greedy and MCTS* (the verifier's tokens counted) go through the registry as every other method does
    "runs": [{"method": "greedy"}, {"method": "mcts", "budget": {"mcts": {"num_simulations": 3}}}],
    "num_bins": 2,
}


def test_scaling_command_writes_the_run_folder_and_resumes(tmp_path, capsys, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run_dir = tmp_path / "run"
    main(["scaling", "--config", str(config), f"run_dir={run_dir}"])
    printed = capsys.readouterr().out
    assert "Compute ratio" in printed and f"{run_dir}/report.md" in printed
    stages = json.loads((run_dir / "stages.json").read_text())
    assert list(stages) == ["sft", "warmup_data", "prm_0", "pool", "run_greedy", "run_mcts(num_simulations=3)"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = [s["name"] for s in metrics["settings"]]
    assert names == [f"{r}@{n}" for n in (1, 2, 4) for r in ("self_consistency", "best_of_n", "weighted_vote")] + [
        "greedy", "mcts(num_simulations=3)"]
    # the accounting on the pool the run drew: n samples cost n mean samples, plus the verifier's reading
    pool = stages["pool"]
    unit = np.mean(pool["generated_tokens"])
    assert metrics["tokens_per_sample"] == pytest.approx(unit)
    best4 = metrics["settings"][names.index("best_of_n@4")]
    assert best4["compute"] == pytest.approx(4 * (unit + np.mean(pool["verifier_tokens"])) / unit)
    assert metrics["settings"][names.index("self_consistency@2")]["compute"] == pytest.approx(2.0)
    mcts = stages["run_mcts(num_simulations=3)"]
    assert metrics["settings"][-1]["compute"] == pytest.approx(
        np.mean(np.add(mcts["generated_tokens"], mcts["verifier_tokens"])) / unit)
    assert metrics["settings"][-1]["verifier_tokens_per_problem"] > 0
    assert metrics["budgets"][-1] >= max(s["compute"] for s in metrics["settings"])
    assert metrics["validation"] + metrics["test"] == 8
    report = (run_dir / "report.md").read_text()
    assert "| setting | compute (samples-eq.) |" in report and "| budget (samples-eq.) | compute-optimal |" in report
    for png in ("accuracy_vs_compute.png", "compute_optimal.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report

    # Again: every stage is in the log, so nothing is sampled, searched or generated; the report is rebuilt.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("run", "sample_continuations", "rollout_value_traces"):
        monkeypatch.setattr(scaling_command, name, refuse)
    (run_dir / "report.md").unlink()
    main(["scaling", "--config", str(config), f"run_dir={run_dir}"])
    assert json.loads((run_dir / "stages.json").read_text()) == stages
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert (run_dir / "report.md").read_text() == report


def test_scaling_command_names_a_bad_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY, "runs": [{"method": "mcts", "budget": {"mcts": {"simulations": 4}}}]}))
    with pytest.raises(SystemExit):
        main(["scaling", "--config", str(config)])
    assert "simulations" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({**TINY, "runs": [{"method": "beam"}]}))
    with pytest.raises(SystemExit):
        main(["scaling", "--config", str(config)])
    assert "unknown method 'beam'" in capsys.readouterr().err

