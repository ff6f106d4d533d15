"""Test-time search and selection: verifier-guided MCTS on mctx and the baselines it is compared with, behind one
signature and one registry.

    result = jaxreason.search.run("mcts", problems, policy=policy, verifier=verifier, tokenizer=tokenizer,
                                  task=task, budget=Budget(), key=jax.random.key(0))
"""

from jaxreason.search import baselines, mcts, rstar_method  # noqa: F401  (register the methods, in this order)
from jaxreason.search.actions import ActionSpace, ActionType
from jaxreason.search.config import BaselineConfig, Budget, MCTSConfig
from jaxreason.search.mcts import batched_trees, search_trees
from jaxreason.search.methods import MethodResult, compare, method_names, needs_verifier, register_method, run
from jaxreason.search.traces import SearchPath, TreeTraces, extract_traces

__all__ = [
    "ActionSpace", "ActionType", "BaselineConfig", "Budget", "MCTSConfig", "MethodResult", "SearchPath", "TreeTraces",
    "batched_trees", "compare", "extract_traces", "method_names", "needs_verifier", "register_method", "run",
    "search_trees",
]
