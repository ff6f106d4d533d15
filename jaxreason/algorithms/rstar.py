"""rStar (Qi et al. 2024, arXiv 2408.06195): self-play mutual reasoning, training-free.

    for each problem x:
        T  <- MCTS over the five actions from x (generator; `search.rstar`), its finished trajectories with
              their majority confidences
        for each t in T:                                                    (discriminator; `verifiers.discriminator`)
            t is consistent <- a second model, completing t cut at several prefix ratios, reaches t's answer
        answer <- the consistent t of highest confidence (none consistent: the highest of all)

Compared in the same run, on the same problems and prompt: greedy chain of thought, self-consistency with as
many sampled tokens as rStar spent (generator and discriminator), and the generator's trajectories by majority
vote; accuracy against rollouts from the same trees (a search's first r rollouts are the search with r).
Each stage's result is kept in the run folder, so `--resume` continues at the first unfinished one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import jax
import numpy as np

from jaxreason.algorithms.registry import register_algorithm
from jaxreason.algorithms.rstar_report import write_rstar_report
from jaxreason.algorithms.stages import StageLog, open_run_dir
from jaxreason.config import to_dict
from jaxreason.models.spec import ModelSpec, build_model
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.search.config import BaselineConfig, Budget
from jaxreason.search.methods import run as run_method
from jaxreason.search.rstar import Trajectory, generate_trajectories
from jaxreason.search.rstar_config import RStarConfig
from jaxreason.search.votes import majority_vote
from jaxreason.tasks.base import TaskSpec
from jaxreason.tasks.math_answers import answers_equal
from jaxreason.verifiers.discriminator import Candidate, DiscriminatorConfig, check_consistency, check_vocab

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RStarRunConfig:
    """An rStar evaluation run.

    Attributes:
      policy: the generator.
      discriminator_model: the discriminator (null: the generator's weights, as the paper's default pairing of two
        similar models allows); its tokenizer must be the generator's.
      task, split, num_problems: the problems (the first `num_problems` of the split, chosen by `seed`).
      generator: the MCTS (`RStarConfig`); its prompt is every method's prompt.
      discriminator: masking ratios, agreement rule and sampling of the discriminator.
      baseline: how greedy (at temperature 0, the same max_new_tokens) and self-consistency sample.
      max_self_consistency: the most samples self-consistency may draw to match rStar's tokens.
      rollouts_curve: rollout counts at which accuracy is read off the trees (at most generator.num_rollouts).
    """

    policy: ModelSpec
    discriminator_model: ModelSpec | None = None
    task: TaskSpec = TaskSpec()
    split: str = "test"
    num_problems: int = 16
    run_dir: str = "runs/rstar"
    seed: int = 0
    chat: bool = True
    generator: RStarConfig = RStarConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    baseline: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.8)
    max_self_consistency: int = 64
    rollouts_curve: tuple[int, ...] = (1, 2, 4, 8)

    def __post_init__(self):
        if self.num_problems < 1:
            raise ValueError(f"num_problems must be >= 1, got {self.num_problems}")
        too_many = [r for r in self.rollouts_curve if not 1 <= r <= self.generator.num_rollouts]
        if too_many:
            raise ValueError(f"rollouts_curve: {too_many} outside 1..generator.num_rollouts "
                             f"({self.generator.num_rollouts})")


def run_rstar(config: RStarRunConfig, resume: bool = False) -> dict:
    """Runs (or resumes) the comparison; returns the metrics also written to run_dir/metrics.json."""
    c = config
    policy, tokenizer = build_model(c.policy, c.seed)
    if tokenizer is None:
        raise ValueError(f"{c.policy.pretrained}: no tokenizer beside the weights")
    judge, judge_tokenizer = (policy, tokenizer) if c.discriminator_model is None else build_model(
        c.discriminator_model, c.seed)
    check_vocab(judge_tokenizer, tokenizer)  # before any stage: the discriminator cuts the generator's token ids
    run_dir = open_run_dir(c.run_dir, to_dict(c), resume)
    task = c.task.build()
    task.prompt_template = c.generator.prompts.prompt  # every method sees rStar's few-shot prompt
    problems = task.problems(c.split, n=c.num_problems, seed=c.seed)
    stages = StageLog(run_dir)
    key = jax.random.key(c.seed)
    budget = Budget(baseline=BaselineConfig(sampling=c.baseline))

    def greedy():
        r = run_method("greedy", problems, policy=policy, tokenizer=tokenizer, task=task, budget=budget,
                       key=key, chat=c.chat)
        return {"correct": r.correct, "tokens": r.generated_tokens.tolist(), "answers": r.answers}

    def generator():
        r = generate_trajectories(problems, policy=policy, tokenizer=tokenizer, task=task, config=c.generator,
                                  key=jax.random.fold_in(key, 1), chat=c.chat)
        return {"trajectories": [[dataclasses.asdict(t) for t in ts] for ts in r.trajectories],
                "node_tokens": r.node_tokens.tolist(), "node_calls": r.node_calls.tolist(), "seconds": r.seconds}

    results = {"greedy": stages.run("greedy", greedy)}
    found = stages.run("generator", generator)
    trajectories = [[Trajectory(**t) for t in ts] for ts in found["trajectories"]]

    def discriminator():
        candidates = [Candidate(prompt=task.prompt(p), trajectory=t.text, answer=t.answer)
                      for p, ts in zip(problems, trajectories) for t in ts]
        r = check_consistency(candidates, model=judge, tokenizer=judge_tokenizer, task=task, config=c.discriminator,
                              key=jax.random.fold_in(key, 2), chat=c.chat)
        return {"consistent": r.consistent, "agreeing": r.agreeing, "tokens": r.tokens,
                "calls": [len(x) for x in r.completions]}

    checked = stages.run("discriminator", discriminator)
    per_problem = _split(checked, [len(ts) for ts in trajectories])
    node_tokens, node_calls = np.asarray(found["node_tokens"]), np.asarray(found["node_calls"])
    curve = [_rstar_at(r, problems, trajectories, per_problem, node_tokens, node_calls)
             for r in sorted(set(c.rollouts_curve) | {c.generator.num_rollouts})]
    results["rstar"] = curve[-1].pop("answers")  # per problem, each selection rule's answer with all rollouts
    for point in curve[:-1]:
        del point["answers"]
    spent = curve[-1]["tokens_per_question"]["discriminator"]

    # Self-consistency with rStar's tokens: N samples where N x (greedy's mean length) matches them.
    mean_length = max(float(np.mean(results["greedy"]["tokens"])), 1.0)
    n = int(min(c.max_self_consistency, max(1, math.floor(spent / mean_length))))

    def self_consistency():
        r = run_method("self_consistency", problems, policy=policy, tokenizer=tokenizer, task=task,
                       budget=dataclasses.replace(budget, baseline=dataclasses.replace(budget.baseline, num_samples=n)),
                       key=jax.random.fold_in(key, 3), chat=c.chat)
        return {"correct": r.correct, "tokens": r.generated_tokens.tolist(), "answers": r.answers, "num_samples": n}

    results["self_consistency"] = stages.run("self_consistency", self_consistency)
    metrics = _metrics(c, results, curve)
    (run_dir / "results.json").write_text(json.dumps(
        {"gold": [p.answer for p in problems], **results}, indent=1))
    write_rstar_report(run_dir, to_dict(c), metrics)
    return metrics


def select(trajectories: list[Trajectory], consistent: list[bool]) -> Trajectory | None:
    """The paper's final answer: the consistent trajectory with the highest generator score; with none consistent,
    the highest-scored of all (ties: the earliest found); None with no trajectory."""
    if not trajectories:
        return None
    pool = [t for t, ok in zip(trajectories, consistent) if ok] or trajectories
    return max(pool, key=lambda t: t.score)


def _split(checked: dict, sizes: list[int]) -> list[dict]:
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start:start + size] for k, v in checked.items()})
        start += size
    return out


def _rstar_at(rollouts: int, problems, trajectories, checked, node_tokens, node_calls) -> dict:
    """Generator + majority and generator + discriminator after the first `rollouts` rollouts."""
    majority, chosen, tokens, calls = [], [], [], []
    answers_by_rule = {"majority": [], "discriminator": []}
    for i, (problem, ts, verdict) in enumerate(zip(problems, trajectories, checked)):
        keep = [j for j, t in enumerate(ts) if t.node <= rollouts]
        found = [ts[j] for j in keep]
        answers = [t.answer for t in found]
        vote = answers[majority_vote(answers)] if found else None
        best = select(found, [verdict["consistent"][j] for j in keep])
        answers_by_rule["majority"].append(vote)
        answers_by_rule["discriminator"].append(None if best is None else best.answer)
        majority.append(answers_equal(vote, problem.answer))
        chosen.append(best is not None and answers_equal(best.answer, problem.answer))
        generated = int(node_tokens[i, : rollouts + 1].sum())
        tokens.append((generated, generated + sum(verdict["tokens"][j] for j in keep)))
        made = int(node_calls[i, : rollouts + 1].sum())
        calls.append((made, made + sum(verdict["calls"][j] for j in keep)))
    tokens, calls = np.asarray(tokens, float).mean(0), np.asarray(calls, float).mean(0)
    return {"rollouts": rollouts, "majority": float(np.mean(majority)), "discriminator": float(np.mean(chosen)),
            "trajectories_per_question": float(np.mean([sum(t.node <= rollouts for t in ts) for ts in trajectories])),
            "tokens_per_question": {"majority": float(tokens[0]), "discriminator": float(tokens[1])},
            "calls_per_question": {"majority": float(calls[0]), "discriminator": float(calls[1])},
            "answers": answers_by_rule}


def _metrics(c: RStarRunConfig, results: dict, curve: list[dict]) -> dict:
    final = curve[-1]
    greedy, sc = results["greedy"], results["self_consistency"]
    rows = [
        {"method": "greedy chain of thought", "accuracy": float(np.mean(greedy["correct"])),
         "tokens_per_question": float(np.mean(greedy["tokens"])), "calls_per_question": 1.0},
        {"method": f"self-consistency@{sc['num_samples']}", "accuracy": float(np.mean(sc["correct"])),
         "tokens_per_question": float(np.mean(sc["tokens"])), "calls_per_question": float(sc["num_samples"])},
    ] + [{"method": name, "accuracy": final[kind], "tokens_per_question": final["tokens_per_question"][kind],
          "calls_per_question": final["calls_per_question"][kind]}
         for name, kind in (("rStar generator + majority", "majority"),
                            ("rStar generator + discriminator", "discriminator"))]
    return {"num_problems": c.num_problems, "seed": c.seed, "rollouts": c.generator.num_rollouts, "methods": rows,
            "curve": curve}


def _summary(config: RStarRunConfig, metrics: dict) -> str:
    lines = [f"rstar: {metrics['num_problems']} problems, {metrics['rollouts']} rollouts"]
    lines += [f"  {r['method']:<34} accuracy {r['accuracy']:.3f}  tokens/question {r['tokens_per_question']:.0f}"
              for r in metrics["methods"]]
    return "\n".join(lines + [f"report: {config.run_dir}/report.md"])


register_algorithm("rstar", RStarRunConfig, run_rstar, summarize=_summary)
