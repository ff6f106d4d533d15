"""YAML configs into frozen dataclasses: nesting, defaults, type checks, overrides and one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from jaxreason.algorithms.registry import load_algorithm_config
from jaxreason.config import from_dict, load_config, to_dict
from jaxreason.models.spec import ModelSpec, ScratchModel
from jaxreason.sharding import MeshConfig
from jaxreason.train.checkpoint import CheckpointConfig
from jaxreason.train.optimizer import OptimizerConfig
from jaxreason.train.sft import SFTConfig

CONFIGS = Path(__file__).parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Outer:
    size: int
    sizes: tuple[int, ...] = (1, 2)
    names: tuple[str, ...] = ()
    flag: bool = False
    inner: Inner = Inner()
    maybe: Inner | None = None


def _yaml(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(cls, path, overrides=()):
    with pytest.raises(ValueError) as e:
        load_config(cls, path, overrides)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def _sft_yaml(name, overrides=()) -> SFTConfig:
    algorithm, config = load_algorithm_config(CONFIGS / "sft" / name, overrides)
    assert algorithm.name == "sft" and isinstance(config, SFTConfig)
    return config


def test_tiny_arith_yaml_loads():
    config = _sft_yaml("tiny_arith.yaml")
    assert config.model == ModelSpec(scratch=ScratchModel(hidden_size=128, intermediate_size=384, num_layers=4,
                                                          num_heads=4, num_kv_heads=2, head_dim=32))
    assert config.model.pretrained is None and config.model.dtype == "float32"  # defaults under a nested key
    assert config.optimizer == OptimizerConfig(learning_rate=0.003, warmup_steps=20)  # total_steps: num_steps
    assert config.optimizer.for_steps(config.num_steps) == OptimizerConfig(0.003, warmup_steps=20, total_steps=200)
    assert config.checkpoint == CheckpointConfig(every=50, keep=2, async_save=True)
    assert config.mesh == MeshConfig(data=-1)
    assert (config.batch_size, config.max_len, config.num_steps, config.grad_accum_steps) == (16, 128, 200, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 3


def test_smollm2_yaml_loads():
    config = _sft_yaml("smollm2.yaml")
    assert config.model.pretrained == "smollm2-135m-instruct" and config.model.scratch is None


def test_nested_defaults_float_from_int_none_and_tuples(tmp_path):
    path = _yaml(tmp_path, "size: 3\nsizes: [4, 5, 6]\nnames: only\ninner:\n  rate: 2\n")
    config = load_config(Outer, path)
    assert config == Outer(size=3, sizes=(4, 5, 6), names=("only",), inner=Inner(rate=2.0))
    assert isinstance(config.inner.rate, float) and isinstance(config.sizes, tuple)
    assert config.maybe is None and config.inner.name is None and config.flag is False
    config = load_config(Outer, path, ["maybe.rate=1", "inner.name=x", "sizes=[7]", "flag=true"])
    assert config.maybe == Inner(rate=1.0) and config.inner == Inner(rate=2.0, name="x")
    assert config.sizes == (7,) and config.flag is True
    assert load_config(Outer, path, ["inner.name=null"]).inner.name is None


def test_no_file_means_defaults_plus_overrides():
    assert load_config(Outer, None, ["size=1"]) == Outer(size=1)


def test_overrides_are_yaml_scalars(tmp_path):
    path = _yaml(tmp_path, "model:\n  scratch: {}\ndata: d.jsonl\n")
    config = load_config(SFTConfig, path, [
        "optimizer.learning_rate=1e-4", "optimizer.b2=0.99", "model.scratch.num_layers=2", "run_dir=runs/x=1",
        "checkpoint.async_save=false", "seed=-3",
    ])
    assert config.optimizer.learning_rate == 1e-4 and config.optimizer.b2 == 0.99
    assert config.model.scratch == ScratchModel(num_layers=2)
    assert config.run_dir == "runs/x=1" and config.checkpoint.async_save is False and config.seed == -3


def test_exponent_floats_in_yaml_files(tmp_path):
    """YAML 1.1 (PyYAML) reads `3e-4` as a string; a config means the number."""
    path = _yaml(tmp_path, "model:\n  scratch: {}\ndata: d.jsonl\noptimizer:\n  learning_rate: 3e-4\n  eps: 1.0E-6\n")
    config = load_config(SFTConfig, path)
    assert config.optimizer.learning_rate == 3e-4 and config.optimizer.eps == 1e-6


def test_switching_model_kind_from_the_command_line():
    config = _sft_yaml("tiny_arith.yaml", ["model.scratch=null", "model.pretrained=m"])
    assert config.model == ModelSpec(pretrained="m")


def test_to_dict_round_trips_through_json():
    config = _sft_yaml("tiny_arith.yaml")
    assert from_dict(SFTConfig, json.loads(json.dumps(to_dict(config))), "config.json") == config
    outer = Outer(size=1, sizes=(3, 4), maybe=Inner())
    assert from_dict(Outer, json.loads(json.dumps(to_dict(outer))), "x") == outer


# ---------------------------------------------------------------- errors


def test_unknown_keys_are_named(tmp_path):
    path = _yaml(tmp_path, "size: 1\nsise: 2\n")
    message = _error(Outer, path)
    assert str(path) in message and "unknown key 'sise'" in message
    message = _error(Outer, None, ["size=1", "inner.rat=3"])
    assert "unknown key 'inner.rat'" in message and "rate" in message  # the known keys are listed
    with pytest.raises(ValueError, match=r"tiny_arith.yaml: unknown key 'model.scratch.hidden'"):
        _sft_yaml("tiny_arith.yaml", ["model.scratch.hidden=3"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("size=abc", "size must be int, got 'abc'"),
        ("size=1.5", "size must be int, got 1.5"),
        ("size=true", "size must be int, got True"),
        ("flag=3", "flag must be true or false, got 3"),
        ("inner.rate=fast", "inner.rate must be float, got 'fast'"),
        ("inner.name=3", "inner.name must be str, got 3"),
        ("sizes=[1, x]", "sizes must be int, got 'x'"),
        ("inner=3", "inner must be a mapping, got 3"),
    ],
)
def test_wrong_types_are_named(override, fragment):
    assert fragment in _error(Outer, None, ["size=1", override] if not override.startswith("size=") else [override])


@pytest.mark.parametrize("override", ["size", "=3", "size=[1", "size=@x"])
def test_bad_override_syntax(override):
    assert repr(override) in _error(Outer, None, [override])


def test_override_through_a_scalar():
    assert "inner.rate.x: rate is not a mapping" in _error(Outer, None, ["size=1", "inner.rate=1", "inner.rate.x=2"])


def test_missing_required_field_and_post_init_checks(tmp_path):
    assert "data" in _error(SFTConfig, _yaml(tmp_path, "model:\n  scratch: {}\n"))
    message = _error(SFTConfig, _yaml(tmp_path, "model:\n  scratch: {}\n  pretrained: x\ndata: d\n"))
    assert "exactly one of `pretrained` and `scratch`" in message and "model" in message
    message = _error(SFTConfig, _yaml(tmp_path, "model:\n  scratch: {}\ndata: d\noptimizer:\n  learning_rate: 0\n"))
    assert "optimizer.learning_rate must be > 0" in message


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file does not exist: .*nowhere.yaml"):
        load_config(Outer, tmp_path / "nowhere.yaml")
    path = _yaml(tmp_path, "size: [1\nflag: 2\n")
    assert f"{path}: invalid YAML" in _error(Outer, path)
    assert "top level must be a mapping" in _error(Outer, _yaml(tmp_path, "- 1\n- 2\n"))
    assert load_config(Outer, _yaml(tmp_path, "", "empty.yaml"), ["size=2"]) == Outer(size=2)


def test_a_partial_mapping_keeps_the_fields_default_settings():
    """`sampling: {max_new_tokens: 32}` changes that field of the default sampling settings, not the others."""
    from jaxreason.search.config import BaselineConfig
    from jaxreason.train.fit import FitConfig

    config = from_dict(BaselineConfig, {"sampling": {"max_new_tokens": 32}}, "x.yaml")
    assert config.sampling.max_new_tokens == 32
    assert config.sampling.temperature == BaselineConfig().sampling.temperature == 0.7
    assert from_dict(FitConfig, {"checkpoint": {"every": 10}}, "x.yaml").checkpoint.keep == 1
