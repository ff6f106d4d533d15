"""`fit`'s stage config: the optimizer and checkpoint settings a YAML gives reach optax and orbax."""

import jax
import numpy as np
import optax
import pytest
import tiny
from flax import nnx

from jaxreason import sharding
from jaxreason.algorithms.registry import load_algorithm_config
from jaxreason.models import CausalLM
from jaxreason.train import optimizer as optimizer_module
from jaxreason.train.checkpoint import CheckpointConfig, Checkpointer
from jaxreason.train.fit import FitConfig, fit
from jaxreason.train.objectives import sft_objective
from jaxreason.train.optimizer import OptimizerConfig

# The shape of tests/train/test_sharded_step.py, so the step compiles once per machine (persistent cache).
MODEL = tiny.NUMERIC
STAGE = """
algorithm: rest_mcts
policy: {scratch: {hidden_size: 32, intermediate_size: 64, num_layers: 2, head_dim: 8}}
prm_train:
  num_steps: 3
  batch_size: 8
  max_len: 16
  optimizer: {learning_rate: 0.002, warmup_steps: 1, b1: 0.8, b2: 0.9, eps: 1.0e-7, weight_decay: 0.05,
              max_grad_norm: 0.25, end_lr_fraction: 0.5}
  checkpoint: {every: 2, keep: 2}
"""


def _batches(position):
    rng = np.random.default_rng(position)
    while True:
        tokens = rng.integers(1, MODEL.vocab_size, (8, 16)).astype(np.int32)
        yield {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}


def test_yaml_optimizer_and_checkpoint_settings_reach_fit(tmp_path, monkeypatch):
    path = tmp_path / "stage.yaml"
    path.write_text(STAGE)
    _, config = load_algorithm_config(path)
    stage = config.prm_train
    assert stage.optimizer == OptimizerConfig(learning_rate=0.002, warmup_steps=1, b1=0.8, b2=0.9, eps=1e-7,
                                              weight_decay=0.05, max_grad_norm=0.25, end_lr_fraction=0.5)
    assert config.policy_train.checkpoint == CheckpointConfig(every=0, keep=1)  # a stage's default

    built = {}
    adamw, clip = optax.adamw, optax.clip_by_global_norm

    def spy_adamw(learning_rate, **kwargs):
        built["adamw"] = learning_rate, kwargs
        return adamw(learning_rate, **kwargs)

    def spy_clip(max_norm):
        built["clip"] = max_norm
        return clip(max_norm)

    # make_optimizer caches by config: these values are used by no other test, so it builds this one anew
    monkeypatch.setattr(optimizer_module.optax, "adamw", spy_adamw)
    monkeypatch.setattr(optimizer_module.optax, "clip_by_global_norm", spy_clip)
    model = CausalLM(MODEL, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    result = fit(model, sft_objective, _batches, stage, mesh=mesh, directory=tmp_path / "prm", seed=0,
                 description="prm")

    assert result.step == 3 and len(result.history) == 3
    schedule, kwargs = built["adamw"]
    assert kwargs == {"b1": 0.8, "b2": 0.9, "eps": 1e-7, "weight_decay": 0.05}
    assert built["clip"] == 0.25
    # peak after the warmup, end_lr_fraction of it at the stage's last step (total_steps = num_steps)
    np.testing.assert_allclose([schedule(0), schedule(1), schedule(3)], [0.0, 0.002, 0.001], rtol=1e-6)
    assert Checkpointer(tmp_path / "prm" / "checkpoints").steps() == [2, 3]


@pytest.mark.parametrize("line, key", [
    ("  optimizer: {max_grad_nrm: 1.0}", "prm_train.optimizer.max_grad_nrm"),
    ("  checkpoint: {evry: 2}", "prm_train.checkpoint.evry"),
    ("  learning_rate: 0.001", "prm_train.learning_rate"),  # the flat form of before
])
def test_unknown_stage_keys_name_the_key_and_the_file(tmp_path, line, key):
    path = tmp_path / "stage.yaml"
    path.write_text(f"algorithm: rest_mcts\npolicy: {{scratch: {{}}}}\nprm_train:\n{line}\n")
    with pytest.raises(ValueError) as e:
        load_algorithm_config(path)
    assert str(e.value).startswith(f"{path}: unknown key {key!r} (known: ")


def test_the_schedule_spans_the_stage():
    stage = FitConfig(num_steps=60, epochs=2, batch_size=32, optimizer=OptimizerConfig(warmup_steps=6))
    short = stage.for_examples(40)  # 2 epochs of 40 examples: 3 steps
    assert short.num_steps == 3 and short.optimizer == stage.optimizer
    assert short.optimizer.for_steps(short.num_steps) == OptimizerConfig(warmup_steps=2, total_steps=3)
    assert stage.for_examples(10_000).optimizer.for_steps(60) == OptimizerConfig(warmup_steps=6, total_steps=60)
    fixed = OptimizerConfig(warmup_steps=6, total_steps=100)  # set: kept whatever the stage's length
    assert fixed.for_steps(3) is fixed
    with pytest.raises(ValueError, match=r"warmup_steps \(6\) must be < total_steps \(6\)"):
        OptimizerConfig(warmup_steps=6, total_steps=6)
    with pytest.raises(ValueError, match="total_steps is unset"):
        optimizer_module.make_optimizer(OptimizerConfig())
