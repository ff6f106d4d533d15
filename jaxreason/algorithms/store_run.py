"""What every stage of a self-training loop needs, for the loops that keep their samples in a trace store
(ReST-MCTS*, V-STaR): the config, the problems, the tokenizer, the mesh, the stage log and the store.

Problems are numbered by their place in the training pool (each loop's slices, in order); that number is the
trace store's problem_id. `run_with_store` builds the policy, opens the run and always releases the store's
writer lock, also when a stage fails.

Multi-process jobs (one shared run folder): every process runs the same stages and holds the same results;
process 0 alone writes the run folder and is the store's one writer, the others open the store read-only and
read back what it appended (`StoreRun.append`).
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
from jaxreason.data.trace_store import Trace, TraceStore
from jaxreason.distributed import is_main_process, sync
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
        (created on the first run), opened for appending on process 0 and for reading on the others."""
        run_dir = open_run_dir(config.run_dir, to_dict(config), resume)
        p = config.problems
        task = p.task.build()
        pool = task.problems("train", n=pool_size, seed=config.seed)
        if len(pool) < pool_size:
            raise ValueError(f"task {p.task.name}: {len(pool)} training problems, the config needs {pool_size} "
                             f"({pool_parts})")
        stages = StageLog(run_dir)  # read by every process before process 0 can log a stage
        store_path = run_dir / "traces"
        if is_main_process() and not store_path.exists():
            TraceStore.create(store_path).close()
        sync("jaxreason:store_run:store_made")
        store = TraceStore(store_path, "a" if is_main_process() else "r")
        return cls(config=config, run_dir=run_dir, task=task, tokenizer=tokenizer,
                   mesh=sharding.make_mesh(config.mesh), stages=stages, store=store,
                   pool=pool, test=task.problems("test", n=p.test, seed=config.seed), key=jax.random.key(config.seed))

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def key_for(self, name: str) -> jax.Array:
        return jax.random.fold_in(self.key, zlib.crc32(name.encode()))

    def append(self, traces: list[Trace]) -> None:
        """Appends `traces` to the store as one commit, written by process 0; every process calls it with the
        same traces and returns when the rows are committed and in its view of the store."""
        committed = len(self.store)  # the same on every process: each saw every earlier commit
        if self.store.mode == "a":
            self.store.append(traces)
        sync(f"jaxreason:store_run:appended:{committed}+{len(traces)}")
        self.store.refresh()

    def train_model(self, name: str, model, objective, examples, config: FitConfig, make_batch,
                    trainable=nnx.Param) -> None:
        """Fits `model` in place on `examples` in stage `name` (`StageLog.train`)."""
        self.stages.train(name, model, objective, examples, config, make_batch, mesh=self.mesh, seed=self.config.seed,
                          trainable=trainable)


def run_with_store(config, open_run: Callable[[Any, object, bool], StoreRun], loop: Callable[[StoreRun, Any], None],
                   resume: bool) -> dict:
    """Builds the policy, opens the run (`open_run(config, tokenizer, resume)`), runs `loop(run, policy)` and
    returns the metrics it wrote to run_dir/metrics.json (process 0 writes; every process returns them)."""
    policy, tokenizer = build_model(config.policy, config.seed)
    if tokenizer is None:
        raise ValueError(f"{config.policy.pretrained}: no tokenizer beside the weights")
    run = open_run(config, tokenizer, resume)
    try:
        loop(run, policy)
    finally:
        run.store.close()  # releases the writer lock, also when a stage fails
    sync("jaxreason:store_run:finished")  # metrics.json is written
    return json.loads((run.run_dir / "metrics.json").read_text())
