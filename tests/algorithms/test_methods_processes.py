"""V-STaR, SCoRe, self-play and per-step RL in a multi-process job: each one's shortened run from its own test
(test_vstar.py, test_score.py, test_selfplay.py, test_step_rl.py), shorter still, as two real processes
(tests/two_processes.py: 4 fake CPU devices each, one 8-device mesh over both, gloo collectives) into one run
folder, against the same run in this process on its 8 devices. The four runs are one two-process job, which starts
once (`--then` in tests/train_worker.py).

As for GRPO (test_grpo_processes.py), not float for float: gloo sums the gradients across the processes in
another order than XLA does inside one. After 20 SFT steps the losses still agree to 1e-5 and the policy solves
nothing, so both runs draw the same samples. The stages, the metrics' structure, the run folder's files, the
exported models, the SFT losses, and that the data process 0 writes for every process (trace store rows, sample
files) is there exactly once, are compared. The first test plays a process other than 0 at the export.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import test_score
import test_selfplay
import test_step_rl
import test_vstar
import tiny
from tiny import TOKENIZER
from two_processes import structure, train_in_two_processes

from jaxreason.algorithms import stages
from jaxreason.algorithms.registry import load_algorithm_config
from jaxreason.algorithms.stages import export_models
from jaxreason.data.trace_store import TraceStore
from jaxreason.models import load_pretrained, load_value_model

SFT_STEPS = 20


def test_export_models_writes_on_process_0_only(tmp_path, monkeypatch):
    models, values = {"policy": tiny.policy(), "star": None}, {"orm": tiny.value_model()}
    monkeypatch.setattr(stages, "is_main_process", lambda: False)
    export_models(tmp_path, TOKENIZER, models, values)
    assert not (tmp_path / "models").exists()
    monkeypatch.setattr(stages, "is_main_process", lambda: True)
    export_models(tmp_path, TOKENIZER, models, values)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["orm", "policy"]
    assert load_pretrained(str(tmp_path / "models" / "policy"))[0].config == tiny.CONFIG
    assert load_value_model(str(tmp_path / "models" / "orm"))[0].config == tiny.CONFIG
    written = (tmp_path / "models" / "policy" / "model.safetensors").stat().st_mtime_ns
    export_models(tmp_path, TOKENIZER, {"policy": tiny.policy(seed=1)})  # an earlier run's folder stays
    assert (tmp_path / "models" / "policy" / "model.safetensors").stat().st_mtime_ns == written


def _store_rows(run_dir: Path) -> int:
    with TraceStore(run_dir / "traces") as store:
        return len(store)


def _vstar_rows(run_dir: Path, logged: dict, c) -> tuple[int, int]:
    """The store's rows, and what the stages drew: training samples with their rationalizations, and
    `evaluation.num_samples` per held-out problem of each generator evaluated."""
    drawn = sum(s["samples"] + s.get("rationalized", 0) for name, s in logged.items()
                if name.startswith(("sample_", "star_sample_")))
    evaluated = sum(g is not None for name, s in logged.items() if name.startswith("eval_") for g in s.values())
    return _store_rows(run_dir), drawn + evaluated * c.evaluation.num_samples * c.problems.test


def _score_rows(run_dir: Path, logged: dict, c) -> tuple[int, int]:
    """The base model's episodes kept for the baselines."""
    episodes = json.loads((run_dir / "baselines" / "episodes.json").read_text())
    return len(episodes["first"]), c.baselines.problems * c.baselines.group_size


def _selfplay_rows(run_dir: Path, logged: dict, c) -> tuple[int, int]:
    """The store's rows: D_0 and the generator's RL samples (the gold-reward baseline keeps none)."""
    return _store_rows(run_dir), logged["samples_0"]["samples"] + c.num_steps * c.prompts_per_step * c.group_size


def _step_rl_rows(run_dir: Path, logged: dict, c) -> tuple[tuple[int, int], tuple[int, int]]:
    """The synthetic samples, and a prefix value list per distinct sample."""
    samples, values = (json.loads((run_dir / "synthetic" / f"{name}.json").read_text())
                       for name in ("sample", "values"))
    return ((len(samples["problem"]), len(values["values"])),
            (c.problems.train * c.samples_per_problem, logged["values"]["distinct_samples"]))


# name: (its test module (CONFIG, SHORT), shorter still, the data process 0 alone writes: (found, expected))
METHODS = {
    # the gold solutions join the verifier's data: DPO has pairs although the policy solves nothing
    "vstar": (test_vstar, ["iterations=1", "problems.queries_are_gold=true", "problems.gold=8"], _vstar_rows),
    "score": (test_score, ["schedule=[{stage: 1, steps: 1}, {stage: 2, steps: 1}]", "format_sft.num_steps=5"],
              _score_rows),
    # whole verifiers here, LoRA ones in test_selfplay.py: both paths end to end
    "selfplay": (test_selfplay, ["rounds=1", "steps_per_round=1", "verifier_lora=null"], _selfplay_rows),
    "step_rl": (test_step_rl, ["problems.train=8", "sizes=[4, 8]"], _step_rl_rows),
}


def _arguments(name: str, run_dir: Path) -> tuple[str, list[str]]:
    module, shorter, _ = METHODS[name]
    return module.CONFIG, [*module.SHORT, *shorter, f"sft.num_steps={SFT_STEPS}", f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[str]]:
    """Every method's run in one two-process job (into `two/<name>`) and in this process (`one/<name>`), and what
    each of the two processes printed."""
    assert jax.device_count() == 8
    root = tmp_path_factory.mktemp("methods")
    commands = []
    for name in METHODS:  # `train ARGS --then train ARGS ...`: the helper puts the first `train`
        config, overrides = _arguments(name, root / "two" / name)
        commands += [*(["--then", "train"] if commands else []), "--config", config, *overrides]

    def references():
        for name in METHODS:
            algorithm, config = load_algorithm_config(*_arguments(name, root / "one" / name))
            algorithm.run(config, False)

    return root, train_in_two_processes(root, commands, references)


@pytest.mark.parametrize("name", list(METHODS))
def test_two_processes_match_one(runs, name):
    root, printed = runs
    one, two = root / "one" / name, root / "two" / name
    assert all(f"\n{name}: " in f"\n{text}" for text in printed)  # every process finished it and printed its summary
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not list(two.rglob("*.tmp"))
    logged = [json.loads((d / "stages.json").read_text()) for d in (one, two)]
    assert list(logged[1]) == list(logged[0])
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert structure(metrics[1]) == structure(metrics[0])
    assert (two / "report.md").read_text().splitlines()[0] == (one / "report.md").read_text().splitlines()[0]
    exported = [sorted(p.name for p in (d / "models").iterdir()) for d in (one, two)]
    assert exported[1] == exported[0] and exported[0]
    for model in exported[0]:  # the same architecture saved, by process 0 once
        assert (two / "models" / model / "config.json").read_text() == \
            (one / "models" / model / "config.json").read_text()
    found, expected = METHODS[name][2](two, logged[1], load_algorithm_config(*_arguments(name, two))[1])
    assert found == expected  # process 0 wrote every row once, process 1 none
    losses = [[json.loads(line)["loss"] for line in (d / "sft" / "sft_metrics.jsonl").read_text().splitlines()]
              for d in (one, two)]
    assert len(losses[0]) == len(losses[1]) == SFT_STEPS
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)

