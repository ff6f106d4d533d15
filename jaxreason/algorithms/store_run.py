"""What every stage of a self-training loop needs, for the loops that keep their samples in a trace store
(ReST-MCTS*, V-STaR): the config, the problems, the tokenizer, the mesh, the stage log and the store.

Problems are numbered by their place in the training pool (each loop's slices, in order); that number is the
trace store's problem_id. `run_with_store` builds the policy, opens the run and always releases the store's
writer lock, also when a stage fails.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxreason import sharding
from jaxreason.algorithms.stages import StageLog, open_run_dir
from jaxreason.config import to_dict
from jaxreason.data.trace_store import TraceStore
from jaxreason.models.spec import build_model
from jaxreason.sampling.prompts import pad_token_id
from jaxreason.tasks.base import Problem, Task
from jaxreason.train.fit import FitConfig


@dataclasses.dataclass
class StoreRun:
    """A loop's run; a loop subclasses it for the slices and store queries of its own stages."""

    config: Any  # the loop's config: policy, problems (task, test), run_dir, seed, mesh
    run_dir: Path
    task: Task
    tokenizer: object
    mesh: jax.sharding.Mesh
    stages: StageLog
    store: TraceStore
    pool: list[Problem]
    test: list[Problem]
    key: jax.Array

    @classmethod
    def open(cls, config, tokenizer, resume: bool, pool_size: int, pool_parts: str):
        """The run folder (`open_run_dir`), the first `pool_size` training problems (fewer is an error naming
        `pool_parts`, the config keys that add up to it), the test problems and the trace store `run_dir/traces`
        (created on the first run), opened for appending."""
        run_dir = open_run_dir(config.run_dir, to_dict(config), resume)
        p = config.problems
        task = p.task.build()
        pool = task.problems("train", n=pool_size, seed=config.seed)
        if len(pool) < pool_size:
            raise ValueError(f"task {p.task.name}: {len(pool)} training problems, the config needs {pool_size} "
                             f"({pool_parts})")
        store_path = run_dir / "traces"
        if not store_path.exists():
            TraceStore.create(store_path).close()
        return cls(config=config, run_dir=run_dir, task=task, tokenizer=tokenizer,
                   mesh=sharding.make_mesh(config.mesh), stages=StageLog(run_dir), store=TraceStore(store_path, "a"),
                   pool=pool, test=task.problems("test", n=p.test, seed=config.seed), key=jax.random.key(config.seed))

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def key_for(self, name: str) -> jax.Array:
        return jax.random.fold_in(self.key, zlib.crc32(name.encode()))

    def train_model(self, name: str, model, objective, examples, config: FitConfig, make_batch,
                    trainable=nnx.Param) -> None:
        """Fits `model` in place on `examples` in stage `name` (`StageLog.train`)."""
        self.stages.train(name, model, objective, examples, config, make_batch, mesh=self.mesh, seed=self.config.seed,
                          trainable=trainable)


def run_with_store(config, open_run: Callable[[Any, object, bool], StoreRun], loop: Callable[[StoreRun, Any], None],
                   resume: bool) -> dict:
    """Builds the policy, opens the run (`open_run(config, tokenizer, resume)`), runs `loop(run, policy)` and
    returns the metrics it wrote to run_dir/metrics.json."""
    policy, tokenizer = build_model(config.policy, config.seed)
    if tokenizer is None:
        raise ValueError(f"{config.policy.pretrained}: no tokenizer beside the weights")
    run = open_run(config, tokenizer, resume)
    try:
        loop(run, policy)
    finally:
        run.store.close()  # releases the writer lock, also when a stage fails
    return json.loads((run.run_dir / "metrics.json").read_text())
