"""What each test-time method may spend and how it searches: the baselines', MCTS's and rStar's settings, and
the `Budget` that holds them."""

from __future__ import annotations

import dataclasses

from jaxreason.sampling.generate import SamplingConfig
from jaxreason.search.rstar_config import RStarConfig
from jaxreason.verifiers.discriminator import DiscriminatorConfig

RULES = ("rest_mcts", "muzero", "gumbel")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Settings of the sampling baselines; each method reads the ones it uses.

    Attributes:
      num_samples: N of self-consistency and (weighted) best-of-N.
      sampling: how every method but greedy draws; `max_new_tokens` is the longest whole solution (greedy draws
        with the same cap at temperature 0).
      beam_width: beams kept per problem by beam search.
      proposals_per_beam: next steps sampled from each unfinished beam.
      max_steps: beam-search steps; beams still open then are judged as they are.
      max_step_tokens: longest beam-search step.
    """

    num_samples: int = 8
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=128, temperature=0.7)
    beam_width: int = 4
    proposals_per_beam: int = 4
    max_steps: int = 8
    max_step_tokens: int = 48

    def __post_init__(self):
        for name in ("num_samples", "beam_width", "proposals_per_beam", "max_steps", "max_step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class MCTSConfig:
    """Step-level MCTS on mctx. The defaults follow ReST-MCTS*'s public code (THUDM/ReST-MCTS, MCTS/mcts.py)
    except where docs/mcts_star.md says why not.

    Attributes:
      rule: selection rule: "rest_mcts" (ReST-MCTS*'s UCT), "muzero" or "gumbel".
      num_simulations: simulations per problem; the tree has num_simulations + 1 nodes.
      num_candidates: K, candidate next steps sampled when a node is created.
      max_depth: steps from the root; a node at this depth is terminal.
      sampling: how a step is drawn; `max_new_tokens` is the longest step (template included), `shrink_at` the
        fractions of an expansion's rows its decode continues with once that few are unfinished (worth its
        gathers and compile time where a decode step is costly; BENCHMARKS.md).
      c: exploration constant (ReST-MCTS*'s UCT c, MuZero's pb_c_init).
      unvisited: how the "rest_mcts" rule treats a node's unvisited children: "value" scores them by their
        verifier value plus `unvisited_bonus` (the reference: V + INF, INF finite), so a visited child with a
        high value can win over a poor unvisited one; "prior" takes them all first, in prior order.
      unvisited_bonus: the reference's INF.
      backup: "children_mean": a node's value is the visit-weighted mean of its children's values, recomputed
        after every simulation (the reference's back_propagate); "running_mean": mctx's mean of every value
        backed up through the node.
      rollout_steps: r, the reference's greedy roll-forward: when a node is created, from its best child (by
        value) r steps are taken, each the best of K fresh candidates, and the child's value becomes
        (1 - rollout_alpha) V + rollout_alpha * max V along the roll; 0 turns it off.
      rollout_alpha: the roll-forward's weight.
      answer: the search's answer: "best_score", the finished solution the verifier scores highest (the
        reference: its highest-valued solution); "weighted_vote", the answer whose finished solutions' scores sum
        highest.
      batch_size: problems per jitted search call (one compiled shape; a progress bar over calls).
      expansion_sizes: fractions of a device's batch an expansion is compiled for: the rows to expand run in the
        smallest that holds them (each size is another copy of the expansion in the program).
      prefill_packing: fractions of a node prefill's padded tokens its real tokens are packed into for the
        matmuls (the smallest that holds them runs; each is another compiled copy of the prefill).
    """

    rule: str = "rest_mcts"
    num_simulations: int = 16
    num_candidates: int = 4
    max_depth: int = 8
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=48, temperature=0.7)
    c: float = 0.7
    unvisited: str = "value"
    unvisited_bonus: float = 1.0
    backup: str = "children_mean"
    rollout_steps: int = 3
    rollout_alpha: float = 0.5
    answer: str = "best_score"
    batch_size: int = 64
    expansion_sizes: tuple[float, ...] = (1.0, 0.75, 0.5)
    prefill_packing: tuple[float, ...] = ()

    @property
    def max_step_tokens(self) -> int:
        return self.sampling.max_new_tokens

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"mcts.rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        for name in ("num_simulations", "num_candidates", "max_depth", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"mcts.{name} must be >= 1, got {getattr(self, name)}")
        if self.unvisited not in ("value", "prior"):
            raise ValueError(f"mcts.unvisited must be 'value' or 'prior', got {self.unvisited!r}")
        if self.backup not in ("children_mean", "running_mean"):
            raise ValueError(f"mcts.backup must be 'children_mean' or 'running_mean', got {self.backup!r}")
        if self.answer not in ("best_score", "weighted_vote"):
            raise ValueError(f"mcts.answer must be 'best_score' or 'weighted_vote', got {self.answer!r}")
        if self.rollout_steps < 0 or not 0 <= self.rollout_alpha <= 1:
            raise ValueError("mcts.rollout_steps must be >= 0 and mcts.rollout_alpha in [0, 1]")
        if max(self.expansion_sizes, default=0) != 1 or not all(0 < f <= 1 for f in self.expansion_sizes):
            raise ValueError(f"mcts.expansion_sizes must be fractions in (0, 1] that include 1, got "
                             f"{self.expansion_sizes}")
        if not all(0 < f < 1 for f in self.prefill_packing):
            raise ValueError(f"mcts.prefill_packing must be fractions in (0, 1), got {self.prefill_packing}")


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much each method may spend: samples for the baselines, simulations x K for MCTS, rollouts for rStar's
    generator and masked completions for its discriminator."""

    baseline: BaselineConfig = BaselineConfig()
    mcts: MCTSConfig = MCTSConfig()
    rstar: RStarConfig = RStarConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
