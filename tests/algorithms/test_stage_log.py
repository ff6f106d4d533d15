"""A finished training stage keeps its weights and drops its optimizer state (unless asked to keep it); a resumed
run loads those weights instead of training again."""

import dataclasses

import jax
import numpy as np
import pytest
import tiny
from flax import nnx

from jaxreason import sharding
from jaxreason.algorithms import stages as stages_module
from jaxreason.algorithms.stages import WEIGHTS, StageLog
from jaxreason.data.trace_store import check_lengths
from jaxreason.models import CausalLM
from jaxreason.train.checkpoint import Checkpointer
from jaxreason.train.fit import FitConfig
from jaxreason.train.objectives import sft_objective

# The shape of tests/train/test_fit.py's stage, so the step compiles once per machine.
MODEL = tiny.NUMERIC
FIT = FitConfig(num_steps=3, batch_size=8, max_len=16)


def _examples():
    rng = np.random.default_rng(0)
    return [rng.integers(1, MODEL.vocab_size, 16).astype(np.int32) for _ in range(16)]


def _batch(rows):
    tokens = np.stack(rows)
    return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}


def _train(run_dir, fit_config):
    model = CausalLM(MODEL, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    StageLog(run_dir).train("policy_0", model, sft_objective, _examples(), fit_config, _batch, mesh=mesh, seed=0)
    return model


def _weights(model):
    return jax.tree.leaves(jax.device_get(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("keep_optimizer", [False, True])
def test_finished_stage_keeps_its_weights_and_resumes_from_them(tmp_path, monkeypatch, keep_optimizer):
    trained = _train(tmp_path, dataclasses.replace(FIT, keep_optimizer=keep_optimizer))
    stage = tmp_path / "policy_0"
    assert (stage / WEIGHTS).is_dir()
    assert (stage / "checkpoints").exists() == keep_optimizer
    if keep_optimizer:
        assert Checkpointer(stage / "checkpoints").steps() == [3]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(stages_module, "fit", no_training)
    resumed = _train(tmp_path, FIT)
    untrained = CausalLM(MODEL, rngs=nnx.Rngs(0))
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(trained), _weights(untrained)))
    for a, b in zip(_weights(trained), _weights(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("overlong", ["drop", "error"])
def test_examples_longer_than_max_len_are_dropped_and_counted_or_an_error(tmp_path, overlong):
    examples = _examples()
    examples[3] = np.ones(20, np.int32)  # longer than the stage's max_len of 16

    def batch(rows):
        check_lengths([len(r) for r in rows], FIT.max_len, "rows")
        return _batch(rows)

    model = CausalLM(MODEL, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    log = StageLog(tmp_path)
    fit_config = dataclasses.replace(FIT, overlong=overlong)
    if overlong == "error":
        with pytest.raises(ValueError, match=r"stage policy_0: 1 rows longer than max_len = 16 \(the first has 20 "):
            log.train("policy_0", model, sft_objective, examples, fit_config, batch, mesh=mesh, seed=0)
        assert "policy_0" not in log
    else:
        log.train("policy_0", model, sft_objective, examples, fit_config, batch, mesh=mesh, seed=0)
        assert log.results["policy_0"]["examples"] == 15 and log.results["policy_0"]["dropped_overlong"] == 1
