"""A shortened ReST-MCTS* run end to end on a tiny scratch model, an interrupted run resumed, and the errors.

The shapes are tiny and every run in this file uses the same ones, so the programs compile once.
"""

import json

import numpy as np
import pytest

from jaxreason.algorithms.registry import load_algorithm_config
from jaxreason.algorithms.rest_mcts import RestMCTSConfig, run_rest_mcts
from jaxreason.algorithms.stages import StageLog
from jaxreason.cli import main
from jaxreason.data.trace_store import FLAG_BASELINE, FLAG_CORRECT, FLAG_ROLLOUT, FLAG_SEARCH, TraceStore
from jaxreason.models import load_value_model
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.search.command import value_model_folder
from jaxreason.verifiers import SELECTION_RULES

CONFIG = "configs/rest_mcts/arith_tiny.yaml"
SHORT = [
    "policy.scratch.hidden_size=32", "policy.scratch.intermediate_size=64", "policy.scratch.num_layers=2",
    "policy.scratch.head_dim=8",
    # One-addition problems, so that the shortened SFT already solves some and every stage has data.
    "problems.task.options={min_ops: 1, max_ops: 1, max_operand: 12, max_factor: 2, ops: '+', check_steps: true}",
    "problems.gold=48", "problems.warmup=8", "problems.train=16", "problems.test=4",
    "iterations=2", "sft.num_steps=200", "sft.batch_size=8", "sft.max_len=64", "sft.optimizer.learning_rate=0.01",
    "warmup.num_rollouts=2", "warmup.sampling.max_new_tokens=32",
    "prm_train.num_steps=4", "prm_train.batch_size=8", "prm_train.max_len=64",
    "policy_train.num_steps=4", "policy_train.batch_size=8", "policy_train.max_len=64",
    "search.num_simulations=8", "search.num_candidates=3", "search.max_depth=3", "search.sampling.max_new_tokens=16",
    "rest_em.sampling.max_new_tokens=32", "evaluation.methods=[greedy,self_consistency,mcts]",
    "evaluation.baseline.num_samples=2", "evaluation.baseline.sampling.max_new_tokens=32",
    "evaluation.verification.num_samples=2", "evaluation.verification.sizes=[1,2]",
    "evaluation.num_problems={mcts: 2}",  # the expensive method on a subset of the held-out problems
]
STAGES = ["sft", "warmup_data", "prm_0", "eval_0"] + [
    f"{s}_{t}" for t in (1, 2) for s in ("search", "prm", "policy", "rest_em_sample", "rest_em_policy", "eval")]


def _without_timings(path):
    """metrics.json with the wall-clock "seconds" fields dropped (everything else must match exactly)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "seconds"}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads(path.read_text()))


def _config(run_dir, *extra) -> RestMCTSConfig:
    _, config = load_algorithm_config(CONFIG, [*SHORT, f"run_dir={run_dir}", *extra])
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One whole shortened run through the CLI: its folder and what it printed."""
    run_dir = tmp_path_factory.mktemp("rest_mcts") / "run"
    main(["train", "--config", CONFIG, *SHORT, f"run_dir={run_dir}"])
    return run_dir


