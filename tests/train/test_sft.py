"""`python -m jaxreason sft` on a tiny scratch model: a whole run, SIGTERM, and one-line errors (exit status 2).

SFT of the real SmolLM2-135M: tests/train/test_sft_smollm2.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxreason.algorithms.registry import load_algorithm_config
from jaxreason.cli import main
from jaxreason.models.lora import LoRAParam
from jaxreason.models.spec import build_model
from jaxreason.train.checkpoint import Checkpointer
from jaxreason.train.sft import LoRAConfig, SFTConfig, run_sft

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs/sft/tiny_arith.yaml"
DATA = ROOT / "configs/sft/data/arith_sample.jsonl"
# The same tiny shape as tests/train/test_checkpoint_resume.py, so that the compiled step is shared.
TINY = [
    f"data={DATA}", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
    "model.scratch.num_layers=2", "model.scratch.head_dim=8", "max_len=64", "batch_size=8",
]


@pytest.fixture(scope="module")
def env():
    """The environment for CLI subprocesses (8 CPU devices and the shared compile cache, from conftest)."""
    return dict(os.environ)


def _sft_command(*args):
    return [sys.executable, "-m", "jaxreason", "sft", "--config", str(CONFIG), *TINY, *args]


def _logged(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "sft_metrics.jsonl").read_text().splitlines()]


def test_sft_command_end_to_end(tmp_path, env):
    run_dir = tmp_path / "run"
    result = subprocess.run(_sft_command(f"run_dir={run_dir}", "num_steps=16", "checkpoint.every=8"),
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("sft: finished at step 16, last loss ")
    assert "sft: 100%" in result.stderr and "16/16" in result.stderr  # the progress bar

    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_steps"] == 16 and config["model"]["scratch"]["hidden_size"] == 32
    assert config["data"] == str(DATA)

    logged = _logged(run_dir)
    assert [m["step"] for m in logged] == list(range(1, 17))
    assert {"loss", "accuracy", "num_tokens", "grad_norm", "tokens_per_s", "step_seconds", "time"} <= set(logged[0])
    assert all(np.isfinite(m["loss"]) for m in logged)
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.2, [m["loss"] for m in logged]
    assert f"last loss {logged[-1]['loss']:.4f}" in result.stdout

    events = list((run_dir / "tensorboard" / "sft").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert Checkpointer(run_dir / "checkpoints").steps() == [8, 16]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    text = "Q: (3 + 17) * 9 = ?\n"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape == (1, len(text)) and tokenizer.decode(ids[0]) == text  # the character tokenizer
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert model.config.vocab_size == len(tokenizer)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, len(text), len(tokenizer)) and torch.isfinite(logits).all()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, env):
    run_dir = tmp_path / "run"
    log_file = tmp_path / "stderr.txt"
    with open(log_file, "w") as stderr:
        process = subprocess.Popen(
            _sft_command(f"run_dir={run_dir}", "num_steps=100000", "checkpoint.every=100000"),
            stdout=subprocess.DEVNULL, stderr=stderr, env=env,
        )
        try:
            deadline = time.monotonic() + 240
            metrics = run_dir / "sft_metrics.jsonl"
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
                assert process.poll() is None, log_file.read_text()[-3000:]
                assert time.monotonic() < deadline, "no training steps logged in time"
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    assert returncode == 143, log_file.read_text()[-3000:]
    assert "SIGTERM: saved checkpoint at step" in log_file.read_text()

    last = _logged(run_dir)[-1]["step"]
    assert 2 <= last < 100000
    assert Checkpointer(run_dir / "checkpoints").steps() == [last]
    assert not (run_dir / "model").exists()  # an interrupted run exports no model

    _, config = load_algorithm_config(CONFIG, [*TINY, f"run_dir={run_dir}", f"num_steps={last + 2}",
                                               "save_model=false"])
    resumed = run_sft(config)
    assert resumed.step == last + 2 and len(resumed.history) == 2 and not resumed.interrupted
    assert int(resumed.state.step) == last + 2
    assert [m["step"] for m in _logged(run_dir)] == list(range(1, last + 3))


# ---------------------------------------------------------------- LoRA from the config


def test_lora_trains_only_adapters_and_resumes(tmp_path):
    def config(run_dir, steps):  # total_steps set: a run stopped early by fewer num_steps keeps the schedule
        return load_algorithm_config(CONFIG, [*TINY, "lora.rank=4", "lora.targets=[q, v, down]", "checkpoint.every=3",
                                              "save_model=false", f"run_dir={run_dir}", f"num_steps={steps}",
                                              "optimizer.total_steps=200"])[1]

    assert config(tmp_path, 6).lora == LoRAConfig(rank=4, alpha=16.0, targets=("q", "v", "down"))
    straight = run_sft(config(tmp_path / "straight", 6))
    trainable = nnx.to_flat_state(straight.state.trainable)
    assert all(isinstance(v, LoRAParam) for _, v in trainable)
    assert {path[-1] for path, _ in trainable} == {f"{k}_lora_{m}" for k in ("q", "v", "down") for m in "ab"}
    assert all(np.any(np.asarray(v.get_value()) != 0) for path, v in trainable if path[-1].endswith("_b"))
    base, _ = build_model(config(tmp_path, 6).model, seed=0)  # the frozen weights are still the initial ones
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(straight.state.frozen),
                 nnx.to_pure_dict(nnx.state(base, nnx.Param)))

    stopped = tmp_path / "stopped"
    assert run_sft(config(stopped, 3)).step == 3
    assert Checkpointer(stopped / "checkpoints").steps() == [3]
    resumed = run_sft(config(stopped, 6))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]
    for (path, a), (_, b) in zip(trainable, nnx.to_flat_state(resumed.state.trainable)):
        np.testing.assert_array_equal(np.asarray(b.get_value()), np.asarray(a.get_value()), err_msg=str(path))


# ---------------------------------------------------------------- errors: one line, exit status 2


def _cli_error(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--config", str(CONFIG), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("jaxreason sft: error: ")
    return lines[0]


def _jsonl(tmp_path, *lines):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = '{"prompt": "1 + 1 = ", "completion": "2"}'


def test_unknown_config_key(capsys, tmp_path):
    line = _cli_error(capsys, *TINY, f"run_dir={tmp_path}", "optimizer.learning_rat=0.1")
    assert "unknown key 'optimizer.learning_rat'" in line and str(CONFIG) in line


def test_malformed_jsonl_line(capsys, tmp_path):
    data = _jsonl(tmp_path, GOOD, GOOD, '{"prompt": "x", ')
    line = _cli_error(capsys, *TINY, f"data={data}", f"run_dir={tmp_path / 'run'}")
    assert f"{data}:3: malformed JSON" in line
    assert not (tmp_path / "run").exists()  # data errors come before anything is written


def test_missing_field(capsys, tmp_path):
    data = _jsonl(tmp_path, GOOD, '{"prompt": "2 + 2 = ", "answer": "4"}')
    line = _cli_error(capsys, *TINY, f"data={data}", f"run_dir={tmp_path / 'run'}")
    assert f"{data}:2: missing field 'completion'" in line


def test_missing_data_file(capsys, tmp_path):
    line = _cli_error(capsys, *TINY, f"data={tmp_path / 'nowhere.jsonl'}", f"run_dir={tmp_path / 'run'}")
    assert f"data file does not exist: {tmp_path / 'nowhere.jsonl'}" in line


def test_missing_config_file(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--config", str(tmp_path / "nowhere.yaml")])
    assert e.value.code == 2
    assert f"config file does not exist: {tmp_path / 'nowhere.yaml'}" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["batch_size", "batch_size=[8", "=8"])
def test_bad_override_syntax(capsys, override):
    assert repr(override) in _cli_error(capsys, override)


@pytest.mark.parametrize("override, fragment", [
    ("batch_size=abc", "batch_size must be int, got 'abc'"),
    ("optimizer.learning_rate=fast", "optimizer.learning_rate must be float, got 'fast'"),
    ("save_model=maybe", "save_model must be true or false, got 'maybe'"),
    ("lora.targets=[q, w]", "lora: unknown target(s) ['w']; choose from q, k, v, o, gate, up, down"),
    ("lora.rank=0", "lora: rank must be >= 1, got 0"),
])
def test_wrong_typed_override(capsys, override, fragment):
    assert fragment in _cli_error(capsys, override)


def test_batch_not_divisible_by_the_mesh(capsys, tmp_path):
    line = _cli_error(capsys, *TINY, "batch_size=4", f"run_dir={tmp_path}")  # 8 CPU devices in tests
    assert "batch_size 4 is not a multiple of mesh data x fsdp x grad_accum_steps = 8" in line


def test_errors_from_a_real_process_are_one_line(tmp_path, env):
    result = subprocess.run(_sft_command(f"run_dir={tmp_path}", "num_step=3"),
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    known = ", ".join(sorted(SFTConfig.__dataclass_fields__))
    assert result.stderr.strip().splitlines() == [
        f"jaxreason sft: error: {CONFIG}: unknown key 'num_step' (known: {known})"
    ]
