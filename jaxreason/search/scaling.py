"""A test-time compute scaling study (Snell et al. 2024, arXiv 2408.03314): test-time methods measured at several
budgets, problems binned by difficulty, and the compute-optimal choice of method per bin. Pure host functions on
per-problem results.

A setting is one method at one budget (best-of-4, MCTS* with 8 simulations), measured on every held-out problem:
its per-problem accuracy and tokens. Its compute is counted in samples-equivalent: the mean over problems of the
generated plus verifier tokens it spent, divided by the mean length of one sampled solution of the policy, so
best-of-N costs N plus the verifier's reading of N solutions. The settings of the sampling rules at n = 1, 2, 4, ...
all come from one pool of N samples per problem (`pool_settings`).

The compute-optimal strategy (Snell et al. Sec. 3.2) picks, at each budget and difficulty level, the setting
within the budget that does best on that level's validation problems, and is scored on the level's test problems.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int

from jaxreason.verifiers.metrics import selection_correct

# The pool's rules (`selection_correct`'s names), and those that read the verifier: self-consistency, best-of-N
# and verifier-weighted vote are the registry's self_consistency, best_of_n and weighted_best_of_n.
POOL_RULES = ("self_consistency", "best_of_n", "weighted_vote")
SCORED_RULES = ("best_of_n", "weighted_vote")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One method at one budget on P problems.

    Attributes:
      name: a unique label, e.g. "best_of_n@4" or "mcts(num_simulations=8)".
      method: its family: the settings of one method form one curve.
      correct: [P] float, each problem's accuracy (0 or 1 for one run; a mean over subsets for a pool rule).
      generated_tokens: [P] float, tokens sampled per problem.
      verifier_tokens: [P] float, tokens the verifier read per problem.
    """

    name: str
    method: str
    correct: np.ndarray
    generated_tokens: np.ndarray
    verifier_tokens: np.ndarray

    def compute(self, tokens_per_sample: float) -> float:
        return samples_equivalent(self.generated_tokens, self.verifier_tokens, tokens_per_sample)


def samples_equivalent(generated_tokens: Float[np.ndarray, " P"], verifier_tokens: Float[np.ndarray, " P"],
                       tokens_per_sample: float) -> float:
    """The mean over problems of generated + verifier tokens, in units of one sample's `tokens_per_sample`."""
    return float(np.mean(np.asarray(generated_tokens, np.float64) + verifier_tokens) / tokens_per_sample)


def pool_settings(groups: Int[np.ndarray, "P N"], correct: Float[np.ndarray, "P N"], scores: Float[np.ndarray, "P N"],
                  lengths: Float[np.ndarray, "P N"], verifier_tokens: Float[np.ndarray, "P N"], sizes: Sequence[int],
                  max_subsets: int = 70, seed: int = 0) -> list[Setting]:
    """Each rule of `POOL_RULES` at each n in `sizes`, named "<rule>@<n>", from one pool of N samples per problem.

    A rule's accuracy on a problem is its mean over subsets of n of the problem's samples (`selection_correct`);
    its tokens are what n of them cost on average: n times the problem's mean sample length, plus, for the rules
    that read the verifier, n times the mean verifier tokens of one of its samples.

    Args:
      groups: answer group of each sample (`group_answers`; -1: no answer).
      correct: whether each sample is correct.
      scores: the verifier's score of each sample.
      lengths: generated tokens of each sample.
      verifier_tokens: tokens the verifier read to score each sample.
    """
    generated, verified = np.mean(lengths, axis=1), np.mean(verifier_tokens, axis=1)
    settings = []
    for n in sizes:
        accuracy = selection_correct(groups, correct, scores, n, max_subsets, seed)
        settings += [Setting(f"{rule}@{n}", rule, accuracy[rule], n * generated,
                             n * verified if rule in SCORED_RULES else np.zeros_like(verified))
                     for rule in POOL_RULES]
    return settings


