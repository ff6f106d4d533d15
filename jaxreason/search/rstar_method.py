"""rStar as a test-time method: the generator's trajectories (`search.rstar`), the mutual-consistency
discriminator's verdicts on just those the selection needs, and the paper's final choice, the consistent
trajectory of highest generator score (Qi et al. 2024, arXiv 2408.06195, section 3.3).

`rstar` is registered as the test-time method "rstar" (its settings: `Budget.rstar` and `Budget.discriminator`);
the `rstar` training algorithm (`algorithms.rstar`) shares `select`, `ranked` and `judge_until_selected`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxreason.search.config import Budget
from jaxreason.search.methods import MethodResult, register_method
from jaxreason.search.rstar import Trajectory, generate_trajectories
from jaxreason.tasks.base import Problem
from jaxreason.verifiers.discriminator import Candidate, check_consistency

JUDGE_PER_ROUND = 2  # trajectories judged per undecided selection and round: fewer judged, the same selections


def ranked(trajectories: list[Trajectory], rollouts: int) -> list[int]:
    """Indices of the trajectories the first `rollouts` rollouts found, highest generator score first (ties: the
    earliest found)."""
    found = [j for j, t in enumerate(trajectories) if t.node <= rollouts]
    return sorted(found, key=lambda j: -trajectories[j].score)


def select(ranking: list[int], consistent: Callable[[int], bool]) -> tuple[int | None, list[int]]:
    """The paper's final answer among trajectories ranked by generator score (best first): the first consistent
    one (`consistent(j)`); with none consistent, the generator's best; None with no trajectory. Also returns the
    trajectories whose verdicts it read."""
    read = []
    for j in ranking:
        read.append(j)
        if consistent(j):
            return j, read
    return (ranking[0] if ranking else None), read


def judge_until_selected(rankings: list[list[list[int]]], check, per_round: int) -> dict[tuple[int, int], dict]:
    """The discriminator's verdicts on just the trajectories the selections need.

    `rankings[i]` holds problem i's selections, each its trajectories' indices best first; a selection is the
    first consistent one of its ranking, so the trajectories ranked below it never need a verdict. Each round
    judges, for every selection not yet decided, its next `per_round` unjudged trajectories (0: all of them), all
    problems in one `check(pairs) -> verdicts` call. The selections are those of judging every trajectory.
    """
    verdicts: dict[tuple[int, int], dict] = {}
    while True:
        todo = {}
        for i, selections in enumerate(rankings):
            for ranking in selections:
                pending = []
                for j in ranking:
                    if (i, j) not in verdicts:
                        pending.append((i, j))
                        if len(pending) == per_round:
                            break
                    elif verdicts[(i, j)]["consistent"]:
                        break
                todo.update(dict.fromkeys(pending))
        if not todo:
            return verdicts
        verdicts.update(zip(todo, check(list(todo))))


def consistency_check(prompts: Sequence[str], trajectories: list[list[Trajectory]], *, model, tokenizer, task,
                      config, key: jax.Array, chat: bool, mesh=None):
    """`check(pairs)` for `judge_until_selected`: the discriminator `model` on trajectory j of problem i (whose
    prompt text is `prompts[i]`) for each (i, j); a verdict is {consistent, agreeing, tokens, calls}. Each
    trajectory's completions draw from its own index, so a verdict does not depend on the round it is judged in.
    With `mesh`, the completions are split over it (`check_consistency`)."""
    flat = {(i, j): n for n, (i, j) in enumerate((i, j) for i, ts in enumerate(trajectories) for j in range(len(ts)))}

    def check(pairs):
        r = check_consistency([Candidate(prompt=prompts[i], trajectory=trajectories[i][j].text,
                                         answer=trajectories[i][j].answer) for i, j in pairs],
                              model=model, tokenizer=tokenizer, task=task, config=config, key=key, chat=chat,
                              ids=[flat[p] for p in pairs], mesh=mesh)
        return [{"consistent": ok, "agreeing": a, "tokens": t, "calls": len(x)}
                for ok, a, t, x in zip(r.consistent, r.agreeing, r.tokens, r.completions)]

    return check


def rstar(problems: Sequence[Problem], *, policy, verifier=None, tokenizer, task, budget: Budget, key: jax.Array,
          chat: bool = False, mesh=None) -> MethodResult:
    """rStar with the policy as generator and discriminator: `budget.rstar.num_rollouts` rollouts per problem, the
    prompt `budget.rstar.prompts.prompt`. A problem's generated tokens are its tree's plus the discriminator's for
    the verdicts its selection read. A problem with no finished trajectory answers None. The generator and the
    discriminator draw from `key` as the `rstar` algorithm's do from its seed's key, so both pick alike."""
    started = time.perf_counter()
    config = budget.rstar
    found = generate_trajectories(problems, policy=policy, tokenizer=tokenizer, task=task, config=config,
                                  key=jax.random.fold_in(key, 1), chat=chat, mesh=mesh)
    rankings = [[ranked(ts, config.num_rollouts)] for ts in found.trajectories]
    prompts = [config.prompts.prompt.format(question=p.question) for p in problems]
    verdicts = judge_until_selected(rankings, consistency_check(
        prompts, found.trajectories, model=policy, tokenizer=tokenizer, task=task, config=budget.discriminator,
        key=jax.random.fold_in(key, 2), chat=chat, mesh=mesh), JUDGE_PER_ROUND)
    completions, answers, judged = [], [], []
    for i, ts in enumerate(found.trajectories):
        pick, read = select(rankings[i][0], lambda j, i=i: verdicts[(i, j)]["consistent"])
        completions.append("" if pick is None else ts[pick].text)
        answers.append(None if pick is None else ts[pick].answer)
        judged.append(sum(verdicts[(i, j)]["tokens"] for j in read))
    return MethodResult(method="rstar", completions=completions, answers=answers,
                        correct=task.check_many(problems, completions),
                        generated_tokens=found.node_tokens.sum(axis=1) + np.asarray(judged, np.int64),
                        verifier_tokens=found.node_verifier_tokens.sum(axis=1),
                        seconds=time.perf_counter() - started)


register_method("rstar", rstar, needs_verifier=False)
