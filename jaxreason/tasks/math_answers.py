"""Final-answer extraction from free-form solutions, and answer equivalence.

Extraction looks, in order, for the last "The answer is X" (X runs to the end of its line or sentence), the
last `\\boxed{X}` and the last "#### X".
Equivalence tries exact and numeric comparison first (cheap, and decisive when both sides are numbers), then
symbolic comparison with math_verify (e.g. `\\frac{1}{2}` == `0.5`, `2\\sqrt{2}` == `\\sqrt{8}`).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from fractions import Fraction

from math_verify import parse, verify
from math_verify.errors import TimeoutException

ANSWER_PREFIX = "The answer is "

_ANSWER_PHRASE = re.compile(r"the answer is", re.IGNORECASE)
_HASHES_LINE = re.compile(r"####[ \t]*([^\n]*)")
# A number followed by words ("16 apples") is cut to the number; a number followed by LaTeX is kept whole.
_NUMBER_THEN_WORDS = re.compile(r"^(\$?-?[\d,]*\.?\d+)\s+[A-Za-z]")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
# Plain decimals and fractions only: Fraction("1e999999999") would take forever.
_PLAIN_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)(/\d+)?")
_BOXED = "\\boxed"

_log = logging.getLogger(__name__)


def extract_answer(text: str) -> str | None:
    """The final answer in `text`, or None when it states none."""
    for extract in (_answer_line, last_boxed, _hashes_line):
        answer = extract(text)
        if answer:
            return answer
    return None


def _answer_line(text: str) -> str | None:
    for match in reversed(list(_ANSWER_PHRASE.finditer(text))):
        # The answer runs to the end of its line or sentence ("The answer is 3. So ...").
        answer = _trim(text[match.end():].split("\n", 1)[0].split(". ", 1)[0].lstrip(":"))
        if _BOXED in answer:
            answer = last_boxed(answer) or answer
        number = _NUMBER_THEN_WORDS.match(answer)
        if number:
            answer = number.group(1)
        if answer:
            return answer
    return None


def _hashes_line(text: str) -> str | None:
    matches = [_trim(m.group(1)) for m in _HASHES_LINE.finditer(text)]
    return next((m for m in reversed(matches) if m), None)


def _trim(answer: str) -> str:
    return answer.strip().rstrip(".").strip()


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (nested braces allowed) or `\\boxed X`; None if there is none."""
    start = text.rfind(_BOXED)
    while start >= 0:
        rest = text[start + len(_BOXED):]
        if rest.startswith("{"):
            depth = 0
            for i, ch in enumerate(rest):
                depth += {"{": 1, "}": -1}.get(ch, 0)
                if depth == 0:
                    return rest[1:i].strip()
        elif rest[:1].isspace():
            # "\boxed 5": the argument is the next whitespace- or $-delimited token.
            token = re.match(r"\s+([^\s$]+)", rest)
            if token:
                return token.group(1)
        start = text.rfind(_BOXED, 0, start)  # unbalanced: look at the previous one
    return None


def normalize_answer(answer: str) -> str:
    """Drops what never changes an answer's value: surrounding space, a final period, "$" (currency or
    math delimiters), LaTeX thin spaces and thousands separators."""
    answer = _trim(answer).replace("$", "").replace("\\!", "").strip()
    if _THOUSANDS.match(answer):
        answer = answer.replace(",", "")
    return answer


def _as_number(answer: str) -> Fraction | None:
    if not _PLAIN_NUMBER.fullmatch(answer):
        return None
    try:
        return Fraction(answer)
    except ZeroDivisionError:
        return None


def answers_equal(pred: str | None, gold: str, timeout_s: int = 3) -> bool:
    """Whether the predicted answer equals the gold one; anything unparseable or too slow is not equal.

    math_verify's time limit uses SIGALRM, which only works in the main thread; elsewhere it runs unlimited.
    """
    if pred is None:
        return False
    pred, gold = normalize_answer(pred), normalize_answer(gold)
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    pred_number, gold_number = _as_number(pred), _as_number(gold)
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed, pred_parsed = _parse(gold, limit), _parse(pred, limit)
        if not gold_parsed or not pred_parsed:
            return False
        return verify(list(gold_parsed), list(pred_parsed), timeout_seconds=limit)
    except (Exception, TimeoutException):
        _log.debug("math_verify failed on %r vs %r", pred, gold, exc_info=True)
        return False


@functools.lru_cache(maxsize=4096)
def _parse(answer: str, timeout_s: int | None) -> tuple:
    # "$...$" tells math_verify the answer is LaTeX; bare LaTeX such as 2\sqrt{2} is otherwise misread.
    return tuple(parse(f"${answer}$", parsing_timeout=timeout_s))
