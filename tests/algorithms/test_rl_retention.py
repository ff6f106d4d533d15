"""A finished RL run keeps its weights only (policy and critic), read back as a checkpoint is; `keep_optimizer`
keeps its checkpoints; a run not finished resumes from its checkpoint."""

import json

import jax
import numpy as np
import pytest
import tiny

from jaxreason import sharding
from jaxreason.algorithms.rl_steps import FINISHED, finish_rl_run, restore_rl_state, rl_state
from jaxreason.rl.actor_critic import CriticConfig, CriticTrainer
from jaxreason.rl.trainer import PolicyGradientConfig, PolicyTrainer


def _trainers(seed: int, keep_optimizer: bool = False):
    mesh = sharding.make_mesh(sharding.MeshConfig())
    trainer = PolicyTrainer(tiny.policy(seed), PolicyGradientConfig(keep_optimizer=keep_optimizer), mesh=mesh,
                            num_updates=4, seed=0)
    critic = CriticTrainer(tiny.value_model(seed + 10), CriticConfig(), mesh=mesh, num_updates=4, seed=0)
    return trainer, critic


def _params(trainer, critic):
    return jax.tree.map(np.asarray, [(s.trainable, s.frozen) for s in (trainer.state, critic.state)])


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


@pytest.mark.parametrize("keep_optimizer", [False, True])
def test_a_finished_run_keeps_what_it_is_asked_to(tmp_path, keep_optimizer):
    trainer, critic = _trainers(0, keep_optimizer)
    checkpointer = trainer.checkpointer(tmp_path / "checkpoints")
    checkpointer.save(4, rl_state(trainer, critic), {"step": 4, "seed": 0}, wait=True)
    checkpointer.close()
    finish_rl_run(tmp_path, trainer, critic, step=4, seed=0)
    assert (tmp_path / "checkpoints").exists() == keep_optimizer
    assert (tmp_path / "weights").exists() == (tmp_path / FINISHED).exists() == (not keep_optimizer)

    other, other_critic = _trainers(1, keep_optimizer)  # other starting weights: what is restored must replace them
    assert not _equal(_params(other, other_critic), _params(trainer, critic))
    checkpointer = other.checkpointer(tmp_path / "checkpoints")
    meta = restore_rl_state(checkpointer, other, other_critic)
    checkpointer.close()
    assert meta == {"step": 4, "seed": 0}
    assert _equal(_params(other, other_critic), _params(trainer, critic))
    if not keep_optimizer:
        assert json.loads((tmp_path / FINISHED).read_text()) == {"step": 4, "seed": 0}


def test_an_unfinished_run_resumes_from_its_checkpoint(tmp_path):
    trainer, critic = _trainers(0)
    checkpointer = trainer.checkpointer(tmp_path / "checkpoints")
    assert restore_rl_state(checkpointer, trainer, critic) is None
    checkpointer.save(2, rl_state(trainer, critic), {"step": 2, "seed": 0}, wait=True)
    checkpointer.close()
    other, other_critic = _trainers(1)
    checkpointer = other.checkpointer(tmp_path / "checkpoints")
    assert restore_rl_state(checkpointer, other, other_critic) == {"step": 2, "seed": 0}
    checkpointer.close()
    assert _equal(_params(other, other_critic), _params(trainer, critic))
    assert not (tmp_path / "weights").exists()
