"""Orbax checkpoints of a training run: asynchronous saves every N steps, keep the last K, exact resume.

A checkpoint holds the whole `TrainState` (parameters, optimizer state, step, RNG key) as a flat mapping
of path -> array, plus JSON metadata (the data position and the seed). Orbax writes each step to a
temporary folder and renames it when complete, so a crash mid-save leaves that temporary folder and no step
folder. Both it and a step folder that is unreadable (a truncated file, say) are skipped with a warning
naming them, and the checkpoint before is used.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _flatten(tree) -> tuple[dict[str, Any], Any]:
    """A pytree as {"path/to/leaf": leaf} plus its treedef, so checkpoints are readable and order-free."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}
    return flat, treedef


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50  # steps between saves; 0 saves only at the end and on SIGTERM
    keep: int = 3  # the newest `keep` checkpoints stay on disk
    async_save: bool = True

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError(f"every must be >= 0 and keep >= 1, got every={self.every}, keep={self.keep}")


class Checkpointer:
    """Saves and restores a training state and its metadata under `directory`."""

    @classmethod
    def from_config(cls, directory: str | Path, config: CheckpointConfig) -> Checkpointer:
        return cls(directory, save_every=config.every, keep=config.keep, async_save=config.async_save)

    def __init__(self, directory: str | Path, *, save_every: int = 100, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()},
        )

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state, metadata: dict[str, Any], *, wait: bool = False) -> None:
        """Starts saving `state` at `step`; returns once arrays are copied off device (orbax's async save)."""
        flat, _ = _flatten(state)
        if step in self._manager.all_steps():  # an unreadable one that restore_latest skipped: replace it
            log.warning("replacing checkpoint %s", self.directory / str(step))
            self._manager.delete(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(flat), metadata=ocp.args.JsonSave(metadata)),
            force=True,
        )
        if wait:
            self.wait()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, like) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest readable checkpoint into the structure, shapes and shardings of `like`.

        Returns (step, state, metadata), or None when there is no checkpoint. Partial and unreadable
        checkpoints are skipped with a warning that names them; a readable one that does not fit `like`
        (another model config in the same run folder) is a ValueError, not a silent restart from step 0.
        """
        self.wait()
        for partial in self._partial_saves():
            log.warning("skipping partial checkpoint %s: its save did not finish", partial)
        flat_like, treedef = _flatten(like)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in flat_like.items()}
        for step in reversed(self.steps()):
            path = self.directory / str(step)
            try:
                stored = self._manager.item_metadata(step)["state"]
                if stored is None:
                    raise FileNotFoundError("no readable array metadata")
                stored = {k: tuple(v.shape) for k, v in stored.items()}
            except Exception as e:
                log.warning("skipping unreadable checkpoint %s: %s", path, e)
                continue
            wanted = {k: tuple(v.shape) for k, v in abstract.items()}
            if stored != wanted:
                key = sorted(set(stored) ^ set(wanted) or (k for k in wanted if stored[k] != wanted[k]))[0]
                raise ValueError(
                    f"{path}: checkpoint does not fit this run ({key}: saved {stored.get(key, 'nothing')}, "
                    f"run has {wanted.get(key, 'nothing')}); was it written with another config?"
                )
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # orbax raises many types for damaged files; all mean "skip this one"
                log.warning("skipping unreadable checkpoint %s: %s", path, e)
                continue
            flat = restored["state"]
            state = jax.tree_util.tree_unflatten(treedef, [flat[k] for k in flat_like])
            return step, state, dict(restored["metadata"])
        return None

    def _partial_saves(self) -> list[Path]:
        """Orbax's temporary step folders (`<step>.orbax-checkpoint-tmp`) left by saves cut short."""
        return sorted(self.directory.glob(f"*{ocp.path.step.TMP_DIR_SUFFIX}*"))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_weights(directory: str | Path, tree) -> None:
    """Writes `tree` (a model's state: parameters without optimizer state) to `directory`, synchronously.

    Orbax writes a temporary folder and renames it when complete, so a crash leaves no half-written weights.
    """
    flat, _ = _flatten(tree)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(directory).absolute(), flat, force=True)
        checkpointer.wait_until_finished()


def restore_weights(directory: str | Path, like):
    """The weights `save_weights` wrote to `directory`, in the structure, shapes and shardings of `like`."""
    directory = Path(directory).absolute()
    flat_like, treedef = _flatten(like)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in flat_like.items()}
    with ocp.StandardCheckpointer() as checkpointer:
        stored = {k: tuple(v.shape) for k, v in checkpointer.metadata(directory).item_metadata.items()}
        wanted = {k: tuple(v.shape) for k, v in abstract.items()}
        if stored != wanted:
            key = sorted(set(stored) ^ set(wanted) or (k for k in wanted if stored[k] != wanted[k]))[0]
            raise ValueError(f"{directory}: weights do not fit this model ({key}: saved {stored.get(key, 'nothing')}, "
                             f"model has {wanted.get(key, 'nothing')}); were they written with another config?")
        flat = checkpointer.restore(directory, abstract)
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in flat_like])


class StopSignal:
    """Records SIGTERM (a pre-emption) so the training loop can save a checkpoint before it exits."""

    def __init__(self):
        self.requested = threading.Event()
        self._previous = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
