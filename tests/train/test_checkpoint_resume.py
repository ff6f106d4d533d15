"""Checkpoints: exact resume of an SFT run and of its RNG keys, damaged and partial checkpoints, keep-K, SIGTERM."""

import itertools
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxreason import sharding
from jaxreason.algorithms.registry import load_algorithm_config
from jaxreason.train.checkpoint import Checkpointer, StopSignal
from jaxreason.train.loop import run_training
from jaxreason.train.sft import SFTConfig, run_sft
from jaxreason.train.step import init_train_state, make_train_step

ROOT = Path(__file__).parents[2]
# One tiny shape for every run in tests/train, so each compiles once (with the persistent compile cache set in
# tests/conftest.py).
TINY = [
    f"data={ROOT / 'configs/sft/data/arith_sample.jsonl'}", "model.scratch.hidden_size=32",
    "model.scratch.intermediate_size=64", "model.scratch.num_layers=2", "model.scratch.head_dim=8", "max_len=64",
    "batch_size=8",
]


def tiny_config(run_dir, *overrides) -> SFTConfig:
    # total_steps set: these tests stop a run early by giving it fewer num_steps, which must not change the schedule
    _, config = load_algorithm_config(ROOT / "configs/sft/tiny_arith.yaml",
                                      [*TINY, f"run_dir={run_dir}", "save_model=false", "optimizer.total_steps=200",
                                       *overrides])
    return config


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _logged(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "sft_metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- exact resume of a real run


def test_resume_is_exact(tmp_path):
    straight = run_sft(tiny_config(tmp_path / "straight", "num_steps=12", "checkpoint.every=7"))
    assert [h["loss"] for h in straight.history][-1] < straight.history[0]["loss"]

    stopped_dir = tmp_path / "stopped"
    first = run_sft(tiny_config(stopped_dir, "num_steps=7", "checkpoint.every=7"))
    assert first.step == 7 and not first.interrupted
    np.testing.assert_array_equal([h["loss"] for h in first.history],
                                  [h["loss"] for h in straight.history[:7]])

    # the checkpoint at step 7 holds exactly the state the run ended with, and the data position
    checkpointer = Checkpointer(stopped_dir / "checkpoints")
    assert checkpointer.steps() == [7]
    step, restored, meta = checkpointer.restore_latest(first.state)
    checkpointer.close()
    assert step == 7 and meta == {"data_position": 7, "seed": 0}
    assert int(restored.step) == 7
    _assert_trees_equal(restored, first.state)  # params, optimizer state (moments, counts), step and RNG key
    assert restored.trainable != {}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(first.state)):
        assert got.sharding == want.sharding

    resumed = run_sft(tiny_config(stopped_dir, "num_steps=12", "checkpoint.every=7"))
    assert resumed.step == 12 and len(resumed.history) == 5
    np.testing.assert_allclose([h["loss"] for h in resumed.history],
                               [h["loss"] for h in straight.history[7:]], rtol=1e-6, atol=0)
    for key in ("grad_norm", "accuracy", "num_tokens"):
        np.testing.assert_allclose([h[key] for h in resumed.history], [h[key] for h in straight.history[7:]],
                                   rtol=1e-6)
    _assert_trees_equal(resumed.state, straight.state)
    assert int(resumed.state.step) == 12
    assert [m["step"] for m in _logged(stopped_dir)] == list(range(1, 13))  # appended, not restarted

    # a finished run resumes to nothing to do; another seed in the same folder is refused
    again = run_sft(tiny_config(stopped_dir, "num_steps=12", "checkpoint.every=7"))
    assert again.step == 12 and again.history == []
    with pytest.raises(ValueError, match="seed 0, run has 1"):
        run_sft(tiny_config(stopped_dir, "num_steps=12", "seed=1"))


# ---------------------------------------------------------------- the RNG key through a resume


def _noisy_objective(model, batch, key):
    """Squared error to targets moved by key-dependent noise: the loss depends on the step's key."""
    noise = jax.random.normal(key, batch["y"].shape)
    loss = jnp.mean(jnp.square(model(batch["x"]) - batch["y"] - noise))
    return loss, {"noise": noise[0, 0]}


