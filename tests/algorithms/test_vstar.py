"""A shortened V-STaR run end to end on a tiny scratch model: the report's Best-of-k table and plot, the samples of
each kind in the trace store, the exported models; a run that crashed mid-stage resumed to the same figures; and the
errors."""

import json

import numpy as np
import pytest

from jaxreason.algorithms import vstar
from jaxreason.algorithms.registry import load_algorithm_config
from jaxreason.algorithms.vstar import run_vstar
from jaxreason.cli import main
from jaxreason.data.trace_store import FLAG_BASELINE, FLAG_CORRECT, FLAG_EVAL, FLAG_HINTED, TraceStore
from jaxreason.models import load_pretrained, load_value_model
from jaxreason.models.char_tokenizer import build_char_tokenizer

CONFIG = "configs/vstar/arith_tiny.yaml"
TOKENIZER = build_char_tokenizer()
SHORT = [
    "policy.scratch.hidden_size=32", "policy.scratch.intermediate_size=64", "policy.scratch.num_layers=2",
    "policy.scratch.head_dim=8",
    "problems.task.options={min_ops: 1, max_ops: 1, max_operand: 8, max_factor: 2, ops: '+', check_steps: true}",
    "problems.gold=40", "problems.train=8", "problems.test=4",
    "sft.num_steps=500", "sft.batch_size=8", "sft.max_len=64", "sft.optimizer.learning_rate=0.005",
    "iterations=2", "samples_per_problem=4", "sampling.max_new_tokens=32", "sampling.temperature=1.0",
    "sample_batch=4", "rationalization=true", "generator_train.num_steps=5", "generator_train.batch_size=8",
    "verifier.train.num_steps=5", "verifier.train.batch_size=8", "orm.num_steps=5", "orm.batch_size=8",
    "verifier.lora={rank: 4, alpha: 8}", "orm_lora={rank: 4, alpha: 8}",
    "evaluation.num_samples=4", "evaluation.sampling.max_new_tokens=32",
    "evaluation.greedy.sampling.max_new_tokens=32", "evaluation.verify_every_iteration=true",
]