def test_run_writes_report_metrics_plots_and_traces(finished, capsys):
    stages = json.loads((finished / "stages.json").read_text())
    assert list(stages) == STAGES
    metrics = json.loads((finished / "metrics.json").read_text())
    its = metrics["iterations"]
    assert [it["iteration"] for it in its] == [0, 1, 2]
    for it in its:
        assert set(it["rest_mcts"]) == {"greedy", "self_consistency", "mcts", "verification"}
        assert set(it["rest_em"]) == {"greedy", "self_consistency", "verification"}  # no verifier for ReST-EM
        for ev in (it["rest_mcts"], it["rest_em"]):
            for method, row in ev.items():
                if method == "verification":
                    continue
                assert 0 <= row["accuracy"] <= 1 and row["tokens_per_problem"] > 0
                assert (row["verifier_tokens_per_problem"] > 0) == (method == "mcts"), (method, row)
        assert {m: row["problems"] for m, row in it["rest_mcts"].items()} == {
            "greedy": 4, "self_consistency": 4, "mcts": 2, "verification": 4}
        assert {row["problems"] for row in it["rest_em"].values()} == {4}
        # N = 2 held-out samples per problem; every selection rule at n = 1 and 2, the verifier's only with a PRM
        verification, em_verification = it["rest_mcts"]["verification"], it["rest_em"]["verification"]
        assert verification["samples"] == em_verification["samples"] == 2
        assert verification["verifier_tokens_per_sample"] > 0 and "auc" in verification
        assert "auc" not in em_verification
        for v, rules in ((verification, set(SELECTION_RULES)),
                         (em_verification, {"self_consistency", "random_pick", "pass_at_n"})):
            assert set(v["selection"]) == {"1", "2"}
            for accuracies in v["selection"].values():
                assert set(accuracies) == rules and all(0 <= a <= 1 for a in accuracies.values())
    for t in (1, 2):  # ReST-EM spends the search's budget: one full round, then only what the budget needs
        search, em = stages[f"search_{t}"], stages[f"rest_em_sample_{t}"]
        assert search["verifier_tokens"] > 0
        assert em["generated_tokens"] >= search["generated_tokens"]
        if em["samples"] > 16 * 2:
            assert em["generated_tokens"] - search["generated_tokens"] < 64 * 32  # < 64 samples of <= 32 tokens

    report = (finished / "report.md").read_text()
    assert "| iteration |" in report and "ReST-EM" in report and "points" in report
    assert "4 held-out problems (MCTS* (PRM) on the first 2)" in report
    for png in ("accuracy_per_iteration.png", "accuracy_vs_n.png", "accuracy_vs_tokens.png"):
        assert (finished / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A stage with no examples (a search that found no correct leaf) trains nothing and saves nothing.
    trained = [name for name in STAGES if name.split("_")[0] in ("sft", "prm", "policy", "rest") and
               "sample" not in name and stages[name]["steps"]]
    # Which policies train depends on what the tiny searches find (it varies with the CPU's float rounding): some
    # policy stage trains, and every one that did not had no examples.
    assert {"sft", "prm_0", "prm_1", "prm_2"} <= set(trained)
    policies = [name for name in STAGES if name.startswith(("policy_", "rest_em_policy_"))]
    assert any(name in trained for name in policies)
    assert all(stages[name]["examples"] == 0 for name in policies if name not in trained)
    for name in trained:  # a finished stage keeps its weights, not its optimizer state
        assert (finished / name / "weights").is_dir() and not (finished / name / "checkpoints").exists(), name

    # Every iteration's policy and PRM exported as Hugging Face folders; the search command finds the newest PRM.
    assert sorted(p.name for p in (finished / "models").iterdir()) == [
        f"{name}_{t}" for name in ("policy", "prm") for t in (0, 1, 2)]
    for t in (0, 1, 2):
        assert (finished / "models" / f"policy_{t}" / "config.json").exists()
    assert value_model_folder(finished) == finished / "models" / "prm_2"
    prm, tokenizer = load_value_model(finished / "models" / "prm_2")
    assert prm.config.hidden_size == 32 and tokenizer.encode("1 + 2") == build_char_tokenizer().encode("1 + 2")

    with TraceStore(finished / "traces") as store:
        rollouts = store.read(store.select(iteration=0, flags_all=FLAG_ROLLOUT))
        assert len(rollouts) == stages["warmup_data"]["traces"] > 0
        # Warm-up solutions stay as generated, EOS included: the last step ends on the last token.
        assert all(r.step_ends[-1] == len(r.tokens) for r in rollouts)
        assert any(r.tokens[-1] == build_char_tokenizer().eos_token_id for r in rollouts)
        for t in (1, 2):
            search = store.read(store.select(iteration=t, flags_all=FLAG_SEARCH))
            assert len(search) == stages[f"search_{t}"]["value_traces"]
            assert sum(bool(s.flags & FLAG_CORRECT) for s in search) == stages[f"search_{t}"]["correct_traces"]
            for s in search:  # value targets in [0, 1], NaN where an earlier trace carried the node
                v = s.step_values[np.isfinite(s.step_values)]
                assert ((v >= 0) & (v <= 1)).all()
            assert len(store.select(iteration=t, flags_all=FLAG_BASELINE)) == stages[f"rest_em_sample_{t}"]["samples"]


def test_eval_subset_sizes_are_checked(tmp_path):
    with pytest.raises(ValueError, match="exceeds problems.test"):
        _config(tmp_path, "evaluation.num_problems={mcts: 5}")
    with pytest.raises(ValueError, match="unknown method 'mcst'"):
        _config(tmp_path, "evaluation.num_problems={mcst: 2}")
    with pytest.raises(ValueError, match="positive integers"):
        _config(tmp_path, "evaluation.num_problems={mcts: 0}")


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="value_targets"):
        _config(tmp_path, "value_targets=leaves")
    with pytest.raises(ValueError, match="verification.sizes"):
        _config(tmp_path, "evaluation.verification.sizes=[1,4]")  # more than num_samples=2
    with pytest.raises(ValueError, match="unknown method 'tree_search'"):
        _config(tmp_path, "evaluation.methods=[greedy,tree_search]")


