"""GSM8K- and MATH-format JSONL loaders and the file-backed tasks."""

import json

import pytest

from jaxreason.tasks import get_task, load_gsm8k, load_math

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A shop sells 40 boxes of 30 pens each. How many pens?",
     "answer": "40 * 30 = <<40*30=1200>>1200 pens.\n#### 1,200"},
]
MATH = [
    {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?",
     "solution": "We add: $\\frac{1}{4} + \\frac{1}{4} = \\frac{2}{4}$.\nSo the sum is $\\boxed{\\frac{1}{2}}$.",
     "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Compute $\\cos 30^\\circ$.",
     "solution": "It is $\\boxed{\\frac{\\sqrt{3}}{2}}$."},
]


def write_jsonl(path, records, extra_lines=()):
    path.write_text("\n".join([json.dumps(r) for r in records] + list(extra_lines)) + "\n")
    return path


def test_load_gsm8k(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps(GSM8K[0]) + "\n\n" + json.dumps(GSM8K[1]) + "\n")
    first, second = load_gsm8k(path)
    assert (first.id, first.answer, second.id, second.answer) == ("gsm.jsonl:1", "72", "gsm.jsonl:3", "1200")
    assert first.question.startswith("Natalia sold clips") and first.question.endswith("April and May?")
    assert first.solution_steps == ("Natalia sold 48/2 = 24 clips in May.",
                                    "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert second.solution_steps == ("40 * 30 = 1200 pens.",)


def test_load_math(tmp_path):
    first, second = load_math(write_jsonl(tmp_path / "math.jsonl", MATH))
    assert first.answer == "\\frac{1}{2}" and second.answer == "\\frac{\\sqrt{3}}{2}"
    assert first.meta == {"level": "Level 1", "type": "Prealgebra"} and second.meta == {}
    assert first.solution_steps[-1] == "So the sum is $\\boxed{\\frac{1}{2}}$."
    assert second.id == "math.jsonl:2"


@pytest.mark.parametrize("loader,records,bad_line,message", [
    (load_gsm8k, GSM8K, '{"question": "x", "answer": ', "malformed JSON"),
    (load_gsm8k, GSM8K, '{"question": "x"}', "missing field 'answer'"),
    (load_gsm8k, GSM8K, '{"question": "x", "answer": "no final answer"}', "####"),
    (load_gsm8k, GSM8K, '["question", "answer"]', "JSON object"),
    (load_math, MATH, '{"problem": "x", "solution": 3}', "must be a string"),
    (load_math, MATH, '{"solution": "\\\\boxed{1}"}', "missing field 'problem'"),
    (load_math, MATH, '{"problem": "x", "solution": "no box"}', "boxed"),
])
def test_bad_lines_name_file_and_line(tmp_path, loader, records, bad_line, message):
    path = write_jsonl(tmp_path / "data.jsonl", records, [bad_line])
    with pytest.raises(ValueError, match=rf"data\.jsonl:3: .*{message}"):
        loader(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gsm8k(tmp_path / "absent.jsonl")


def test_gsm8k_task_checks_answers(tmp_path):
    task = get_task("gsm8k", path=write_jsonl(tmp_path / "gsm.jsonl", GSM8K))
    first, second = task.problems("test")
    assert task.prompt(first).startswith("Question: Natalia") and task.prompt(first).endswith("\n")
    assert task.is_correct(first, "24 in May\n24 + 48 = 72\nThe answer is 72.")
    assert task.is_correct(second, "Total is $1,200.\n#### 1,200")
    assert not task.is_correct(first, "The answer is 71")
    assert not task.is_correct(first, "no final answer 72")


def test_math_task_checks_equivalent_answers(tmp_path):
    task = get_task("math", path=write_jsonl(tmp_path / "math.jsonl", MATH))
    first, second = task.problems("test")
    assert task.is_correct(first, "Adding gives $\\boxed{0.5}$.")
    assert task.is_correct(second, "The answer is \\frac{1}{2}\\sqrt{3}")
    assert not task.is_correct(second, "The answer is \\frac{1}{2}")


def test_splits_and_sampling(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GSM8K)
    test = write_jsonl(tmp_path / "test.jsonl", GSM8K[1:])
    task = get_task("gsm8k", splits={"train": train, "test": test})
    assert len(task.problems("train")) == 2 and len(task.problems("test")) == 1
    assert task.problems("train", n=1, seed=0) == task.problems("train", n=1, seed=0)
    assert {p.id for s in range(10) for p in task.problems("train", n=1, seed=s)} == {"train.jsonl:1", "train.jsonl:2"}
    with pytest.raises(ValueError, match="no file for split 'dev'"):
        task.problems("dev")
    with pytest.raises(ValueError, match="asked for 3"):
        task.problems("train", n=3)
    with pytest.raises(ValueError, match="path="):
        get_task("math")