def _config(run_dir, *extra):
    return load_algorithm_config(CONFIG, [*SHORT, f"run_dir={run_dir}", *extra])[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vstar") / "run"
    main(["train", "--config", CONFIG, *SHORT, f"run_dir={run_dir}"])
    return run_dir


def test_report_has_the_best_of_k_table_and_the_four_curves(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert [row["iteration"] for row in metrics["iterations"]] == [0, 1, 2]
    curves = metrics["best_of_k"]
    assert curves["k"] == [1, 2, 3, 4] and set(curves) == {"k", "verifier", "orm", "majority", "pass"}
    for name in ("verifier", "orm", "majority"):
        assert all(0 <= a <= p + 1e-9 for a, p in zip(curves[name], curves["pass"]))  # nothing beats pass@k
    assert curves["pass"] == sorted(curves["pass"])
    for row in metrics["iterations"]:
        assert set(row["best_of_n"]) == {"verifier", "orm", "majority", "pass"}
        assert (row["star"] is None) == (row["iteration"] == 0)
    pairs = metrics["verifier_pairs"]
    assert pairs["problems"] == 8 and pairs["problems_with_pairs"] + pairs["only_correct"] + \
        pairs["only_incorrect"] == 8 and pairs["pairs"] > 0  # the run must have something to pair
    assert metrics["training"]["verifier"]["examples"] == pairs["pairs"]
    report = (finished / "report.md").read_text()
    assert "| k | V-STaR verifier (DPO) | ORM | majority vote | pass@k |" in report and "best_of_k.png" in report
    assert (finished / "best_of_k.png").stat().st_size > 0


def test_the_store_holds_every_kind_of_sample(finished):
    stages = json.loads((finished / "stages.json").read_text())
    store = TraceStore(finished / "traces")
    try:
        for t in (1, 2):
            vstar_rows = store.select(iteration=t, flags_none=FLAG_BASELINE | FLAG_EVAL)
            assert len(vstar_rows) == 8 * 4 + stages[f"sample_{t}"]["rationalized"]
            assert len(store.select(iteration=t, flags_all=FLAG_EVAL, flags_none=FLAG_BASELINE)) == 4 * 4
            assert len(store.select(iteration=t, flags_all=FLAG_EVAL | FLAG_BASELINE)) == 4 * 4
        assert len(store.select(iteration=1, flags_all=FLAG_BASELINE, flags_none=FLAG_EVAL)) == 0  # STaR_0 = G_SFT
        assert len(store.select(iteration=2, flags_all=FLAG_BASELINE, flags_none=FLAG_EVAL)) == 8 * 4
        labels = store.read(store.select(iteration=1, flags_none=FLAG_BASELINE | FLAG_EVAL))
        assert all((t.reward == 1.0) == bool(t.flags & FLAG_CORRECT) for t in labels)
        hinted = [t for t in labels if t.flags & FLAG_HINTED]
        assert len(hinted) == stages["sample_1"]["rationalized"] and all(t.flags & FLAG_CORRECT for t in hinted)
        assert all("answer" not in TOKENIZER.decode(t.tokens[:t.prompt_len].tolist()) for t in hinted)  # unhinted
    finally:
        store.close()


def test_models_leave_the_run_as_hugging_face_folders(finished):
    for name in ("generator", "star", "verifier", "verifier_reference"):
        model, tokenizer = load_pretrained(str(finished / "models" / name))
        assert model.config.hidden_size == 32 and tokenizer is not None
    orm, _ = load_value_model(str(finished / "models" / "orm"))
    assert orm.config.num_layers == 2


def test_a_run_that_crashed_mid_stage_resumes_to_the_same_figures(finished, tmp_path, monkeypatch):
    evaluate = vstar._evaluate

    def crashing(r, policy, kind, t):
        if kind == "star_eval" and t == 2:  # V-STaR's held-out samples of iteration 2 are in the store by now
            raise RuntimeError("killed")
        return evaluate(r, policy, kind, t)

    monkeypatch.setattr(vstar, "_evaluate", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        run_vstar(_config(tmp_path))
    monkeypatch.setattr(vstar, "_evaluate", evaluate)
    with pytest.raises(ValueError, match="pass --resume"):
        run_vstar(_config(tmp_path))
    resumed = run_vstar(_config(tmp_path), resume=True)
    assert resumed == json.loads((finished / "metrics.json").read_text())


@pytest.mark.parametrize("override, message", [
    ("generator_init=random", "generator_init must be"),
    ("verifier.beta=0", "beta must be > 0"),
    ("rationalization_hint=hint", "must contain {answer}"),
    ("evaluation.num_samples=0", "evaluation.num_samples must be >= 1"),
])
def test_bad_settings_are_named(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, override)


def test_majority_and_pass_in_the_table_agree_with_the_samples(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    last = metrics["iterations"][-1]
    assert last["vstar"]["majority@4"] == pytest.approx(metrics["best_of_k"]["majority"][-1])
    assert last["vstar"]["pass@4"] == pytest.approx(metrics["best_of_k"]["pass"][-1])
    assert np.isclose(last["vstar"]["pass@1"], metrics["best_of_k"]["pass"][0])


def test_queries_can_be_the_gold_problems_whose_solutions_join_the_verifier_data(tmp_path):
    metrics = run_vstar(_config(tmp_path, "problems.queries_are_gold=true", "problems.gold=16", "iterations=1",
                                "star=false", "orm=null", "rationalization=false",
                                "evaluation.verify_every_iteration=false"))
    pairs = metrics["verifier_pairs"]
    assert pairs["problems"] == 16  # every query has its gold solution: none has only incorrect samples
    assert pairs["only_incorrect"] == 0 and pairs["problems_with_pairs"] + pairs["only_correct"] == 16
    store = TraceStore(tmp_path / "traces")
    try:
        ids = {t.problem_id for t in store.read(store.select(iteration=1, flags_none=FLAG_EVAL))}
    finally:
        store.close()
    assert ids == set(range(16))
    assert set(metrics["best_of_k"]) == {"k", "verifier", "majority", "pass"}
    # by default the verifiers score the last generator's samples only
    assert ["best_of_n" in row for row in metrics["iterations"]] == [False, True]


def test_report_command_summarises_seeds(finished, capsys):
    main(["report", str(finished), str(finished)])
    out = capsys.readouterr().out
    metrics = json.loads((finished / "metrics.json").read_text())
    best = metrics["best_of_k"]["verifier"][-1]
    assert f"| V-STaR verifier (DPO), k = 4 | {best:.3f} | {best:.3f} | {best:.3f} +- 0.000 |" in out


@pytest.mark.parametrize("name", ["arith_tiny.yaml", "smollm2_arith.yaml", "gsm8k.yaml"])
def test_shipped_configs_load(name):
    algorithm, config = load_algorithm_config(f"configs/vstar/{name}")
    assert algorithm.name == "vstar" and config.iterations == 3
