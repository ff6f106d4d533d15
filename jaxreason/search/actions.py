"""Action spaces for step-level search: slots grouped by action type, with a validity table.

A node's K action slots are split among action types; each type has its own prompt template (text appended
to the partial solution before its candidates are sampled) and number of samples. Which types may follow
which node type is a table; a slot whose type may not follow the node's type gets an invalid prior and is
never selected. rStar's five actions are one such space; plain step-by-step search is a space of one type.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ROOT = "root"


@dataclasses.dataclass(frozen=True)
class ActionType:
    name: str
    num_samples: int = 4
    template: str = ""  # appended to the partial solution before sampling; part of the step's text
    until_step_end: bool = True  # stop at the step delimiter; False: sample to the end of the solution


@dataclasses.dataclass(frozen=True)
class ActionSpace:
    """Action types and, for each node type (an action type's name or "root"), the types allowed next."""

    types: tuple[ActionType, ...]
    allowed_after: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self):
        names = [t.name for t in self.types]
        if len(set(names)) != len(names) or ROOT in names:
            raise ValueError(f"action type names must be unique and not {ROOT!r}: {names}")
        for node_type, nexts in self.allowed_after:
            for name in (node_type, *nexts):
                if name != ROOT and name not in names:
                    raise ValueError(f"allowed_after names unknown action type {name!r}; known: {names}")

    @classmethod
    def single_step(cls, num_samples: int) -> ActionSpace:
        """One action type: propose the next step (ReST-MCTS*)."""
        return cls(types=(ActionType("step", num_samples),), allowed_after=((ROOT, ("step",)), ("step", ("step",))))

    @property
    def num_actions(self) -> int:
        return sum(t.num_samples for t in self.types)

    @property
    def root_type(self) -> int:
        """Node-type index of the root (after the action types' own indices)."""
        return len(self.types)

    def slot_types(self) -> np.ndarray:
        """[K] the action-type index of every slot."""
        return np.repeat(np.arange(len(self.types)), [t.num_samples for t in self.types]).astype(np.int32)

    def validity(self) -> np.ndarray:
        """[num_types + 1, K] bool: may a slot be taken at a node of this type (last row: the root)."""
        index = {t.name: i for i, t in enumerate(self.types)} | {ROOT: self.root_type}
        table = np.zeros((len(self.types) + 1, len(self.types)), bool)
        for node_type, nexts in self.allowed_after:
            for name in nexts:
                table[index[node_type], index[name]] = True
        return table[:, self.slot_types()]
