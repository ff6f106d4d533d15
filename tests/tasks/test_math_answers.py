"""Final-answer extraction and answer equivalence (exact, numeric and symbolic through math_verify)."""

import threading

import pytest

from jaxreason.tasks import answers_equal, extract_answer, last_boxed


@pytest.mark.parametrize("text,answer", [
    ("3 + 4 = 7\nThe answer is 7", "7"),
    ("The answer is $1,000.", "$1,000"),
    ("The answer is 3.5.\n", "3.5"),
    ("The answer is: 42", "42"),
    ("the answer is 16 apples.", "16"),
    ("The answer is 3. Then again, the answer is 5.", "5"),  # last occurrence wins
    ("The answer is 2\\sqrt{2}", "2\\sqrt{2}"),
    ("The answer is $\\boxed{12}$.", "12"),
    ("So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces, last wins
    ("$\\boxed 5$", "5"),
    ("\\boxed{7} and \\boxed{unclosed", "7"),
    ("48/2 = 24\n#### 72", "72"),
    ("#### 1\n#### 2", "2"),
    ("\\boxed{3}\n#### 4", "3"),  # boxed comes before ####
    ("#### 4\nThe answer is 5", "5"),  # The answer is comes first
    ("The answer is\n#### 9", "9"),  # an empty answer line is no answer
    ("no final answer here: 12", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_last_boxed():
    assert last_boxed("\\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert last_boxed("no box") is None


@pytest.mark.parametrize("pred,gold", [
    ("7", "7"), ("1,000", "1000"), ("3.0", "3"), ("$5", "5"), ("5.", "5"), ("0.5", "1/2"), ("10,\\!000", "10000"),
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("2\\sqrt{2}", "\\sqrt{8}"), ("\\dfrac{3}{4}", "0.75"),
    ("1+x", "x+1"), ("(x+1)^2", "x^2+2x+1"), ("\\frac{\\pi}{2}", "\\pi/2"),
])
def test_equal_answers(pred, gold):
    assert answers_equal(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    (None, "3"), ("", "3"), ("4", "3"), ("-3", "3"), ("3.01", "3"), ("\\frac{1}{3}", "0.5"),
    ("\\sqrt{2}", "2"), ("x+2", "x+1"), ("((((", "3"), ("\\frac{", "1"), ("apples", "3"), ("1e999999999", "3"),
])
def test_unequal_answers(pred, gold):
    assert not answers_equal(pred, gold)


def test_symbolic_comparison_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(answers_equal("\\frac{1}{2}", "0.5")))
    thread.start()
    thread.join()
    assert results == [True]
