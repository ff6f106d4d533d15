"""Problem sets and answer checking: the registry, generated arithmetic and Countdown, GSM8K/MATH files,
reasoning-gym's datasets, HumanEval (graded in a sandbox)."""

from jaxreason.tasks.arith import ArithTask
from jaxreason.tasks.base import STEP_DELIMITER, Problem, Task, TaskSpec, get_task, register_task, task_names
from jaxreason.tasks.countdown import CountdownTask, validate_countdown
from jaxreason.tasks.files import GSM8KTask, MathTask, load_gsm8k, load_math
from jaxreason.tasks.humaneval import HumanEvalTask, load_humaneval
from jaxreason.tasks.math_answers import ANSWER_PREFIX, answers_equal, extract_answer, last_boxed
from jaxreason.tasks.reasoning_gym import ReasoningGymTask

__all__ = [
    "ANSWER_PREFIX", "STEP_DELIMITER", "Problem", "Task", "TaskSpec", "get_task", "register_task", "task_names",
    "answers_equal", "extract_answer", "last_boxed", "ArithTask", "CountdownTask", "validate_countdown",
    "GSM8KTask", "MathTask", "load_gsm8k", "load_math", "ReasoningGymTask", "HumanEvalTask", "load_humaneval",
]