def _noisy_run(run_dir, num_steps):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    optimizer = optax.adam(1e-2)
    graphdef, state, shardings = init_train_state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), optimizer, mesh, seed=7)
    step = make_train_step(graphdef, _noisy_objective, optimizer, shardings, mesh)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(4, 3)).astype(np.float32), "y": rng.normal(size=(4, 2)).astype(np.float32)}
    checkpointer = Checkpointer(run_dir, save_every=0)
    try:
        return run_training(step, state, lambda position: itertools.repeat(batch), num_steps=num_steps, seed=7,
                            checkpointer=checkpointer)
    finally:
        checkpointer.close()


def test_resume_continues_the_key_sequence(tmp_path):
    straight = _noisy_run(tmp_path / "straight", 6)
    noise = [h["noise"] for h in straight.history]
    assert len(set(noise)) == 6  # a new key every step

    assert _noisy_run(tmp_path / "stopped", 3).step == 3
    resumed = _noisy_run(tmp_path / "stopped", 6)
    assert len(resumed.history) == 3
    # a restart from the seed's key would repeat noise[:3]; the restored key continues the sequence
    assert [h["noise"] for h in resumed.history] == noise[3:]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]
    _assert_trees_equal(resumed.state, straight.state)  # parameters, Adam state, step and the key itself
    assert resumed.state.rng.dtype == jnp.uint32


# ---------------------------------------------------------------- the checkpointer on a small pytree


def _state(scale: float):
    return {"params": {"w": jnp.arange(6.0).reshape(2, 3) * scale, "b": jnp.full((3,), scale)},
            "step": jnp.asarray(int(scale), jnp.int32)}


