"""The run folder's results: metrics.json, report.md and PNG plots, rebuilt from the stage log after every
evaluation so a stopped run still has a report of what it finished (by process 0 of a multi-process job)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from jaxreason.distributed import is_main_process
from jaxreason.search.methods import needs_verifier

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

_LABELS = {"greedy": "greedy", "self_consistency": "self-consistency", "best_of_n": "PRM best-of",
           "weighted_vote": "PRM-weighted vote", "weighted_best_of_n": "PRM-weighted best-of-N",
           "random_pick": "random pick", "pass_at_n": "pass", "beam_search": "PRM beam search",
           "mcts": "MCTS* (PRM)"}
_RULES = ("self_consistency", "best_of_n", "weighted_vote", "random_pick", "pass_at_n")


def collect_metrics(stages: dict[str, Any], num_problems: int) -> dict:
    """Per-iteration held-out results and budgets from the stage log."""
    iterations = []
    t = 0
    while f"eval_{t}" in stages:
        ev = stages[f"eval_{t}"]
        iterations.append({
            "iteration": t,
            "rest_mcts": ev["rest_mcts"],
            # Iteration 0: both methods start from the same policy_0.
            "rest_em": ev["rest_em"] if t else _without_verifier(ev["rest_mcts"]),
            "search": stages.get(f"search_{t}"),
            "rest_em_sample": stages.get(f"rest_em_sample_{t}"),
        })
        t += 1
    return {"num_test_problems": num_problems, "iterations": iterations}


def _without_verifier(ev: dict) -> dict:
    """What of policy_0's evaluation needs no verifier (ReST-EM's view of iteration 0)."""
    out = {m: row for m, row in ev.items() if m != "verification" and not needs_verifier(m)}
    v = ev.get("verification")
    if v:
        verifier_only = ("auc", "first_error", "selection", "verifier_tokens_per_sample")
        out["verification"] = {**{k: x for k, x in v.items() if k not in verifier_only},
                               "selection": {n: {r: a for r, a in rules.items()
                                                 if r in ("self_consistency", "random_pick", "pass_at_n")}
                                             for n, rules in v["selection"].items()}}
    return out


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n problems."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1))


def headline(ev: dict) -> dict[str, float]:
    """The figures a run is judged by, from one evaluation: every method's accuracy, and at the largest n the
    selection rules' (`<rule>@<n>`), the PRM's AUC and first-error F1."""
    out = {m: row["accuracy"] for m, row in ev.items() if m != "verification"}
    v = ev.get("verification")
    if v:
        n = max(v["selection"], key=int)
        out |= {f"{rule}@{n}": a for rule, a in v["selection"][n].items()}
        if v.get("auc") is not None:
            out["prm_auc"] = v["auc"]
        if (v.get("first_error") or {}).get("f1") is not None:
            out["first_error_f1"] = v["first_error"]["f1"]
    return out


def _label(key: str) -> str:
    rule, _, n = key.partition("@")
    return {"prm_auc": "PRM AUC", "first_error_f1": "first-error F1"}.get(key, _LABELS.get(rule, rule)
                                                                           + (f"@{n}" if n else ""))


def write_report(run_dir: str | Path, config: dict, stages: dict[str, Any]) -> dict:
    """metrics.json, report.md and the plots of a ReST-MCTS* run from its stage log, written by process 0 only;
    returns the metrics (on every process)."""
    run_dir = Path(run_dir)
    n = config["problems"]["test"]
    metrics = collect_metrics(stages, n)
    if not is_main_process():
        return metrics
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    its = metrics["iterations"]
    if not its:
        return metrics
    last = its[-1]
    _plot_iterations(its, run_dir / "accuracy_per_iteration.png")
    _plot_selection(last["rest_mcts"], run_dir / "accuracy_vs_n.png", last["iteration"])
    _plot_compute(last["rest_mcts"], run_dir / "accuracy_vs_tokens.png", last["iteration"])

    mcts_keys = list(headline(its[0]["rest_mcts"]))
    em_keys = list(headline(its[-1]["rest_em"]))
    sizes = {m: row.get("problems", n) for m, row in its[0]["rest_mcts"].items()}
    subsets = ", ".join(f"{_LABELS.get(m, m)} on the first {k}" for m, k in sizes.items() if k != n)
    lines = [
        "# ReST-MCTS* run report", "",
        f"Task `{config['problems']['task']['name']}`, {n} held-out problems" + (f" ({subsets})" if subsets else "")
        + f", {config['problems']['train']} self-training problems, {len(its) - 1} of {config['iterations']} "
        f"iterations finished, seed {config['seed']}. Selection rules (`rule@n`) choose among n of the N samples "
        "drawn per held-out problem (averaged over subsets of n); random pick is the mean sample accuracy.", "",
        "## Held-out results per iteration", "",
        "| iteration | " + " | ".join(f"ReST-MCTS* {_label(k)}" for k in mcts_keys) + " | "
        + " | ".join(f"ReST-EM {_label(k)}" for k in em_keys)
        + " | search tokens (generated / verifier) | ReST-EM tokens | train problems solved (MCTS* / ReST-EM) |",
        "|" + " --- |" * (len(mcts_keys) + len(em_keys) + 4),
    ]
    for it in its:
        search, em = it["search"] or {}, it["rest_em_sample"] or {}
        ours, theirs = headline(it["rest_mcts"]), headline(it["rest_em"])
        em_solved = round(em["train_accuracy"] * config["problems"]["train"]) if "train_accuracy" in em else "-"
        solved = f"{search['trees_with_correct_leaf']} / {em_solved}" if search else "-"
        lines.append(
            f"| {it['iteration']} | " + " | ".join(_cell(ours.get(k)) for k in mcts_keys) + " | "
            + " | ".join(_cell(theirs.get(k)) for k in em_keys)
            + f" | {search.get('generated_tokens', '-')} / {search.get('verifier_tokens', '-')}"
            + f" | {em.get('generated_tokens', '-')} | {solved} |")
    first = its[0]
    lines += ["", "## Change from policy_0 to the last iteration", ""]
    for name, key in (("ReST-MCTS*", "rest_mcts"), ("ReST-EM", "rest_em")):
        a0s, a1s = headline(first[key]), headline(last[key])
        for k in a1s:
            if k in a0s and k not in ("prm_auc", "first_error_f1"):
                size = sizes.get(k.partition("@")[0], sizes.get("verification", n))
                lines.append(f"- {name} {_label(k)}: {a0s[k]:.3f} -> {a1s[k]:.3f} ({100 * (a1s[k] - a0s[k]):+.1f} "
                             f"points; binomial standard error of each figure about "
                             f"{100 * standard_error(a1s[k], size):.1f} points on {size} problems)")
    v = last["rest_mcts"].get("verification")
    if v:
        lines += ["", f"## Verifier quality (iteration {last['iteration']})", "",
                  f"PRM AUC on correct against incorrect samples: {_cell(v.get('auc'))}."]
        fe = v.get("first_error")
        if fe:
            lines.append(f"First wrong step found (the first step the PRM scores down): {_cell(fe['erroneous'])} "
                         f"of solutions with one; no step scored down: {_cell(fe['error_free'])} of those without; "
                         f"F1 {_cell(fe['f1'])}.")
        rules = list(next(iter(v["selection"].values())))
        lines += ["", "| n | " + " | ".join(_LABELS.get(r, r) for r in rules) + " | generated tokens per problem |",
                  "|" + " --- |" * (len(rules) + 2)]
        for size, row in v["selection"].items():
            lines.append(f"| {size} | " + " | ".join(_cell(row[r]) for r in rules)
                         + f" | {int(size) * v['tokens_per_sample']:.1f} |")
    lines += ["", "ReST-EM samples whole solutions with the same number of generated tokens as that iteration's "
              "MCTS* search spent on the same training problems, and trains its policy by the same rule.", "",
              f"## Accuracy against generated tokens (iteration {last['iteration']})", "",
              "| method | accuracy | generated tokens per problem | verifier tokens per problem |",
              "| --- | --- | --- | --- |"]
    for m, row in last["rest_mcts"].items():
        if m != "verification":
            lines.append(f"| {_LABELS.get(m, m)} | {row['accuracy']:.3f} | {row['tokens_per_problem']:.1f} | "
                         f"{row.get('verifier_tokens_per_problem', 0):.1f} |")
    lines += ["", "![accuracy per iteration](accuracy_per_iteration.png)",
              "![accuracy against N](accuracy_vs_n.png)",
              "![accuracy against generated tokens](accuracy_vs_tokens.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return metrics


def _cell(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _plot_iterations(its: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [it["iteration"] for it in its]
    for key, name, style in (("rest_mcts", "ReST-MCTS*", "-o"), ("rest_em", "ReST-EM", "--s")):
        for k in headline(its[-1][key]):
            if k in ("prm_auc", "first_error_f1") or k.startswith(("pass_at_n", "random_pick")):
                continue
            ax.plot(x, [headline(it[key]).get(k, np.nan) for it in its], style, label=f"{name} {_label(k)}")
    ax.set_xlabel("self-training iteration")
    ax.set_ylabel("held-out accuracy")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_selection(ev: dict, path: Path, iteration: int) -> None:
    """Accuracy against the number of samples N per selection rule."""
    v = ev.get("verification")
    if not v:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted(v["selection"], key=int)
    for rule in v["selection"][sizes[0]]:
        ax.plot([int(s) for s in sizes], [v["selection"][s][rule] for s in sizes], "-o", label=_LABELS.get(rule, rule))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples per problem N")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"selecting among N samples, policy and PRM of iteration {iteration}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_compute(ev: dict, path: Path, iteration: int) -> None:
    """Accuracy against generated tokens: the selection rules' curves over N and each method's point."""
    fig, ax = plt.subplots(figsize=(6, 4))
    v = ev.get("verification")
    if v:
        sizes = sorted(v["selection"], key=int)
        for rule in v["selection"][sizes[0]]:
            if rule == "pass_at_n":
                continue
            ax.plot([int(s) * v["tokens_per_sample"] for s in sizes], [v["selection"][s][rule] for s in sizes], "-o",
                    ms=3, label=_LABELS.get(rule, rule))
    for m, row in ev.items():
        if m == "verification":
            continue
        ax.scatter(row["tokens_per_problem"], row["accuracy"], s=60, marker="*", zorder=3, label=_LABELS.get(m, m))
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"test-time compute, policy and PRM of iteration {iteration}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_runs(run_dirs: list[str | Path]) -> list[tuple[int, dict]]:
    """(seed, metrics.json) of each run folder; a folder without metrics is a FileNotFoundError naming it."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no metrics (has the run evaluated anything?)")
        runs.append((json.loads((Path(d) / "config.json").read_text())["seed"], json.loads(path.read_text())))
    return runs


