"""Verifiers: one interface for every scorer of solutions, the one rule for where a score is read, and how well a
verifier verifies.

    verifier = ValueVerifier(prm, aggregation="min")      # or make_verifier("prm", prm, aggregation="min")
    scored = score_solutions(verifier, prompts, solutions, StepSplitter(tokenizer, "\\n"), pad_id=0)

`jaxreason.verifiers.evaluation.evaluate_verifier` samples from a policy and measures a verifier on the samples.
"""

from jaxreason.verifiers.base import (
                                      AGGREGATIONS,
                                      Verifier,
                                      aggregate,
                                      combine,
                                      initial_score,
                                      make_verifier,
                                      register_verifier,
                                      verifier_names,
)
from jaxreason.verifiers.batch import ScoredSolutions, score_solutions
from jaxreason.verifiers.best_of_k import best_of_k, best_of_k_curves, majority_at_k, pass_at_k
from jaxreason.verifiers.checker import TaskCheckVerifier
from jaxreason.verifiers.dpo import DPOVerifier
from jaxreason.verifiers.generative import CoTGenerativeVerifier, GenerativeVerifier
from jaxreason.verifiers.metrics import SELECTION_RULES, first_error_accuracy, roc_auc, selection_accuracy
from jaxreason.verifiers.positions import StepSplitter, score_position
from jaxreason.verifiers.value import ValueVerifier

__all__ = [
    "AGGREGATIONS", "SELECTION_RULES", "CoTGenerativeVerifier", "DPOVerifier", "GenerativeVerifier",
    "ScoredSolutions", "StepSplitter", "TaskCheckVerifier", "ValueVerifier", "Verifier", "aggregate", "best_of_k",
    "best_of_k_curves", "combine", "first_error_accuracy", "initial_score", "majority_at_k", "make_verifier",
    "pass_at_k", "register_verifier", "roc_auc", "score_position", "score_solutions", "selection_accuracy",
    "verifier_names",
]