def _damage(step_dir: Path):
    """Overwrites every array data file of a checkpoint (as a torn write or bad disk would)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, sorted(step_dir.rglob("*"))
    for p in files:
        p.write_bytes(b"\0" * (p.stat().st_size // 2))


# a failed orbax restore can leave a tensorstore callback to a closed asyncio loop ("Event loop is closed")
ORBAX_CLOSED_LOOP = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@ORBAX_CLOSED_LOOP
@pytest.mark.parametrize("damage", ["truncated", "metadata file deleted", "json item deleted"])
def test_unreadable_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
    checkpointer = Checkpointer(tmp_path, keep=3)
    checkpointer.save(1, _state(1), {"data_position": 1, "seed": 0})
    checkpointer.save(2, _state(2), {"data_position": 2, "seed": 0})
    checkpointer.close()
    if damage == "truncated":
        _damage(tmp_path / "2")
    elif damage == "metadata file deleted":
        (tmp_path / "2" / "state" / "_METADATA").unlink()
    else:
        shutil.rmtree(tmp_path / "2" / "metadata")

    checkpointer = Checkpointer(tmp_path, keep=3)
    assert checkpointer.steps() == [1, 2]
    with caplog.at_level(logging.WARNING, logger="jaxreason.train.checkpoint"):
        step, state, meta = checkpointer.restore_latest(_state(0))
    assert step == 1 and meta == {"data_position": 1, "seed": 0}
    _assert_trees_equal(state, _state(1))
    warnings = [r.getMessage() for r in caplog.records if r.name == "jaxreason.train.checkpoint"]
    assert len(warnings) == 1 and f"skipping unreadable checkpoint {tmp_path / '2'}:" in warnings[0]

    # the resumed run saves that step again: the damaged folder is replaced, not an error
    checkpointer.save(2, _state(5), {"data_position": 2, "seed": 0}, wait=True)
    assert checkpointer.steps() == [1, 2]
    assert checkpointer.restore_latest(_state(0))[0] == 2
    _assert_trees_equal(checkpointer.restore_latest(_state(0))[1], _state(5))
    checkpointer.close()


@ORBAX_CLOSED_LOOP
def test_every_checkpoint_unreadable_means_a_fresh_start(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(3, _state(3), {"data_position": 3, "seed": 0}, wait=True)
    _damage(tmp_path / "3")
    with caplog.at_level(logging.WARNING, logger="jaxreason.train.checkpoint"):
        assert checkpointer.restore_latest(_state(0)) is None
    assert str(tmp_path / "3") in caplog.text
    checkpointer.close()


def test_partial_orbax_folder_is_skipped_with_a_warning(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, _state(1), {"data_position": 1, "seed": 0}, wait=True)
    checkpointer.close()
    # a save killed mid-way leaves orbax's temporary folder (renamed to "2" only once complete)
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp")
    (tmp_path / "2.orbax-checkpoint-tmp" / "_CHECKPOINT_METADATA").unlink()
    _damage(tmp_path / "2.orbax-checkpoint-tmp")

    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.steps() == [1]
    with caplog.at_level(logging.WARNING, logger="jaxreason.train.checkpoint"):
        step, state, _ = checkpointer.restore_latest(_state(0))
    assert step == 1
    _assert_trees_equal(state, _state(1))
    warnings = [r.getMessage() for r in caplog.records if r.name == "jaxreason.train.checkpoint"]
    assert warnings == [f"skipping partial checkpoint {tmp_path / '2.orbax-checkpoint-tmp'}: its save did not finish"]
    checkpointer.save(2, _state(2), {"data_position": 2, "seed": 0}, wait=True)  # the step is free to save
    assert checkpointer.restore_latest(_state(0))[0] == 2
    checkpointer.close()


@pytest.mark.parametrize(
    "like, fragment",
    [
        ({"params": {"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)}, "step": jnp.zeros((), jnp.int32)},
         "params/w: saved (2, 3), run has (3, 3)"),
        ({"params": {"w": jnp.zeros((2, 3))}, "step": jnp.zeros((), jnp.int32)},
         "params/b: saved (3,), run has nothing"),
    ],
)
def test_checkpoint_of_another_shape_is_an_error(tmp_path, like, fragment):
    """Another model config in the same run folder: an error, not a silent restart that overwrites the old run."""
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(4, _state(4), {"data_position": 4, "seed": 0}, wait=True)
    with pytest.raises(ValueError) as e:
        checkpointer.restore_latest(like)
    assert str(e.value).startswith(f"{tmp_path / '4'}: checkpoint does not fit this run ({fragment})")
    assert checkpointer.steps() == [4]
    checkpointer.close()


def test_keep_and_schedule(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=2, keep=2)
    assert [s for s in range(1, 8) if checkpointer.should_save(s)] == [2, 4, 6]
    assert not Checkpointer(tmp_path / "never", save_every=0).should_save(10)
    assert checkpointer.restore_latest(_state(0)) is None  # no checkpoint yet
    for step in (2, 4, 6):
        checkpointer.save(step, _state(step), {"data_position": step, "seed": 0})  # async: no wait
    step, state, _ = checkpointer.restore_latest(_state(0))  # waits for the pending saves
    assert checkpointer.steps() == [4, 6] and step == 6
    _assert_trees_equal(state, _state(6))
    checkpointer.close()


def test_restore_keeps_the_like_tree_and_shardings(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices())
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    like = {"a": jax.device_put(jnp.zeros(16), sharded), "b": (jnp.zeros(2), jnp.zeros((), jnp.int32))}
    saved = {"a": jax.device_put(jnp.arange(16.0), sharded), "b": (jnp.ones(2), jnp.asarray(9, jnp.int32))}
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(5, saved, {"data_position": 5, "seed": 0}, wait=True)
    _, state, _ = checkpointer.restore_latest(like)
    checkpointer.close()
    _assert_trees_equal(state, saved)
    assert isinstance(state["b"], tuple) and state["a"].sharding == sharded


# ---------------------------------------------------------------- SIGTERM


def test_stop_signal_records_sigterm_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested.wait(5)
    assert signal.getsignal(signal.SIGTERM) is previous
