"""Problem sets of reasoning-gym (the `reasoning-gym` package): its generators make the problems and its
scorers judge the answers.

Two ways to name one, with the dataset's own settings as keyword options (its config fields, e.g. chain_sum's
`min_terms`, `max_terms`, `min_digits`, `max_digits`; `seed` and `size` are ours to set):

    get_task("reasoning_gym", dataset="chain_sum", max_terms=4)
    get_task("reasoning_gym/chain_sum", max_terms=4)      # one registered name per dataset in DATASETS

Besides those, `test_fraction` (0.1) and `prompt_template` (by default the GSM8K/MATH tasks': the question, then
an instruction to solve it one step per line ending with "The answer is X", then the step delimiter).

Only the datasets in `DATASETS` are served: arithmetic and math ones whose every gold answer fits one line
"The answer is X" and comes back through `extract_answer` scored 1.0 (others answer with grids or several lines),
and whose scorer rejects a wrong answer (puzzle24's takes any four numbers that make 24, not the puzzle's).

- Problems: one reasoning-gym draw per problem, `create_dataset(dataset, seed=s, size=1)[0]` with `s` drawn from
  a random stream of (dataset, split, seed), so `problems(split, n, seed)` is deterministic and prefix-stable.
  The question keeps reasoning-gym's own wording and instructions, stripped of surrounding space; the entry it
  came from (question, answer, metadata) is `Problem.meta["entry"]`.
- Splits: a question is "test" when a hash of the numbers in it (sorted) falls in the lowest `test_fraction`,
  as in procedural.py but keyed on numbers, so one puzzle under another of reasoning-gym's phrasings (countdown
  has nine) stays in one split. Within a split, questions are de-duplicated by text.
- Checking: `score` extracts our final answer ("The answer is X", see math_answers.py) and returns
  `dataset.score_answer(answer, entry)`; `is_correct` is a score of 1.0. Below 1.0 the scorers give partial
  credit (gsm_symbolic 0.01 for any wrong number), which `score` keeps for rewards that want it.
  countdown scores with sympy's `parse_expr`, which runs `eval`: an answer with anything but digits, spaces and
  + - * / ( ) (or with **, which the puzzle does not allow and which can take forever) scores 0.0 unseen.
- Gold steps: the lines of gsm_symbolic's `answer_cot` without its "#### X" line, when X scores 1.0; the other
  datasets give none, so `solution_steps` is empty. Those steps hold a few non-ASCII signs (•, ×).
"""

from __future__ import annotations

import functools
import random
import re

from jaxreason.tasks.base import Problem, register_task
from jaxreason.tasks.procedural import ProceduralTask, content_id

DATASETS = (
    "basic_arithmetic", "chain_sum", "countdown", "decimal_arithmetic", "decimal_chain_sum",
    "fraction_simplification", "gcd", "gsm_symbolic", "lcm", "leg_counting", "products", "simple_equations",
)
# Datasets whose scorer evaluates the answer as an expression (sympy's parse_expr, i.e. eval).
_EXPRESSION_SCORED = ("countdown",)
_PLAIN_EXPRESSION = re.compile(r"[\d\s+\-*/()]+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def split_key(question: str) -> str:
    """The text whose hash puts `question` in a split: its numbers, sorted (the question itself when it has
    none), so that rewordings of one puzzle share a split."""
    numbers = sorted(_NUMBER.findall(question))
    return " ".join(numbers) if numbers else question


class ReasoningGymTask(ProceduralTask):
    """reasoning-gym's `dataset` (one of `DATASETS`) with `options` for its config, e.g. `max_terms=4`."""

    name = "reasoning_gym"
    prompt_template = 'Question: {question}\nSolve it step by step, one step per line, ending with "The answer is X".\n'
    def __init__(self, dataset: str, test_fraction: float = 0.1, prompt_template: str | None = None, **options):
        super().__init__(test_fraction, prompt_template)
        if dataset not in DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
        if {"seed", "size"} & set(options):
            raise ValueError(f"reasoning_gym/{dataset}: seed and size are set per draw; pass problems(seed=...)")
        # Imported here: reasoning-gym takes about a second to import, and only these tasks need it.
        import reasoning_gym

        self.dataset, self.options = dataset, dict(options)
        self.name = f"reasoning_gym/{dataset}"
        self._create = functools.partial(reasoning_gym.create_dataset, dataset, size=1, **options)
        try:
            self._scorer = self._create(seed=0)
        except (TypeError, ValueError, AssertionError) as error:  # an unknown option; a failed config check
            raise ValueError(f"bad options {options} for reasoning-gym dataset {dataset!r}: {error}") from error

    def split_key(self, question: str) -> str:
        return split_key(question)

    def sample(self, rng: random.Random) -> Problem:
        """One reasoning-gym draw, seeded from `rng`."""
        entry = self._create(seed=rng.getrandbits(32))[0]
        question = entry["question"].strip()
        return Problem(id=content_id(self.name, question), question=question, answer=str(entry["answer"]),
                       solution_steps=self._gold_steps(entry), meta={"dataset": self.dataset, "entry": entry})

    def _gold_steps(self, entry: dict) -> tuple[str, ...]:
        cot = entry["metadata"].get("answer_cot")
        lines = [line.strip() for line in cot.split("\n") if line.strip()] if isinstance(cot, str) else []
        if not lines or not lines[-1].startswith("####"):
            return ()
        *steps, final = lines
        return tuple(steps) if self._scorer.score_answer(final.removeprefix("####").strip(), entry) == 1.0 else ()

    def score(self, problem: Problem, completion: str) -> float:
        """reasoning-gym's score in [0, 1] of the completion's final answer."""
        answer = self.extract_answer(completion)
        if (answer is not None and self.dataset in _EXPRESSION_SCORED
                and (not _PLAIN_EXPRESSION.fullmatch(answer) or "**" in answer)):
            return 0.0
        return float(self._scorer.score_answer(answer, problem.meta["entry"]))

    def is_correct(self, problem: Problem, completion: str) -> bool:
        return self.score(problem, completion) == 1.0


register_task("reasoning_gym", ReasoningGymTask)
for _dataset in DATASETS:
    register_task(f"reasoning_gym/{_dataset}", functools.partial(ReasoningGymTask, _dataset))
