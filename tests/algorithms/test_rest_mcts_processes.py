"""ReST-MCTS* in a multi-process job: process 0 alone writes the run folder and the trace store.

The unit tests play a process other than 0 (`is_main_process` patched to False) in this one process; the last
test runs a shortened ReST-MCTS* as two real processes (`jaxreason train` in tests/train_worker.py, 4 fake
CPU devices each, one 8-device mesh over both, gloo collectives) into one run folder and compares its metrics
with the same run in this process on its 8 devices.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_rest_mcts import CONFIG, SHORT, _config
from two_processes import train_in_two_processes

from jaxreason.algorithms import report, rest_mcts, stages, store_run
from jaxreason.algorithms.rest_mcts import run_rest_mcts
from jaxreason.algorithms.stages import StageLog, open_run_dir
from jaxreason.config import to_dict
from jaxreason.data.trace_store import Trace, TraceStore
from jaxreason.distributed import addressable
from jaxreason.models.char_tokenizer import build_char_tokenizer

TIMEOUT_S = 600
# Smaller than test_rest_mcts's run: one iteration, and the search settings evaluate on one held-out problem.
TWO_PROCESS = [*SHORT, "iterations=1", "evaluation.num_problems={mcts: 1}"]


def _traces(count: int) -> list[Trace]:
    return [Trace(problem_id=i, iteration=0, tokens=np.arange(3 + i, dtype=np.int32), prompt_len=2,
                  step_ends=np.array([3 + i], np.int32), step_values=np.array([0.5], np.float32), reward=1.0)
            for i in range(count)]


def _assert_same(got: list[Trace], want: list[Trace]) -> None:
    assert [(t.problem_id, t.iteration, t.prompt_len, t.reward, t.flags) for t in got] == [
        (t.problem_id, t.iteration, t.prompt_len, t.reward, t.flags) for t in want]
    for a, b in zip(got, want):
        for field in ("tokens", "step_ends", "step_values"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


@pytest.fixture
def other_process(monkeypatch):
    """This process plays process 1 of a multi-process job (`sync` stays a no-op: jax has one process)."""
    for module in (stages, store_run, report, rest_mcts):
        monkeypatch.setattr(module, "is_main_process", lambda: False)


def _as_process_0(run_dir):
    """What process 0 has made by the time the others open the run: the folder, config.json, the store."""
    config = _config(run_dir)
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    TraceStore.create(run_dir / "traces").close()
    return config


def test_open_run_dir_writes_nothing_on_other_processes(tmp_path, other_process):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    open_run_dir(run_dir, {"seed": 0}, resume=False)
    assert list(run_dir.iterdir()) == []
    (run_dir / "config.json").write_text(json.dumps({"seed": 0}))
    (run_dir / "stages.json").write_text("{}")
    with pytest.raises(ValueError, match="--resume"):  # every process checks the folder
        open_run_dir(run_dir, {"seed": 0}, resume=False)
    with pytest.raises(ValueError, match="different config"):
        open_run_dir(run_dir, {"seed": 1}, resume=True)


def test_stage_log_holds_results_but_writes_them_on_process_0_only(tmp_path, other_process):
    log = StageLog(tmp_path)
    assert log.run("a", lambda: {"x": 1}) == {"x": 1}
    assert "a" in log and log.run("a", lambda: pytest.fail("ran twice")) == {"x": 1}
    assert not (tmp_path / "stages.json").exists()


def test_other_processes_read_the_store_that_process_0_appends(tmp_path, other_process):
    run_dir = tmp_path / "run"
    config = _as_process_0(run_dir)
    before = (run_dir / "config.json").read_text()
    run = rest_mcts._setup(config, build_char_tokenizer(), resume=True)
    try:
        assert run.store.mode == "r"  # no writer lock: process 0 holds it
        assert (run_dir / "config.json").read_text() == before
        traces = _traces(6)
        with TraceStore(run_dir / "traces", "a") as writer:  # process 0's handle
            writer.append(traces)
            run.append(traces)  # process 1's side of the same append: it commits nothing, then sees the rows
            assert len(writer) == len(run.store) == 6
        _assert_same(run.store.read(range(6)), traces)
        run.append_once("again", traces, 0, 0)  # already committed: nothing to do
        assert len(TraceStore(run_dir / "traces")) == 6
    finally:
        run.store.close()


def test_report_and_export_write_nothing_on_other_processes(tmp_path, other_process):
    run_dir = tmp_path / "run"
    config = _as_process_0(run_dir)
    written = sorted(p.name for p in run_dir.iterdir())
    ev = {"greedy": {"accuracy": 0.5, "problems": 4, "tokens_per_problem": 3.0}}
    metrics = report.write_report(run_dir, to_dict(config), {"eval_0": {"rest_mcts": ev, "rest_em": None}})
    assert metrics["iterations"][0]["rest_mcts"] == ev
    run = rest_mcts._setup(config, build_char_tokenizer(), resume=True)
    try:
        from jaxreason.models.spec import build_model

        policy, _ = build_model(config.policy, 0)
        rest_mcts._export(run, 0, policy, rest_mcts.value_model_from(policy, 0))
    finally:
        run.store.close()
    assert sorted(p.name for p in run_dir.iterdir()) == written


def test_addressable_leaves_one_process_arrays_alone():
    tree = {"a": jax.numpy.ones((8, 2)), "b": np.zeros(3), "c": 1}
    assert addressable(tree) is tree


def test_two_processes_match_one(tmp_path):
    """The shortened run as a two-process job into one folder: it finishes on both processes, process 0 alone
    wrote the folder (one stages.json, metrics.json, report.md, models; a store the other process only read, each
    stage's traces committed once), and it is this process's run of the same config on the same 8-device mesh
    (data = 8, the default).

    Not float for float: gloo's all-reduce across the processes sums the gradients in another order than XLA's
    all-reduce inside one process, so the SFT losses agree to ~1e-7 for the first 20 steps, drift to ~1e-4 by
    step 60, and the samples of the trained policy then differ (token counts by a few percent). So the stages,
    the metrics' keys and problem and sample counts are compared exactly, the first 20 SFT losses with rtol 1e-5.
    """
    assert jax.device_count() == 8
    run_dir = tmp_path / "two"
    # The single-process reference runs here while the two processes run.
    outputs = train_in_two_processes(tmp_path, ["--config", CONFIG, *TWO_PROCESS, f"run_dir={run_dir}"],
                                     lambda: run_rest_mcts(_config(tmp_path / "one", "iterations=1",
                                                                   "evaluation.num_problems={mcts: 1}")), TIMEOUT_S)
    for out in outputs:  # every process finished the loop and printed the summary of the metrics it returned
        assert "rest_mcts: iteration 1 held-out accuracy" in out
    one, two = tmp_path / "one", run_dir
    written = {p.name for p in two.iterdir()}
    assert {"config.json", "stages.json", "metrics.json", "report.md", "accuracy_per_iteration.png", "traces", "models",
            "sft", "prm_0", "prm_1"} <= written and not [name for name in written if name.endswith(".tmp")]
    stages_one, stages_two = (json.loads((d / "stages.json").read_text()) for d in (one, two))
    assert list(stages_two) == list(stages_one)
    metrics_one, metrics_two = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert _shape(metrics_two) == _shape(metrics_one)
    assert (two / "report.md").read_text().splitlines()[:3] == (one / "report.md").read_text().splitlines()[:3]
    assert sorted(p.name for p in (two / "models").iterdir()) == ["policy_0", "policy_1", "prm_0", "prm_1"]
    losses = [[json.loads(line)["loss"] for line in (d / "sft" / "sft_metrics.jsonl").read_text().splitlines()]
              for d in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 200
    np.testing.assert_allclose(losses[1][:20], losses[0][:20], rtol=1e-5)
    with TraceStore(two / "traces") as store:  # every stage's traces once: process 1 appended nothing itself
        stages = stages_two
        assert len(store) == (stages["warmup_data"]["traces"] + stages["search_1"]["value_traces"]
                              + stages["rest_em_sample_1"]["samples"])


def _shape(metrics):
    """The metrics with every measured number replaced by its type; counts of problems and samples kept."""
    if isinstance(metrics, dict):
        return {k: v if k in ("problems", "samples", "num_test_problems", "iteration") else _shape(v)
                for k, v in metrics.items() if k != "seconds"}
    if isinstance(metrics, list):
        return [_shape(v) for v in metrics]
    return type(metrics).__name__
