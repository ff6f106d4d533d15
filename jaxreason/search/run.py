"""One entry point for test-time methods, and the `python -m jaxreason search` comparison table.

`run(problems, policy, prm, method=..., budget=...)` dispatches to MCTS or a baseline; `compare` runs several
methods on the same problems and reports accuracy, generated tokens and wall time for each.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
from jax.sharding import Mesh

from jaxreason.models.llama import CausalLM
from jaxreason.models.value_head import ValueModel
from jaxreason.search.baselines import BASELINES, BaselineConfig, MethodResult, run_baseline
from jaxreason.search.mcts import MCTSConfig, mcts
from jaxreason.tasks.base import Problem, Task

METHODS = ("mcts", *BASELINES)


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much each method may spend: samples for the baselines, simulations x K for MCTS."""

    baseline: BaselineConfig = BaselineConfig()
    mcts: MCTSConfig = MCTSConfig()


def run(
    problems: Sequence[Problem],
    policy: CausalLM,
    prm: ValueModel | None,
    *,
    method: str,
    budget: Budget,
    tokenizer,
    task: Task,
    key: jax.Array,
    mesh: Mesh | None = None,
) -> MethodResult:
    """Solves `problems` with one method ("mcts" or a name in `BASELINES`); MCTS splits its batches over `mesh`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "mcts":
        if prm is None:
            raise ValueError("method 'mcts' needs a PRM")
        return mcts(policy, prm, tokenizer, task, problems, budget.mcts, key, mesh=mesh)[0]
    return run_baseline(method, policy, tokenizer, task, problems, budget.baseline, key, verifier=prm)


def compare(problems, policy, prm, *, methods: Sequence[str], budget: Budget, tokenizer, task, key,
            mesh: Mesh | None = None) -> list[dict]:
    """Rows of {method, accuracy, generated_tokens, seconds} for each method on the same problems."""
    rows = []
    for i, method in enumerate(methods):
        result = run(problems, policy, prm, method=method, budget=budget, tokenizer=tokenizer, task=task,
                     key=jax.random.fold_in(key, i), mesh=mesh)
        rows.append({"method": method, "accuracy": result.accuracy, "generated_tokens": result.total_tokens,
                     "seconds": round(result.seconds, 3), "problems": len(problems)})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = [f"{'method':<20} {'accuracy':>9} {'gen. tokens':>12} {'wall s':>8}"]
    for r in rows:
        lines.append(f"{r['method']:<20} {r['accuracy']:>9.3f} {r['generated_tokens']:>12d} {r['seconds']:>8.1f}")
    return "\n".join(lines)


def write_json(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=2))
    return path