def seed_summary(run_dirs: list[str | Path]) -> str:
    """Markdown: per seed and as mean +- standard deviation over seeds, each headline figure of policy_0 and of
    the last iteration for both methods, from each run folder's metrics.json."""
    runs = [(seed, metrics["iterations"]) for seed, metrics in load_runs(run_dirs)]
    rows = ["| figure | " + " | ".join(f"seed {s}" for s, _ in runs) + " | last iteration, mean +- std | "
            "change from policy_0, mean +- std |", "| --- |" + " --- |" * (len(runs) + 2)]
    for key, name in (("rest_mcts", "ReST-MCTS*"), ("rest_em", "ReST-EM")):
        for k in headline(runs[0][1][-1][key]):
            first = np.array([headline(its[0][key]).get(k, np.nan) for _, its in runs])
            last = np.array([headline(its[-1][key]).get(k, np.nan) for _, its in runs])
            cells = " | ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(first, last))
            change = 100 * (last - first)
            rows.append(f"| {name} {_label(k)} | {cells} | {last.mean():.3f} +- {_std(last):.3f} | "
                        f"{change.mean():+.1f} +- {_std(change):.1f} points |")
    per_seed = [claims(its, json.loads((Path(d) / "config.json").read_text())["problems"]["train"])
                for d, (_, its) in zip(run_dirs, runs)]
    rows += ["", "| the paper's claim, measured as | " + " | ".join(f"seed {s}" for s, _ in runs) +
             " | mean +- std | holds on |", "| --- |" + " --- |" * (len(runs) + 2)]
    for k, (name, threshold, strict) in CLAIMS.items():
        x = np.array([c.get(k, np.nan) for c in per_seed])
        shown = x[~np.isnan(x)]
        if not len(shown):
            continue
        held = int(np.sum(shown > threshold if strict else shown >= threshold))
        rows.append(f"| {name} | " + " | ".join("-" if np.isnan(v) else f"{v:+.3f}" if threshold == 0 else f"{v:.2f}"
                                             for v in x) +
                    f" | {shown.mean():.3f} +- {_std(shown):.3f} | {held} of {len(shown)} seeds |")
    return "\n".join(rows) + "\n"


