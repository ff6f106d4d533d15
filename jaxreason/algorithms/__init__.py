"""The outer loops (ReST-MCTS*, ReST-EM beside it, GRPO, rStar, V-STaR, SCoRe, SFT), each one registered module
that reads like its paper; `python -m jaxreason train --config X.yaml` runs the one X names in `algorithm:`."""

from jaxreason.algorithms.registry import Algorithm, RunInterrupted, algorithm_names, get_algorithm, register_algorithm

__all__ = ["Algorithm", "RunInterrupted", "algorithm_names", "get_algorithm", "register_algorithm"]
