"""rStar's comparison run end to end on a tiny model that has memorised its problems: the run folder and its four
rows, resume, gold answers that never reach generation or selection, and the errors a config can make."""

import json

import jax
import numpy as np
import pytest
import tiny
from tiny import TOKENIZER

from jaxreason import search
from jaxreason.algorithms import rstar
from jaxreason.algorithms.registry import load_algorithm_config
from jaxreason.algorithms.rstar import run_rstar
from jaxreason.cli import main
from jaxreason.models.char_tokenizer import DEFAULT_ALPHABET, build_char_tokenizer
from jaxreason.models.pretrained import save_pretrained, save_value_model
from jaxreason.models.spec import build_model
from jaxreason.search import rstar_method
from jaxreason.search.config import Budget
from jaxreason.search.rstar_method import judge_until_selected, select
from jaxreason.tasks import ArithTask

CONFIG = "configs/rstar/smollm2_arith.yaml"
OPTIONS = {"min_ops": 1, "max_ops": 1, "max_operand": 12, "max_factor": 6}
TASK = ArithTask(**OPTIONS)
NUM_PROBLEMS = 3
SHORT = [
    "chat=false", f"num_problems={NUM_PROBLEMS}", "task.options={" + ", ".join(f"{k}: {v}" for k, v in OPTIONS.items())
    + "}", 'generator.prompts.prompt="Q: {question}\\n"', "generator.num_rollouts=2", "generator.num_votes=2",
    "generator.step_tokens=16", "generator.answer_tokens=16", "generator.solution_tokens=32",
    "generator.batch_size=2", "discriminator.sampling.max_new_tokens=32", "discriminator.batch_size=16",
    "baseline.max_new_tokens=32", "max_self_consistency=4", "rollouts_curve=[1, 2]",
]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A Hugging Face folder of the tiny model trained on the run's problems until it reproduces their gold
    solutions: its answers are mostly right, so accuracy can move when the gold answers do."""
    model = tiny.memorise(tiny.policy(seed=3), TOKENIZER, TASK, TASK.problems("test", n=NUM_PROBLEMS, seed=0),
                          steps=200)
    return str(save_pretrained(model, TOKENIZER, tmp_path_factory.mktemp("memorised") / "model"))


def _args(folder, run_dir, *extra):
    return [*SHORT, f"policy.pretrained={folder}", f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def finished(memorised, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rstar") / "run"
    main(["train", "--config", CONFIG, *_args(memorised, run_dir)])
    return run_dir


def _stages(run_dir):
    stages = json.loads((run_dir / "stages.json").read_text())
    stages["generator"].pop("seconds")  # wall time
    return stages


def test_run_writes_the_papers_table(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    rows = {r["method"]: r for r in metrics["methods"]}
    assert set(rows) == {"greedy chain of thought", "self-consistency@4", "rStar generator + majority",
                         "rStar generator + discriminator"}
    assert rows["greedy chain of thought"]["accuracy"] == 1.0  # the memorised solutions
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and row["tokens_per_question"] > 0 and row["calls_per_question"] >= 1
    gen, disc = rows["rStar generator + majority"], rows["rStar generator + discriminator"]
    assert disc["tokens_per_question"] > gen["tokens_per_question"]  # the discriminator's completions
    # one completion per ratio of each answered trajectory the selection read (best first, to a consistent one)
    verdicts = _stages(finished)["discriminator"]
    assert {v["calls"] for v in verdicts} <= {0, 4} and len(verdicts) <= sum(map(len, _trajectories(finished)))
    assert 0 < disc["calls_per_question"] - gen["calls_per_question"] <= 4 * _answered(finished)
    assert [p["rollouts"] for p in metrics["curve"]] == [1, 2]
    report = (finished / "report.md").read_text()
    assert all(name in report for name in rows) and "accuracy_vs_rollouts.png" in report
    assert (finished / "accuracy_vs_rollouts.png").stat().st_size > 0


def _trajectories(run_dir) -> list[list[dict]]:
    return _stages(run_dir)["generator"]["trajectories"]


def _answered(run_dir) -> float:
    """Trajectories with an answer per question."""
    found = _trajectories(run_dir)
    return sum(t["answer"] is not None for ts in found for t in ts) / len(found)


def test_resume_reads_every_stage_back(finished, memorised, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(rstar, "generate_trajectories", fail)
    monkeypatch.setattr(rstar_method, "check_consistency", fail)
    monkeypatch.setattr(rstar, "run_method", fail)
    monkeypatch.setattr(rstar, "draw_solutions", fail)
    _, config = load_algorithm_config(CONFIG, _args(memorised, finished))
    assert run_rstar(config, resume=True) == json.loads((finished / "metrics.json").read_text())


def test_gold_answers_reach_only_the_accuracy(finished, memorised, tmp_path, monkeypatch):
    """Problems whose gold answers are wrong: every sample, trajectory, score, verdict and chosen answer is the
    same as with the right ones; only the accuracies fall."""
    real = ArithTask.problems

    def wrong_gold(self, *args, **kwargs):
        return [p.__class__(p.id, p.question, str(int(p.answer) + 1000), p.solution_steps, p.meta)
                for p in real(self, *args, **kwargs)]

    monkeypatch.setattr(ArithTask, "problems", wrong_gold)
    main(["train", "--config", CONFIG, *_args(memorised, tmp_path / "run")])
    right, wrong = _stages(finished), _stages(tmp_path / "run")
    assert right["generator"] == wrong["generator"] and right["discriminator"] == wrong["discriminator"]
    assert right["samples"] == wrong["samples"]
    assert right["greedy"]["answers"] == wrong["greedy"]["answers"] and not any(wrong["greedy"]["correct"])
    chosen = [json.loads((d / "results.json").read_text()) for d in (finished, tmp_path / "run")]
    assert chosen[0]["rstar"] == chosen[1]["rstar"]  # each selection rule's answers
    assert chosen[0]["self_consistency"]["answers"] == chosen[1]["self_consistency"]["answers"]
    accuracy = [{r["method"]: r["accuracy"] for r in json.loads((d / "metrics.json").read_text())["methods"]}
                for d in (finished, tmp_path / "run")]
    assert accuracy[0]["greedy chain of thought"] == 1.0 and not any(accuracy[1].values())
    assert accuracy[0]["rStar generator + discriminator"] > 0


def test_the_test_time_method_picks_what_the_run_picks(finished, memorised):
    """`search.run("rstar")` (the scaling study's rStar) is the run's generator + discriminator at all rollouts:
    the same answers, and its tokens those of the tree plus the verdicts the selection read."""
    _, config = load_algorithm_config(CONFIG, _args(memorised, finished))
    policy, tokenizer = build_model(config.policy, config.seed)
    task = config.task.build()
    result = search.run("rstar", task.problems("test", n=NUM_PROBLEMS, seed=config.seed), policy=policy,
                        tokenizer=tokenizer, task=task, budget=Budget(rstar=config.generator,
                                                                      discriminator=config.discriminator),
                        key=jax.random.key(config.seed), chat=config.chat)
    picked = json.loads((finished / "results.json").read_text())["rstar"]["discriminator"]
    assert result.answers == picked
    final = json.loads((finished / "metrics.json").read_text())["curve"][-1]
    assert result.generated_tokens.mean() == pytest.approx(final["tokens_per_question"]["discriminator"])
    assert result.generated_tokens.mean() > final["tokens_per_question"]["majority"]  # the verdicts read
    assert result.accuracy == final["discriminator"]


def test_select_reads_the_ranking_down_to_the_first_consistent():
    consistent = {0: False, 1: True, 2: True}.__getitem__
    assert select([0, 2, 1], consistent) == (2, [0, 2])
    assert select([0], consistent) == (0, [0])  # none consistent: the generator's best
    assert select([], consistent) == (None, [])


def test_lazy_judging_selects_as_judging_everything():
    """Random rankings and verdicts: the rounds judge a subset, and every selection equals the one made with
    every verdict known."""
    rng = np.random.default_rng(0)
    for per_round in (0, 1, 2, 3):
        for _ in range(20):
            sizes = rng.integers(0, 7, size=4)
            truth = {(i, j): bool(rng.random() < 0.3) for i, n in enumerate(sizes) for j in range(n)}
            rankings = [[list(rng.permutation(n)[: rng.integers(0, n + 1)]) for _ in range(2)] + [list(range(n))]
                        for n in sizes]
            calls = []

            def check(pairs):
                calls.append(pairs)
                return [{"consistent": truth[p]} for p in pairs]

            verdicts = judge_until_selected(rankings, check, per_round)
            assert len({p for c in calls for p in c}) == sum(len(c) for c in calls)  # nothing judged twice
            for i, selections in enumerate(rankings):
                for ranking in selections:
                    assert select(ranking, lambda j: verdicts[(i, j)]["consistent"]) == \
                        select(ranking, lambda j: truth[(i, j)])
            if per_round == 0:
                assert len(calls) <= 1


def test_config_errors_name_the_problem(memorised, tmp_path):
    swapped = build_char_tokenizer("10" + DEFAULT_ALPHABET[2:])
    other = str(save_pretrained(tiny.policy(), swapped, tmp_path / "other"))
    judge = f"discriminator_model={{pretrained: {other}}}"
    _, config = load_algorithm_config(CONFIG, _args(memorised, tmp_path / "run", judge))
    with pytest.raises(ValueError, match="discriminator tokenizer differs from the generator's"):
        run_rstar(config)
    with pytest.raises(ValueError, match=r"no '\{question\}' placeholder"):
        load_algorithm_config(CONFIG, ["generator.prompts.prompt='Solve it.'"])
    with pytest.raises(ValueError, match="'step' with no valid action"):
        load_algorithm_config(CONFIG, ["generator.allowed_after={root: [step]}"])
    with pytest.raises(ValueError, match=r"rollouts_curve: \[16\] outside"):
        load_algorithm_config(CONFIG, ["rollouts_curve=[2, 16]"])


@pytest.mark.parametrize("name", ["smollm2_arith.yaml", "gsm8k.yaml"])
def test_shipped_configs_load(name):
    algorithm, config = load_algorithm_config(f"configs/rstar/{name}")
    assert algorithm.name == "rstar" and config.generator.prompts.prompt.endswith("Q: {question}\n")
    assert config.generator.allowed_after == rstar.RStarConfig().allowed_after  # the paper's table


def test_a_trained_verifier_can_replace_the_majority_reward(memorised, tmp_path):
    folder = save_value_model(tiny.value_model(seed=4), tmp_path / "orm", tokenizer=TOKENIZER)
    metrics = run_rstar(load_algorithm_config(CONFIG, _args(memorised, tmp_path / "run", f"verifier.path={folder}",
                                                            "verifier.kind=orm"))[1])
    rows = {r["method"]: r for r in metrics["methods"]}
    assert rows["rStar generator + discriminator"]["verifier_tokens_per_question"] > 0
    assert rows["greedy chain of thought"].get("verifier_tokens_per_question", 0) == 0
    found = json.loads((tmp_path / "run" / "stages.json").read_text())["generator"]["trajectories"]
    scores = [t["score"] for ts in found for t in ts]
    # a random head's values, not the vote shares 0, 1/2, 1 of two votes
    assert scores and any(s not in (0.0, 0.5, 1.0) for s in scores)
    assert "verifier tokens / question" in (tmp_path / "run" / "report.md").read_text()


def test_the_gsm8k_config_takes_reasoning_gym_word_problems_without_files():
    _, config = load_algorithm_config("configs/rstar/gsm8k.yaml", ["task={name: reasoning_gym/gsm_symbolic}"])
    problems = config.task.build().problems(config.split, n=2, seed=0)
    assert len(problems) == 2 and all(p.question and p.answer for p in problems)
    assert config.generator.prompts.prompt.format(question=problems[0].question).endswith(problems[0].question + "\n")