# claim key: (what is measured, the threshold, whether the claim needs more than it rather than at least it)
CLAIMS = {
    "weighted_vote_minus_self_consistency": ("PRM-weighted vote@N - self-consistency@N (last iteration)", 0.0, False),
    "best_of_minus_random_pick": ("PRM best-of-N - random pick (last iteration; holds when > 0)", 0.0, True),
    "mcts_minus_self_consistency": ("MCTS* - self-consistency at MCTS*'s generated tokens (last iteration)", 0.0,
                                    False),
    "solved_per_token_ratio": ("train problems solved per generated token, search / sampling (mean over "
                               "iterations)", 1.0, False),
    "greedy_minus_rest_em": ("ReST-MCTS* policy - ReST-EM policy, greedy (last iteration)", 0.0, False),
}


def claims(its: list[dict], train_problems: int) -> dict[str, float]:
    """The ReST-MCTS* paper's claims as differences (or a ratio) from one run's per-iteration metrics: at the last
    iteration with N the largest selection size, weighted vote and best-of-N against self-consistency and random
    pick, MCTS* against self-consistency interpolated (linearly in the number of samples) to MCTS*'s generated
    tokens per problem (absent when those tokens lie outside the samples' range), the policies' greedy accuracy;
    over the iterations, the training problems (of `train_problems`) the search solves per generated token over
    those sampling does.
    """
    out = {}
    last = its[-1]
    mine, theirs = last["rest_mcts"], last.get("rest_em")
    v = mine.get("verification")
    if v:
        sizes = sorted(int(n) for n in v["selection"])
        top = v["selection"][str(sizes[-1])]
        if "weighted_vote" in top:
            out["weighted_vote_minus_self_consistency"] = top["weighted_vote"] - top["self_consistency"]
            out["best_of_minus_random_pick"] = top["best_of_n"] - top["random_pick"]
        if "mcts" in mine:
            spent = mine["mcts"]["tokens_per_problem"] / v["tokens_per_sample"]  # in samples
            if sizes[0] <= spent <= sizes[-1]:
                consistency = np.interp(spent, sizes, [v["selection"][str(n)]["self_consistency"] for n in sizes])
                out["mcts_minus_self_consistency"] = mine["mcts"]["accuracy"] - float(consistency)
    if theirs:
        out["greedy_minus_rest_em"] = mine["greedy"]["accuracy"] - theirs["greedy"]["accuracy"]
    ratios = [(it["search"]["trees_with_correct_leaf"] / it["search"]["generated_tokens"]) /
              (it["rest_em_sample"]["train_accuracy"] * train_problems / it["rest_em_sample"]["generated_tokens"])
              for it in its if it.get("search") and it.get("rest_em_sample")
              and it["rest_em_sample"]["train_accuracy"] > 0]
    if ratios:
        out["solved_per_token_ratio"] = float(np.mean(ratios))
    return out


def _std(x: np.ndarray) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0
