"""rStar's generator settings: the five actions' prompt cues, their validity table and the search's sizes.

The five actions (Qi et al. 2024, arXiv 2408.06195, section 3.2) and their names here:

    A1 "step"         propose one next step
    A2 "finish"       complete the rest of the solution in one go (n samples; the majority answer)
    A3 "subquestion"  propose the next sub-question and answer it (the majority of v sampled answers)
    A4 "reanswer"     answer the last sub-question again (v samples; the majority)
    A5 "rephrase"     rephrase the question as a list of its conditions
"""

from __future__ import annotations

import dataclasses

from jaxreason.search.actions import ROOT, ActionSpace, ActionType

STEP, FINISH, SUBQUESTION, REANSWER, REPHRASE = "step", "finish", "subquestion", "reanswer", "rephrase"
ACTIONS = (STEP, FINISH, SUBQUESTION, REANSWER, REPHRASE)

# The paper's order constraints: the root takes A1, A2, A3, A5; after A5: A1, A2, A3; after A3: A1 to A4;
# after A4: A1, A2, A3; after A1: A1, A2; A2 ends the trajectory.
PAPER_ALLOWED_AFTER = {
    ROOT: (STEP, FINISH, SUBQUESTION, REPHRASE),
    REPHRASE: (STEP, FINISH, SUBQUESTION),
    SUBQUESTION: (STEP, FINISH, SUBQUESTION, REANSWER),
    REANSWER: (STEP, FINISH, SUBQUESTION),
    STEP: (STEP, FINISH),
}

ARITH_PROMPT = (
    "Solve the problem. Write one operation per line, then 'The answer is N'. You may first restate the problem's "
    "conditions, or ask and answer a simpler sub-question.\n\n"
    "Q: What is 4 + 6 * 2?\n"
    "Conditions: add 4 to the product of 6 and 2.\n"
    "Question: What is 6 * 2?\nAnswer: 6 * 2 = 12\n"
    "4 + 12 = 16\n"
    "The answer is 16\n\n"
    "Q: What is 15 - 3 + 8?\n"
    "15 - 3 = 12\n"
    "12 + 8 = 20\n"
    "The answer is 20\n\n"
    "Q: {question}\n"
)


@dataclasses.dataclass(frozen=True)
class RStarPrompts:
    """The generator's text: one few-shot prompt that shows every action's format, and each action's cue.

    A node's partial solution follows the prompt; an action appends its cue and samples after it, so all five
    actions continue one cached prompt. `prompt` must hold `{question}`; it is wrapped in the chat template
    when the run sets `chat`.
    """

    prompt: str = ARITH_PROMPT
    step: str = ""  # A1: one line
    finish: str = ""  # A2: to the end of the solution
    subquestion: str = "Question: "  # A3: the sub-question's line ...
    subanswer: str = "Answer: "  # ... then this cue and the answer's line (also A4's, after the sub-question)
    rephrase: str = "Conditions: "  # A5: one line
    stop: str = "\n\n"  # ends an A2 completion: the prompt's separator between examples ("" for none)

    def __post_init__(self):
        if "{question}" not in self.prompt:
            raise ValueError("rstar.prompts.prompt: the template has no '{question}' placeholder")

    def cue(self, action: str) -> str:
        return {STEP: self.step, FINISH: self.finish, SUBQUESTION: self.subquestion, REANSWER: self.subanswer,
                REPHRASE: self.rephrase}[action]


@dataclasses.dataclass(frozen=True)
class RStarConfig:
    """rStar's generator: MCTS over the five actions.

    Attributes:
      num_rollouts: simulations per problem (the paper's rollouts; the tree has num_rollouts + 1 nodes).
      num_steps: A1 candidates sampled per node.
      num_subquestions: A3 candidates per node (each answered by `num_votes` samples).
      num_votes: n of A2 and v of A3 and A4: samples whose majority answer a node holds.
      max_depth: actions from the root; a node this deep ends the trajectory (reward 0 unless it is an answer).
      c: UCT's exploration constant (the paper: 2).
      step_tokens: the longest line A1, A3's sub-question and A5 sample.
      answer_tokens: the longest sub-answer (A3, A4).
      solution_tokens: the longest A2 completion.
      temperature, top_p: how every action samples.
      shrink_at: the decode continues with fewer rows once at most these fractions are live
        (`SamplingConfig.shrink_at`): most samples end their line long before the longest does.
      allowed_after: node type -> the actions it may take (node types: "root" and the action names).
      prompts: the few-shot prompt and the actions' cues.
      batch_size: problems per jitted search call.
    """

    num_rollouts: int = 8
    num_steps: int = 2
    num_subquestions: int = 1
    num_votes: int = 3
    max_depth: int = 5
    c: float = 2.0
    step_tokens: int = 24
    answer_tokens: int = 24
    solution_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 1.0
    shrink_at: tuple[float, ...] = (0.5, 0.25)
    allowed_after: dict = dataclasses.field(default_factory=lambda: dict(PAPER_ALLOWED_AFTER), hash=False)
    prompts: RStarPrompts = RStarPrompts()
    batch_size: int = 16

    def __post_init__(self):
        for name in ("num_rollouts", "num_steps", "num_subquestions", "num_votes", "max_depth", "step_tokens",
                     "answer_tokens", "solution_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"rstar.{name} must be >= 1, got {getattr(self, name)}")
        self.action_space()  # validates the table

    def __hash__(self):  # allowed_after is a dict: hash its items (the program cache keys on the config)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["allowed_after"] = tuple(sorted((k, tuple(v)) for k, v in self.allowed_after.items()))
        return hash(tuple(fields.items()))

    def action_space(self) -> ActionSpace:
        """The five action types, slots per type (A1: num_steps, A3: num_subquestions, one each for the others)
        and the validity table; an error names a node type the table leaves with no action."""
        for node_type, nexts in self.allowed_after.items():
            if node_type not in (ROOT, *ACTIONS):
                raise ValueError(f"rstar.allowed_after: unknown node type {node_type!r}; known: root, "
                                 f"{', '.join(ACTIONS)}")
            unknown = [a for a in nexts if a not in ACTIONS]
            if unknown:
                raise ValueError(f"rstar.allowed_after.{node_type}: unknown actions {unknown}; known: "
                                 f"{', '.join(ACTIONS)}")
        reachable, frontier = set(), [ROOT]
        while frontier:
            node_type = frontier.pop()
            if node_type in reachable or node_type == FINISH:
                continue
            reachable.add(node_type)
            nexts = tuple(self.allowed_after.get(node_type, ()))
            if not nexts:
                raise ValueError(f"rstar.allowed_after leaves a node of type {node_type!r} with no valid action "
                                 f"(every node but an A2 'finish' one needs one)")
            frontier += nexts
        if REANSWER in self.allowed_after.get(ROOT, ()):
            raise ValueError("rstar.allowed_after.root: 'reanswer' needs a sub-question before it")
        slots = {STEP: self.num_steps, FINISH: 1, SUBQUESTION: self.num_subquestions, REANSWER: 1, REPHRASE: 1}
        types = tuple(ActionType(a, slots[a], until_step_end=a != FINISH) for a in ACTIONS)
        return ActionSpace(types=types, allowed_after=tuple((k, tuple(v)) for k, v in self.allowed_after.items()))
