"""rStar (Qi et al. 2024, arXiv 2408.06195): self-play mutual reasoning, training-free.

    for each problem x:
        T  <- MCTS over the five actions from x (generator; `search.rstar`), its finished trajectories with
              their majority confidences
        for each t in T:                                                    (discriminator; `verifiers.discriminator`)
            t is consistent <- a second model, completing t cut at several prefix ratios, reaches t's answer
        answer <- the consistent t of highest confidence (none consistent: the highest of all)

The trajectories are judged best first until each answer is decided (`judge_until_selected`): the same answers
as judging every one, for fewer discriminator tokens. Compared in the same run, on the same problems and
prompt: greedy chain of thought, self-consistency with as many sampled tokens as rStar spent (generator and
discriminator), and the generator's trajectories by majority vote; accuracy against rollouts from the same
trees (a search's first r rollouts are the search with r). Each stage's result is kept in the run folder, so
`--resume` continues at the first unfinished one. In a multi-process job every process runs every stage (the
generator's batches split over all processes' devices, its trees gathered); process 0 writes the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import numpy as np

from jaxreason.algorithms.registry import register_algorithm
from jaxreason.algorithms.rstar_report import write_rstar_report
from jaxreason.algorithms.stages import StageLog, open_run_dir
from jaxreason.config import to_dict
from jaxreason.distributed import is_main_process, sync
from jaxreason.models.spec import ModelSpec, build_model
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import prompt_ids
from jaxreason.search.baselines import draw_solutions
from jaxreason.search.command import VerifierConfig, load_verifier
from jaxreason.search.config import BaselineConfig, Budget
from jaxreason.search.methods import run as run_method
from jaxreason.search.rstar import Trajectory, generate_trajectories
from jaxreason.search.rstar_config import RStarConfig
from jaxreason.search.rstar_method import consistency_check, judge_until_selected, ranked, select
from jaxreason.search.votes import majority_vote
from jaxreason.sharding import MeshConfig, make_mesh
from jaxreason.tasks.base import TaskSpec
from jaxreason.tasks.math_answers import answers_equal
from jaxreason.train.metrics import progress
from jaxreason.verifiers.discriminator import DiscriminatorConfig, check_vocab

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
      verifier: with `verifier.path` (a value-model folder or a run folder, as the search command's), a finished
        trajectory's reward in the generator is that verifier's score instead of its answer's majority confidence.
      judge_per_round: the discriminator judges each problem's trajectories best first, this many per round,
        until its selection is decided (`judge_until_selected`; 0: all at once, as the reference does). The
        selections are the same either way; fewer trajectories are judged.
      mesh: the devices the generator's, the baselines' and the discriminator's batches are split over (the models
        placed by the sharding rules: replicated unless the mesh has fsdp or tensor axes).
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
    judge_per_round: int = 2
    verifier: VerifierConfig = VerifierConfig()
    mesh: MeshConfig = MeshConfig()

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
    verifier = load_verifier(c.verifier, policy)
    run_dir = open_run_dir(c.run_dir, to_dict(c), resume)
    task = c.task.build()
    task.prompt_template = c.generator.prompts.prompt  # every method sees rStar's few-shot prompt
    problems = task.problems(c.split, n=c.num_problems, seed=c.seed)
    stages = StageLog(run_dir)
    key = jax.random.key(c.seed)
    budget = Budget(baseline=BaselineConfig(sampling=c.baseline))
    mesh = make_mesh(c.mesh)

    def greedy():
        r = run_method("greedy", problems, policy=policy, tokenizer=tokenizer, task=task, budget=budget,
                       key=key, chat=c.chat, mesh=mesh)
        return {"correct": r.correct, "tokens": r.generated_tokens.tolist(), "answers": r.answers}

    def generator():
        r = generate_trajectories(problems, policy=policy, tokenizer=tokenizer, task=task, config=c.generator,
                                  key=jax.random.fold_in(key, 1), chat=c.chat, mesh=mesh,
                                  verifier=verifier)
        return {"trajectories": [[dataclasses.asdict(t) for t in ts] for ts in r.trajectories],
                "node_tokens": r.node_tokens.tolist(), "node_calls": r.node_calls.tolist(),
                "node_verifier_tokens": r.node_verifier_tokens.tolist(), "seconds": r.seconds}

    results = {"greedy": stages.run("greedy", greedy)}
    found = stages.run("generator", generator)
    trajectories = [[Trajectory(**t) for t in ts] for ts in found["trajectories"]]

    # Each problem's selection at each rollout count of the curve: its trajectories by generator score.
    rankings = [[ranked(ts, r) for r in _curve_points(c)] for ts in trajectories]

    def discriminator():
        check = consistency_check([task.prompt(p) for p in problems], trajectories, model=judge,
                                  tokenizer=judge_tokenizer, task=task, config=c.discriminator,
                                  key=jax.random.fold_in(key, 2), chat=c.chat, mesh=mesh)
        verdicts = judge_until_selected(rankings, check, c.judge_per_round)
        return [{"problem": i, "trajectory": j, **v} for (i, j), v in sorted(verdicts.items())]

    verdicts = {(v["problem"], v["trajectory"]): v for v in stages.run("discriminator", discriminator)}
    node_tokens, node_calls = np.asarray(found["node_tokens"]), np.asarray(found["node_calls"])
    node_read = np.asarray(found["node_verifier_tokens"])
    curve = [_rstar_at(r, k, problems, trajectories, rankings, verdicts, node_tokens, node_calls, node_read)
             for k, r in enumerate(_curve_points(c))]
    results["rstar"] = curve[-1].pop("answers")  # per problem, each selection rule's answer with all rollouts
    for point in curve[:-1]:
        del point["answers"]
    spent = curve[-1]["tokens_per_question"]["discriminator"]

    def samples():  # self-consistency's pool: max_self_consistency samples per problem
        prompts = [prompt_ids(tokenizer, task.prompt(p), chat=c.chat) for p in problems]
        answers, tokens = [], []
        size = c.generator.batch_size
        with progress(len(problems), description="self-consistency") as bar:
            for start in range(0, len(problems), size):
                drawn = draw_solutions(policy, tokenizer, prompts[start:start + size], c.baseline,
                                       jax.random.fold_in(jax.random.fold_in(key, 3), start), c.max_self_consistency,
                                       mesh)
                answers += [[task.extract_answer(tokenizer.decode(s.tolist(), skip_special_tokens=True)) for s in row]
                            for row in drawn]
                tokens += [[len(s) for s in row] for row in drawn]
                bar.update(len(drawn))
        return {"answers": answers, "tokens": tokens}

    results["self_consistency"] = self_consistency_at(stages.run("samples", samples), problems, spent)
    metrics = _metrics(c, results, curve)
    if is_main_process():  # every process ran every stage; one writes
        (run_dir / "results.json").write_text(json.dumps(
            {"gold": [p.answer for p in problems], **results}, indent=1))
        write_rstar_report(run_dir, to_dict(c), metrics)
    sync("jaxreason:rstar:written")
    return metrics


def self_consistency_at(sampled: dict, problems, spent: float) -> dict:
    """Self-consistency at `spent` generated tokens per question: the majority vote of each problem's first n
    samples, n the most whose mean tokens per question stay within `spent` (at least one)."""
    tokens = np.asarray(sampled["tokens"])  # [P, N]
    n = max(1, int(np.sum(tokens.cumsum(axis=1).mean(axis=0) <= spent)))
    answers = [row[:n][majority_vote(row[:n])] for row in sampled["answers"]]
    correct = [answers_equal(a, p.answer) for a, p in zip(answers, problems)]
    return {"num_samples": n, "answers": answers, "correct": correct, "tokens": tokens[:, :n].sum(axis=1).tolist()}


def _curve_points(c: RStarRunConfig) -> list[int]:
    return sorted(set(c.rollouts_curve) | {c.generator.num_rollouts})


def _rstar_at(rollouts: int, point: int, problems, trajectories, rankings, verdicts, node_tokens,
              node_calls, node_read) -> dict:
    """Generator + majority and generator + discriminator after the first `rollouts` rollouts. The discriminator's
    cost is that of the verdicts its selection reads: its ranking down to the first consistent trajectory."""
    majority, chosen, tokens, calls = [], [], [], []
    answers_by_rule = {"majority": [], "discriminator": []}
    for i, (problem, ts) in enumerate(zip(problems, trajectories)):
        found = [ts[j] for j in sorted(rankings[i][point])]
        answers = [t.answer for t in found]
        vote = answers[majority_vote(answers)] if found else None
        pick, read = select(rankings[i][point], lambda j: verdicts[(i, j)]["consistent"])
        best = None if pick is None else ts[pick]
        read = [verdicts[(i, j)] for j in read]
        answers_by_rule["majority"].append(vote)
        answers_by_rule["discriminator"].append(None if best is None else best.answer)
        majority.append(answers_equal(vote, problem.answer))
        chosen.append(best is not None and answers_equal(best.answer, problem.answer))
        generated = int(node_tokens[i, : rollouts + 1].sum())
        tokens.append((generated, generated + sum(v["tokens"] for v in read)))
        made = int(node_calls[i, : rollouts + 1].sum())
        calls.append((made, made + sum(v["calls"] for v in read)))
    tokens, calls = np.asarray(tokens, float).mean(0), np.asarray(calls, float).mean(0)
    return {"rollouts": rollouts, "majority": float(np.mean(majority)), "discriminator": float(np.mean(chosen)),
            "trajectories_per_question": float(np.mean([len(r[point]) for r in rankings])),
            "tokens_per_question": {"majority": float(tokens[0]), "discriminator": float(tokens[1])},
            "calls_per_question": {"majority": float(calls[0]), "discriminator": float(calls[1])},
            "verifier_tokens_per_question": float(node_read[:, : rollouts + 1].sum(axis=1).mean()),
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
          "calls_per_question": final["calls_per_question"][kind],
          "verifier_tokens_per_question": final["verifier_tokens_per_question"]}
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
