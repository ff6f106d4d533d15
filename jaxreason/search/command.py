"""`python -m jaxreason search --config configs/search/NAME.yaml [key.sub=value ...]`: the comparison table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from jaxreason import sharding
from jaxreason.models.spec import ModelSpec, build_model
from jaxreason.models.value_head import ValueModel
from jaxreason.search.run import METHODS, Budget, compare, format_table, write_json
from jaxreason.tasks import get_task


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: str = "arith"
    split: str = "test"
    num_problems: int = 16
    path: str | None = None  # gsm8k / math: the JSONL file


@dataclasses.dataclass(frozen=True)
class SearchCommandConfig:
    policy: ModelSpec
    task: TaskConfig = TaskConfig()
    methods: tuple[str, ...] = ("greedy", "self_consistency", "best_of_n", "mcts")
    budget: Budget = Budget()
    seed: int = 0
    output: str = "runs/search/results.json"
    mesh: sharding.MeshConfig = sharding.MeshConfig()  # MCTS splits its batches over these devices

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")


def run_search_command(config: SearchCommandConfig) -> list[dict]:
    policy, tokenizer = build_model(config.policy, config.seed)
    # Until a trained PRM is given, the verifier is a value head on the policy's own backbone.
    prm = ValueModel(policy.config, backbone=policy.transformer, rngs=nnx.Rngs(config.seed))
    task_kwargs = {"path": config.task.path} if config.task.path else {}
    task = get_task(config.task.name, **task_kwargs)
    problems = task.problems(config.task.split, n=config.task.num_problems, seed=config.seed)
    rows = compare(problems, policy, prm, methods=config.methods, budget=config.budget, tokenizer=tokenizer,
                   task=task, key=jax.random.key(config.seed), mesh=sharding.make_mesh(config.mesh))
    print(format_table(rows))
    print(f"written: {write_json(rows, Path(config.output))}")
    return rows
