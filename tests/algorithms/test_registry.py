"""`python -m jaxreason train` dispatches on the config's `algorithm:`; every config in configs/ loads."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxreason.algorithms import registry
from jaxreason.algorithms.registry import (
    RunInterrupted,
    algorithm_names,
    get_algorithm,
    load_algorithm_config,
    register_algorithm,
)
from jaxreason.cli import main

ROOT = Path(__file__).parents[2]


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class DummyConfig:
    run_dir: str
    steps: int = 1
    inner: Inner = Inner()


@pytest.fixture
def dummy():
    """Registers algorithm "dummy", whose run records its calls; removed again after the test."""
    calls = []

    def run(config, resume):
        calls.append((config, resume))
        if config.steps < 0:
            raise RunInterrupted(f"dummy stopped at step {-config.steps}")
        return {"steps": config.steps, "loss": 0.25, "nested": {"ignored": 1}}

    register_algorithm("dummy", DummyConfig, run)
    yield calls
    registry._registry.pop("dummy")


def _yaml(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_train_runs_the_named_algorithm(dummy, tmp_path, capsys):
    path = _yaml(tmp_path, "algorithm: dummy\nrun_dir: runs/d\ninner: {rate: 2}\n")
    main(["train", "--config", str(path), "steps=3"])
    assert dummy == [(DummyConfig(run_dir="runs/d", steps=3, inner=Inner(rate=2.0)), False)]
    assert capsys.readouterr().out == "dummy: finished (steps 3, loss 0.25)\n"  # scalars only
    main(["train", "--config", str(path), "--resume"])
    assert dummy[-1] == (DummyConfig(run_dir="runs/d", inner=Inner(rate=2.0)), True)


def test_algorithm_from_an_override(dummy, tmp_path):
    main(["train", "--config", str(_yaml(tmp_path, "run_dir: r\n")), "algorithm=dummy"])
    # the override wins over the file
    main(["train", "--config", str(_yaml(tmp_path, "algorithm: sft\nrun_dir: r\n")), "algorithm=dummy", "steps=2"])
    assert [config for config, _ in dummy] == [DummyConfig(run_dir="r"), DummyConfig(run_dir="r", steps=2)]


def test_interrupted_run_exits_143(dummy, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(_yaml(tmp_path, "algorithm: dummy\nrun_dir: r\n")), "steps=-4"])
    assert e.value.code == 143
    assert capsys.readouterr().err.strip() == "jaxreason train: dummy stopped at step 4; continue with --resume"


def test_missing_algorithm(dummy, tmp_path, capsys):
    path = _yaml(tmp_path, "run_dir: r\n")
    line = _cli_error(capsys, ["train", "--config", str(path)])
    known = ", ".join(algorithm_names())
    assert line == f"jaxreason train: error: {path}: missing key 'algorithm' (known algorithms: {known})"
    assert {"dummy", "rest_mcts", "sft"} <= set(algorithm_names())
    assert not dummy


@pytest.mark.parametrize("text, override, shown", [
    ("algorithm: dumy\nrun_dir: r\n", [], "'dumy'"),
    ("algorithm: {name: dummy}\nrun_dir: r\n", [], "{'name': 'dummy'}"),
    ("algorithm: dummy\nrun_dir: r\n", ["algorithm=nope"], "'nope'"),
])
def test_unknown_algorithm(dummy, tmp_path, capsys, text, override, shown):
    path = _yaml(tmp_path, text)
    line = _cli_error(capsys, ["train", "--config", str(path), *override])
    assert line == (f"jaxreason train: error: {path}: unknown algorithm {shown} in key 'algorithm' "
                    f"(known algorithms: {', '.join(algorithm_names())})")
    assert not dummy


def test_unknown_keys_are_still_errors(dummy, tmp_path, capsys):
    path = _yaml(tmp_path, "algorithm: dummy\nrun_dir: r\ninner: {rat: 1}\n")
    line = _cli_error(capsys, ["train", "--config", str(path)])
    assert line == f"jaxreason train: error: {path}: unknown key 'inner.rat' (known: rate)"
    line = _cli_error(capsys, ["train", "--config", str(path), "inner.rat=null", "stepz=2"])
    assert f"{path}: unknown key 'stepz'" in line  # the top level is checked first
    line = _cli_error(capsys, ["train", "--config", str(path), "algorithm.name=dummy"])
    assert "override algorithm.name: algorithm is not a mapping" in line
    assert not dummy


def test_sft_command_runs_sft_only(dummy, tmp_path, capsys):
    path = _yaml(tmp_path, "algorithm: dummy\nrun_dir: r\n")
    line = _cli_error(capsys, ["sft", "--config", str(path)])
    assert line == f"jaxreason sft: error: {path}: algorithm 'dummy' runs with `jaxreason train`, not `sft`"
    assert not dummy


def test_registering_a_name_twice(dummy):
    with pytest.raises(ValueError, match="'dummy' is registered already"):
        register_algorithm("dummy", DummyConfig, lambda config, resume: {})
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_algorithm("other", dict, lambda config, resume: {})
    with pytest.raises(ValueError, match="unknown algorithm 'other'"):
        get_algorithm("other")


def test_the_command_line_does_not_load_the_algorithms():
    """`python -m jaxreason --help` stays fast: neither an algorithm module nor jax is imported to build it."""
    code = ("import sys; from jaxreason.cli import build_parser; from jaxreason.algorithms.registry import "
            "algorithm_names; build_parser(); print(algorithm_names(), sorted(m for m in sys.modules "
            "if m == 'jax' or m.startswith('jaxreason.algorithms.') or m.startswith('jaxreason.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = ['grpo', 'rest_mcts', 'rstar', 'score', 'selfplay', 'sft', 'step_rl', 'vstar']
    assert out.strip() == f"{names} ['jaxreason.algorithms.registry']"


# ---------------------------------------------------------------- the configs in configs/ cannot rot


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_every_training_config_names_its_algorithm():
    for path in CONFIGS:
        if path.parent.name in ("rest_mcts", "sft"):  # the folders `train` reads
            assert yaml.safe_load(path.read_text()).get("algorithm") == path.parent.name, path


@pytest.mark.parametrize("path", [p for p in CONFIGS if "algorithm" in (yaml.safe_load(p.read_text()) or {})],
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_loads_into_its_algorithm(path):
    algorithm, config = load_algorithm_config(path)
    assert algorithm is get_algorithm(yaml.safe_load(path.read_text())["algorithm"])
    assert isinstance(config, algorithm.config_class)
