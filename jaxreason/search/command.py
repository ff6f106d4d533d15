"""`python -m jaxreason search --config configs/search/NAME.yaml [key.sub=value ...]`: the comparison table."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax

from jaxreason import sharding
from jaxreason.models.llama import CausalLM
from jaxreason.models.pretrained import VALUE_HEAD_FILE, load_value_model
from jaxreason.models.spec import ModelSpec, build_model
from jaxreason.search.config import Budget
from jaxreason.search.methods import compare, method_names, needs_verifier
from jaxreason.tasks import TaskSpec
from jaxreason.verifiers.base import Verifier, make_verifier


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
    """A trained verifier: `path` is a value-model folder (`save_value_model`), or a training run's folder, whose
    newest exported PRM (`models/prm_<t>`) is taken. None: the methods that need a verifier are not run."""

    path: str | None = None
    kind: str = "prm"  # a registered verifier (`jaxreason.verifiers.verifier_names()`)
    aggregation: str = "last"  # last | min | product


@dataclasses.dataclass(frozen=True)
class SearchCommandConfig:
    policy: ModelSpec
    verifier: VerifierConfig = VerifierConfig()
    task: TaskSpec = TaskSpec()
    split: str = "test"
    num_problems: int = 16  # the split's first problems for `seed`
    methods: tuple[str, ...] = ("greedy", "self_consistency", "best_of_n", "mcts")
    budget: Budget = Budget()
    chat: bool = False  # wrap prompts in the tokenizer's chat template (instruct models)
    seed: int = 0
    output: str = "runs/search/results.json"
    mesh: sharding.MeshConfig = sharding.MeshConfig()  # MCTS splits its batches over these devices

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(method_names())}")


def value_model_folder(path: str | Path) -> Path:
    """The value-model folder `path` names: itself, or a run folder's newest `models/prm_<t>`."""
    path = Path(path)
    if (path / VALUE_HEAD_FILE).exists():
        return path
    stages = sorted((path / "models").glob("prm_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    if not stages:
        raise FileNotFoundError(f"{path}: neither a value-model folder ({VALUE_HEAD_FILE}) nor a run folder with "
                                "exported PRMs (models/prm_<t>)")
    return stages[-1]


def load_verifier(config: VerifierConfig, policy: CausalLM) -> Verifier | None:
    """The trained verifier `config.path` names (None when it names none), computing in `policy`'s dtype and
    rematerialising as it does (the model config's `dtype` and `remat` reach the verifier too)."""
    if config.path is None:
        return None
    model, _ = load_value_model(value_model_folder(config.path), dtype=policy.transformer.dtype)
    model.transformer.remat = policy.transformer.remat
    return make_verifier(config.kind, model, **({"aggregation": config.aggregation} if config.kind == "prm" else {}))


def run_search_command(config: SearchCommandConfig) -> list[dict]:
    policy, tokenizer = build_model(config.policy, config.seed)
    verifier = load_verifier(config.verifier, policy)
    task = config.task.build()
    problems = task.problems(config.split, n=config.num_problems, seed=config.seed)
    runnable = [m for m in config.methods if verifier is not None or not needs_verifier(m)]
    rows = compare(runnable, problems, key=jax.random.key(config.seed), policy=policy, verifier=verifier,
                   tokenizer=tokenizer, task=task, budget=config.budget, chat=config.chat,
                   mesh=sharding.make_mesh(config.mesh))
    rows += [{"method": m, "skipped": "needs a trained verifier: set verifier.path", "problems": len(problems)}
             for m in config.methods if m not in runnable]
    print(format_table(rows))
    print(f"written: {write_json(rows, Path(config.output))}")
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = [f"{'method':<20} {'accuracy':>9} {'gen. tokens':>12} {'verifier tok.':>14} {'wall s':>8}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['method']:<20} not run: {r['skipped']}")
        else:
            lines.append(f"{r['method']:<20} {r['accuracy']:>9.3f} {r['generated_tokens']:>12d} "
                         f"{r['verifier_tokens']:>14d} {r['seconds']:>8.1f}")
    return "\n".join(lines)


def write_json(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=2))
    return path