def test_existing_run_needs_resume(finished):
    with pytest.raises(ValueError, match="--resume"):
        run_rest_mcts(_config(finished))
    with pytest.raises(ValueError, match="different config"):
        run_rest_mcts(_config(finished, "seed=5"), resume=True)


def test_interrupted_run_resumes_to_the_same_result(finished, tmp_path, monkeypatch):
    """Killed after the second search committed its traces but before it was logged, then resumed: the
    resumed run re-uses every finished stage, appends nothing twice and ends with the same metrics."""
    run_dir = tmp_path / "run"
    original = StageLog.run

    def dies_after_search_2(self, name, fn):
        if name == "search_2":
            fn()
            raise KeyboardInterrupt("killed")
        return original(self, name, fn)

    monkeypatch.setattr(StageLog, "run", dies_after_search_2)
    with pytest.raises(KeyboardInterrupt):
        run_rest_mcts(_config(run_dir))
    monkeypatch.setattr(StageLog, "run", original)
    assert "search_2" not in json.loads((run_dir / "stages.json").read_text())

    run_rest_mcts(_config(run_dir), resume=True)
    assert _without_timings(run_dir / "metrics.json") == _without_timings(finished / "metrics.json")
    with TraceStore(run_dir / "traces") as a, TraceStore(finished / "traces") as b:
        assert len(a) == len(b)


def test_report_command_summarises_seeds(finished, capsys):
    main(["report", str(finished), str(finished)])
    out = capsys.readouterr().out
    assert out.startswith("| figure | seed 0 | seed 0 | last iteration, mean +- std | change from policy_0, mean "
                          "+- std |")
    assert "| ReST-MCTS* greedy |" in out and "| ReST-EM self-consistency |" in out and "+- 0.0 points |" in out
    assert "| the paper's claim, measured as | seed 0 | seed 0 |" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(finished / "missing")])
    assert exit_info.value.code == 2


def test_the_claims_are_read_from_the_metrics():
    """Each claim of the paper from one run's metrics: MCTS* against self-consistency interpolated to its tokens,
    and training problems solved per token as the ratio of the two methods' rates."""
    from jaxreason.algorithms.report import claims

    selection = {"1": {"best_of_n": 0.4, "weighted_vote": 0.4, "self_consistency": 0.4, "random_pick": 0.4},
                 "2": {"best_of_n": 0.5, "weighted_vote": 0.5, "self_consistency": 0.44, "random_pick": 0.4},
                 "4": {"best_of_n": 0.55, "weighted_vote": 0.6, "self_consistency": 0.52, "random_pick": 0.4}}
    search = {"trees_with_correct_leaf": 300, "generated_tokens": 1000}
    em = {"train_accuracy": 0.5, "generated_tokens": 1000}  # of 1000 problems: 500 solved
    its = [{"search": None, "rest_em_sample": None},
           {"search": search, "rest_em_sample": em,
            "rest_mcts": {"greedy": {"accuracy": 0.6}, "mcts": {"accuracy": 0.5, "tokens_per_problem": 30.0},
                          "verification": {"tokens_per_sample": 10.0, "selection": selection}},
            "rest_em": {"greedy": {"accuracy": 0.65}}}]
    got = claims(its, train_problems=1000)
    assert got["weighted_vote_minus_self_consistency"] == pytest.approx(0.08)
    assert got["best_of_minus_random_pick"] == pytest.approx(0.15)
    assert got["mcts_minus_self_consistency"] == pytest.approx(0.5 - 0.48)  # 3 samples: halfway from 2 to 4
    assert got["solved_per_token_ratio"] == pytest.approx(0.6)
    assert got["greedy_minus_rest_em"] == pytest.approx(-0.05)
    its[1]["rest_mcts"]["mcts"]["tokens_per_problem"] = 50.0  # beyond the samples' range: no comparison
    assert "mcts_minus_self_consistency" not in claims(its, train_problems=1000)
