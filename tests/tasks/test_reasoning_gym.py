"""reasoning-gym's datasets behind the Task interface: its problems, its scorers, disjoint seeded splits."""

import pytest

from jaxreason.tasks import Problem, ReasoningGymTask, get_task, task_names
from jaxreason.tasks.reasoning_gym import DATASETS, split_key

REQUIRED = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "countdown")


def test_required_datasets_are_served_under_both_names():
    assert set(REQUIRED) <= set(DATASETS)
    assert {"reasoning_gym", *(f"reasoning_gym/{d}" for d in DATASETS)} <= set(task_names())
    task = get_task("reasoning_gym/chain_sum", min_terms=3, max_terms=3, max_digits=1)
    assert isinstance(task, ReasoningGymTask) and task.name == "reasoning_gym/chain_sum"
    problems = task.problems("train", 10)
    assert all(p.meta["entry"]["metadata"]["num_terms"] == 3 for p in problems)  # options reach reasoning-gym
    assert all(p.id.startswith("reasoning_gym/chain_sum-") for p in problems)
    same = get_task("reasoning_gym", dataset="chain_sum", min_terms=3, max_terms=3, max_digits=1)
    assert same.problems("train", 10) == problems


@pytest.mark.parametrize("dataset", DATASETS)
def test_gold_answer_scores_correct_and_another_problems_does_not(dataset):
    task = get_task(f"reasoning_gym/{dataset}")
    problems = task.problems("train", 6)
    assert len({p.id for p in problems}) == 6
    wrong_checked = 0
    for p, other in zip(problems, problems[1:] + problems[:1]):
        assert p.question and p.answer and p.meta["dataset"] == dataset
        prompt = task.prompt(p)
        assert prompt.startswith(f"Question: {p.question}\n") and prompt.endswith('"The answer is X".\n')
        assert bool(p.solution_steps) == (dataset == "gsm_symbolic")  # the only one with a worked solution
        assert task.is_correct(p, task.format_solution(p.solution_steps, p.answer))
        assert task.score(p, f"The answer is {p.answer}") == 1.0
        if other.answer != p.answer:
            assert task.score(p, f"The answer is {other.answer}") < 1.0
            assert not task.is_correct(p, f"The answer is {other.answer}")
            wrong_checked += 1
    assert wrong_checked


@pytest.mark.parametrize("dataset", REQUIRED)
def test_splits_are_disjoint_deterministic_and_prefix_stable(dataset):
    task = get_task("reasoning_gym", dataset=dataset, test_fraction=0.5)  # 0.5: fewer draws for slow countdown
    train, test = task.problems("train", 6, seed=1), task.problems("test", 3, seed=1)
    assert len(train) == 6 and len(test) == 3
    assert train == get_task("reasoning_gym", dataset=dataset, test_fraction=0.5).problems("train", 6, seed=1)
    assert task.problems("train", 3, seed=1) == train[:3]
    assert {p.question for p in train}.isdisjoint(p.question for p in test)
    assert {split_key(p.question) for p in train}.isdisjoint(split_key(p.question) for p in test)
    assert {p.question for p in task.problems("train", 6, seed=2)} != {p.question for p in train}


def test_rewordings_of_one_puzzle_share_a_split():
    assert split_key("Calculate 309 using all of these numbers: 6, 61, 94, 4.") == split_key(
        "Find a way to make 309 using all of these numbers: 94, 4, 61, 6.")
    assert split_key("no numbers here") == "no numbers here"


def test_gsm_symbolic_gold_steps_are_its_worked_solution_without_the_final_line():
    task = get_task("reasoning_gym/gsm_symbolic")
    for p in task.problems("train", 20):
        cot = p.meta["entry"]["metadata"]["answer_cot"]
        assert cot.rstrip().endswith(f"#### {p.answer}")
        assert all(step in cot and not step.startswith("####") for step in p.solution_steps)
        assert not any(task.is_final_step(step) for step in p.solution_steps)


def test_reasoning_gym_scores_countdown_expressions():
    task = get_task("reasoning_gym/countdown")
    entry = {"question": "Make 31 with 2, 15, 1.", "answer": "2*15 + 1",
             "metadata": {"numbers": [2, 15, 1], "target": 31}}
    problem = Problem("p", entry["question"], entry["answer"], meta={"dataset": "countdown", "entry": entry})
    assert task.is_correct(problem, "2 * 15 = 30\nThe answer is 1 + 15*2.")  # another expression, same numbers
    assert not task.is_correct(problem, "The answer is 15*2")  # a number left out
    assert not task.is_correct(problem, "The answer is 31")
    # Never handed to sympy's parse_expr (eval): ** (which reasoning-gym would take here) and Python code.
    power_entry = {"metadata": {"numbers": [2, 5, 1], "target": 31}}
    power = Problem("q", "", "", meta={"dataset": "countdown", "entry": power_entry})
    assert task.score(power, "The answer is 2**5 - 1") == 0
    assert task.score(problem, "The answer is __import__('os').getcwd()") == 0


def test_partial_credit_is_reasoning_gyms_and_only_1_is_correct():
    task = get_task("reasoning_gym/gsm_symbolic")
    problem = task.problems("train", 1)[0]
    assert task.is_correct(problem, f"The answer is {problem.answer} apples.")
    wrong = f"The answer is {int(problem.answer) + 1}"
    assert task.score(problem, wrong) == 0.01 and not task.is_correct(problem, wrong)
    assert task.score(problem, "no final answer") == 0.0


@pytest.mark.parametrize("dataset", ["nope", "maze"])  # maze is reasoning-gym's, its answers are not one line
def test_unknown_dataset_names_it_and_the_known_ones(dataset):
    with pytest.raises(ValueError, match=rf"unknown reasoning-gym dataset '{dataset}'; known datasets: "
                                         r".*basic_arithmetic.*chain_sum.*countdown.*gsm_symbolic"):
        get_task("reasoning_gym", dataset=dataset)


@pytest.mark.parametrize("options,message", [
    ({"min_terms": 5, "max_terms": 2}, "chain_sum.*max_terms must be >= min_terms"),
    ({"max_digitz": 2}, "chain_sum.*max_digitz"),
    ({"seed": 3}, "seed and size"),
    ({"test_fraction": 1.0}, "test_fraction"),
])
def test_bad_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        get_task("reasoning_gym/chain_sum", **options)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        get_task("reasoning_gym/chain_sum").problems("dev")