def difficulty_levels(pass_rates: Float[np.ndarray, " P"], num_bins: int) -> Int[np.ndarray, " P"]:
    """Each problem's difficulty level, 1 (the highest pass rates: easiest) to K <= `num_bins`, by quantile bins.

    The problems sorted by pass rate are cut into `num_bins` runs of equal length; problems of equal pass rate
    share a bin, the one where the middle of their run in the sorted order falls, so with ties a bin can hold more
    or fewer than its share. Bins left empty are dropped and the levels numbered without gaps.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    _, inverse, counts = np.unique(np.asarray(pass_rates, np.float64), return_inverse=True, return_counts=True)
    middle = np.cumsum(counts) - counts / 2
    ascending = np.minimum((num_bins * middle / len(inverse)).astype(np.int64), num_bins - 1)[inverse]
    dense = np.unique(ascending, return_inverse=True)[1]
    return dense.max() + 1 - dense


def split_by_level(levels: Int[np.ndarray, " P"], seed: int) -> tuple[Int[np.ndarray, " V"], Int[np.ndarray, " T"]]:
    """Validation and test problem indices (each sorted): each level's problems, in an order shuffled by `seed`,
    alternate between the halves, the first to validation, so every level with a test problem has a validation
    problem to choose its method on."""
    rng = np.random.default_rng(seed)
    validation, test = [], []
    for level in np.unique(levels):
        members = rng.permutation(np.flatnonzero(levels == level))
        validation += members[0::2].tolist()
        test += members[1::2].tolist()
    return np.sort(np.asarray(validation, np.int64)), np.sort(np.asarray(test, np.int64))


def budget_levels(compute: Sequence[float]) -> list[float]:
    """Budgets 1, 2, 4, ... samples-equivalent, up to the first power of two that affords every setting."""
    top = max(0, int(np.ceil(np.log2(max(max(compute), 1.0)))))
    return [float(2 ** k) for k in range(top + 1)]


def choose(accuracy: Float[np.ndarray, "S P"], compute: Float[np.ndarray, " S"], problems: Int[np.ndarray, " Q"],
           budget: float) -> int | None:
    """The setting with compute <= `budget` and the best mean accuracy on `problems`; equal accuracies go to the
    cheaper setting, then the earlier; None when no setting fits the budget."""
    fits = np.flatnonzero(np.asarray(compute) <= budget)
    if not len(fits):
        return None
    mean = np.round(accuracy[np.ix_(fits, problems)].mean(axis=1), 9)  # sums in another order tie exactly
    return int(fits[np.lexsort((fits, compute[fits], -mean))[0]])


def compute_optimal(accuracy: Float[np.ndarray, "S P"], compute: Float[np.ndarray, " S"],
                    levels: Int[np.ndarray, " P"], validation: Int[np.ndarray, " V"], test: Int[np.ndarray, " T"],
                    budgets: Sequence[float]) -> list[dict]:
    """At each budget, per difficulty level the setting `choose` picks on the level's validation problems, scored
    on its test problems (Snell et al.'s compute-optimal strategy; with one level for all problems, the best
    fixed setting).

    Returns:
      One {budget, accuracy, compute, choice} per budget: the test problems' mean accuracy (each under its
      level's choice; problem-weighted over levels), their mean compute, and {level: chosen setting}; accuracy and
      compute None and choice {} when no setting fits the budget.
    """
    rows = []
    for budget in budgets:
        if not np.any(compute <= budget):
            rows.append({"budget": budget, "accuracy": None, "compute": None, "choice": {}})
            continue
        choice, correct, spent = {}, [], []
        for level in np.unique(levels[test]):
            chosen_on = validation[levels[validation] == level]
            if not len(chosen_on):
                raise ValueError(f"difficulty level {level} has test problems but no validation problems")
            choice[int(level)] = pick = choose(accuracy, compute, chosen_on, budget)
            members = test[levels[test] == level]
            correct += accuracy[pick, members].tolist()
            spent += [compute[pick]] * len(members)
        rows.append({"budget": budget, "accuracy": float(np.mean(correct)), "compute": float(np.mean(spent)),
                     "choice": choice})
    return rows


def largest_within(compute: Float[np.ndarray, " S"], rows: Sequence[int], budget: float) -> int | None:
    """Of the settings `rows` (one method's), the costliest whose compute is at most `budget` (None: none)."""
    fits = [r for r in rows if compute[r] <= budget]
    return max(fits, key=lambda r: compute[r]) if fits else None


def compute_ratio(budgets: Sequence[float], accuracies: Sequence[float | None], target: float,
                  target_budget: float) -> dict | None:
    """Where a strategy first reaches `target` (a reference's accuracy at `target_budget`): {budget, ratio}, the
    smallest budget whose accuracy is >= target and target_budget / that budget; None when it never does."""
    for budget, accuracy in zip(budgets, accuracies):
        if accuracy is not None and accuracy >= target - 1e-9:
            return {"budget": budget, "ratio": target_budget / budget}
    return None


def analyse(settings: Sequence[Setting], pass_rates: Float[np.ndarray, " P"], tokens_per_sample: float, *,
            num_bins: int, seed: int, reference: str = "best_of_n") -> dict:
    """The study's results, JSON-ready.

    Problems are binned by `pass_rates` (`difficulty_levels`) and halved (`split_by_level`). For each setting: its
    compute, tokens per problem and accuracy on all problems and per level. At each budget (`budget_levels`):
    the compute-optimal strategy, the best fixed setting (both chosen on validation, scored on test), and the
    `reference` method's costliest setting within the budget (on test); and the compute ratio: the smallest
    budget at which the compute-optimal strategy reaches the reference's test accuracy at its costliest setting,
    against the budget that setting needs (`compute_ratio`), and the same for the reference's cheapest setting of
    the best test accuracy (`compute_ratio_at_best`: where accuracy falls with N, as best-of-N's under a weak
    verifier, the costliest setting is a low bar).
    """
    pass_rates = np.asarray(pass_rates, np.float64)
    levels = difficulty_levels(pass_rates, num_bins)
    validation, test = split_by_level(levels, seed)
    accuracy = np.stack([np.asarray(s.correct, np.float64) for s in settings])
    compute = np.asarray([s.compute(tokens_per_sample) for s in settings])
    budgets = budget_levels(compute)
    names = [s.name for s in settings]

    def named(rows: list[dict]) -> list[dict]:
        return [{**r, "choice": {str(k): names[v] for k, v in r["choice"].items()}} for r in rows]

    optimal = compute_optimal(accuracy, compute, levels, validation, test, budgets)
    fixed = compute_optimal(accuracy, compute, np.zeros_like(levels), validation, test, budgets)
    ref_rows = [i for i, s in enumerate(settings) if s.method == reference]
    ref = [largest_within(compute, ref_rows, b) for b in budgets]
    ref_curve = [{"budget": b, "accuracy": None if r is None else float(accuracy[r, test].mean()),
                  "compute": None if r is None else float(compute[r]), "setting": None if r is None else names[r]}
                 for b, r in zip(budgets, ref)]

    def matched(setting: str) -> dict:
        """Where the compute-optimal strategy reaches `setting`'s test accuracy, against the budget it first fits."""
        first = next(r for r in ref_curve if r["setting"] == setting)
        found = compute_ratio(budgets, [r["accuracy"] for r in optimal], first["accuracy"], first["budget"])
        return {"reference": setting, "reference_accuracy": first["accuracy"], "reference_budget": first["budget"],
                "reference_compute": first["compute"], **(found or {"budget": None, "ratio": None})}

    measured = [r for r in ref_curve if r["setting"] is not None]
    return {
        "problems": len(levels), "validation": len(validation), "test": len(test),
        "tokens_per_sample": tokens_per_sample,
        "levels": {str(k): {"problems": int(np.sum(levels == k)), "pass_rate_min": float(pass_rates[levels == k].min()),
                            "pass_rate_max": float(pass_rates[levels == k].max())} for k in np.unique(levels)},
        "settings": [{"name": s.name, "method": s.method, "compute": float(c),
                      "generated_tokens_per_problem": float(np.mean(s.generated_tokens)),
                      "verifier_tokens_per_problem": float(np.mean(s.verifier_tokens)),
                      "accuracy": float(np.mean(s.correct)),
                      "accuracy_by_level": {str(k): float(np.mean(s.correct[levels == k])) for k in np.unique(levels)}}
                     for s, c in zip(settings, compute)],
        "budgets": budgets,
        "compute_optimal": named(optimal),
        "best_fixed": [{**r, "choice": r["choice"].get("0")} for r in named(fixed)],
        "reference": {"method": reference, "curve": ref_curve},
        # against the costliest setting (it fits the largest budget), and the cheapest of the best on test
        "compute_ratio": matched(ref_curve[-1]["setting"]) if measured else None,
        "compute_ratio_at_best": matched(max(measured, key=lambda r: r["accuracy"])["setting"]) if measured else None,
    }
