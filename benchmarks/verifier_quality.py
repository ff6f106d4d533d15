"""How good must a verifier be? The same policy, samples and search, scored by verifiers of known quality.

    python benchmarks/verifier_quality.py --run runs/rest_mcts_arith_tiny [--iteration 0] [--noise 0,2,4,8]

Takes a ReST-MCTS* run's exported policy and PRM of one iteration (models/policy_<t>, models/prm_<t>) and its
config, and on its held-out problems compares the trained PRM with the task's own process labels blurred by
increasing noise (`TaskCheckVerifier`): each verifier's AUC on correct against incorrect samples, best-of-N,
weighted vote, self-consistency, random pick and pass@N over the same N samples per problem, and MCTS guided by
it (the run's search settings), with generated tokens per problem. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import machine
from rest_mcts_run import held_out

from jaxreason.models.pretrained import load_pretrained, load_value_model
from jaxreason.search import Budget, run
from jaxreason.verifiers import TaskCheckVerifier, ValueVerifier
from jaxreason.verifiers.evaluation import evaluate_verifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a `jaxreason train` run folder (algorithm rest_mcts)")
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("--problems", type=int, default=128, help="held-out problems (the run's first ones)")
    parser.add_argument("--noise", default="0,2,4,8", help="noise levels of the task-check verifier")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    print(machine.header(), flush=True)

    run_dir = Path(args.run)
    config, task, problems = held_out(run_dir, args.problems)
    policy, tokenizer = load_pretrained(run_dir / "models" / f"policy_{args.iteration}")
    prm, _ = load_value_model(run_dir / "models" / f"prm_{args.iteration}")
    ev = config.evaluation
    verifiers = {f"PRM of iteration {args.iteration}": ValueVerifier(prm, aggregation=config.prm_aggregation)}
    for noise in (float(x) for x in args.noise.split(",")):
        verifiers[f"task check, noise {noise:g}"] = TaskCheckVerifier(task, tokenizer, problems, noise=noise)
    budget = Budget(baseline=ev.baseline, mcts=ev.mcts or config.search)
    n = max(ev.verification.sizes)
    rows = []
    for name, verifier in verifiers.items():
        quality = evaluate_verifier(policy, verifier, tokenizer, task, problems, sampling=ev.baseline.sampling,
                                    num_samples=ev.verification.num_samples, sizes=(n,), key=jax.random.key(0),
                                    chat=config.chat)
        search = run("mcts", problems, policy=policy, verifier=verifier, tokenizer=tokenizer, task=task,
                     budget=budget, key=jax.random.key(1), chat=config.chat)
        rows.append({"verifier": name, "auc": quality["auc"], **quality["selection"][str(n)],
                     "tokens_per_sample": quality["tokens_per_sample"], "mcts": search.accuracy,
                     "mcts_tokens_per_problem": search.total_tokens / len(problems)})
        print(f"{name}: done", flush=True)
    print(f"\n{len(problems)} held-out problems, N = {n} samples each "
          f"({n * rows[0]['tokens_per_sample']:.0f} generated tokens per problem); MCTS with the run's search:\n")
    print("| verifier | AUC | best-of-N | weighted vote | self-consistency | random pick | pass@N | MCTS* "
          "(tokens/problem) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['verifier']} | {r['auc']:.3f} | {r['best_of_n']:.3f} | {r['weighted_vote']:.3f} | "
              f"{r['self_consistency']:.3f} | {r['random_pick']:.3f} | {r['pass_at_n']:.3f} | "
              f"{r['mcts']:.3f} ({r['mcts_tokens_per_problem']:.0f}) |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
