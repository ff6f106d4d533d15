"""The run folder's results: metrics.json, report.md and PNG plots, rebuilt from the stage log after every
evaluation so a stopped run still has a report of what it finished."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

EM_METHODS = ("greedy", "self_consistency")  # what ReST-EM is evaluated with (it has no PRM)
_LABELS = {"greedy": "greedy", "self_consistency": "self-consistency", "best_of_n": "best-of-N (PRM)",
           "weighted_best_of_n": "weighted best-of-N", "beam_search": "PRM beam search", "mcts": "MCTS* (PRM)"}


def collect_metrics(stages: dict[str, Any], num_problems: int) -> dict:
    """Per-iteration held-out accuracies and token budgets from the stage log."""
    iterations = []
    t = 0
    while f"eval_{t}" in stages:
        ev = stages[f"eval_{t}"]
        iterations.append({
            "iteration": t,
            "rest_mcts": ev["rest_mcts"],
            # Iteration 0: both methods start from the same policy_0.
            "rest_em": ev["rest_em"] if t else {m: v for m, v in ev["rest_mcts"].items() if m in EM_METHODS},
            "search": stages.get(f"search_{t}"),
            "rest_em_sample": stages.get(f"rest_em_sample_{t}"),
        })
        t += 1
    return {"num_test_problems": num_problems, "iterations": iterations}


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n problems."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1))


def write_report(run_dir: str | Path, config: dict, stages: dict[str, Any]) -> dict:
    run_dir = Path(run_dir)
    n = config["problems"]["test"]
    metrics = collect_metrics(stages, n)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    its = metrics["iterations"]
    if not its:
        return metrics
    _plot_iterations(its, run_dir / "accuracy_per_iteration.png")
    _plot_compute(its[-1]["rest_mcts"], run_dir / "accuracy_vs_tokens.png", its[-1]["iteration"])

    methods = list(its[0]["rest_mcts"])
    em_methods = [m for m in methods if m in its[-1]["rest_em"]]
    sizes = {m: row.get("problems", n) for m, row in its[0]["rest_mcts"].items()}  # older runs: all n
    subsets = ", ".join(f"{_LABELS.get(m, m)} on the first {k}" for m, k in sizes.items() if k != n)
    lines = [
        "# ReST-MCTS* run report", "",
        f"Task `{config['problems']['task']}`, {n} held-out problems" + (f" ({subsets})" if subsets else "")
        + f", {config['problems']['train']} self-training "
        f"problems, {len(its) - 1} of {config['iterations']} iterations finished, seed {config['seed']}.", "",
        "## Held-out accuracy per iteration", "",
        "| iteration | " + " | ".join(f"ReST-MCTS* {_LABELS.get(m, m)}" for m in methods) + " | "
        + " | ".join(f"ReST-EM {_LABELS.get(m, m)}" for m in em_methods)
        + " | search tokens | ReST-EM tokens | train solved (MCTS* / ReST-EM) |",
        "|" + " --- |" * (len(methods) + len(em_methods) + 4),
    ]
    for it in its:
        search, em = it["search"] or {}, it["rest_em_sample"] or {}
        lines.append(
            f"| {it['iteration']} | " + " | ".join(f"{it['rest_mcts'][m]['accuracy']:.3f}" for m in methods) + " | "
            + " | ".join(f"{it['rest_em'][m]['accuracy']:.3f}" for m in em_methods)
            + f" | {search.get('generated_tokens', '-')} | {em.get('generated_tokens', '-')} | "
            + (f"{search['train_accuracy']:.3f} / {em.get('train_accuracy', float('nan')):.3f}" if search else "-")
            + " |")
    first, last = its[0], its[-1]
    lines += ["", "## Change from policy_0 to the last iteration", ""]
    for name, key in (("ReST-MCTS*", "rest_mcts"), ("ReST-EM", "rest_em")):
        for m in (em_methods if key == "rest_em" else methods):
            a0, a1 = first[key][m]["accuracy"], last[key][m]["accuracy"]
            k = sizes[m]
            lines.append(f"- {name} {_LABELS.get(m, m)}: {a0:.3f} -> {a1:.3f} ({100 * (a1 - a0):+.1f} points; "
                         f"binomial standard error of each figure about {100 * standard_error(a1, k):.1f} points"
                         + (f", {k} problems" if k != n else "") + ")")
    lines += ["", "ReST-EM samples whole solutions with the same number of generated tokens as that iteration's "
              "MCTS* search spent on the same training problems, and trains its policy by the same rule.", "",
              f"## Accuracy against generated tokens (iteration {last['iteration']})", "",
              "| method | accuracy | generated tokens per problem |", "| --- | --- | --- |"]
    for m, row in last["rest_mcts"].items():
        lines.append(f"| {_LABELS.get(m, m)} | {row['accuracy']:.3f} | {row['tokens_per_problem']:.1f} |")
    lines += ["", "![accuracy per iteration](accuracy_per_iteration.png)",
              "![accuracy against generated tokens](accuracy_vs_tokens.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return metrics


def _plot_iterations(its: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [it["iteration"] for it in its]
    for key, name, style in (("rest_mcts", "ReST-MCTS*", "-o"), ("rest_em", "ReST-EM", "--s")):
        for m in its[-1][key]:
            ax.plot(x, [it[key][m]["accuracy"] for it in its], style, label=f"{name} {_LABELS.get(m, m)}")
    ax.set_xlabel("self-training iteration")
    ax.set_ylabel("held-out accuracy")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_compute(rows: dict, path: Path, iteration: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, row in rows.items():
        ax.scatter(row["tokens_per_problem"], row["accuracy"], s=40)
        ax.annotate(_LABELS.get(m, m), (row["tokens_per_problem"], row["accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"test-time methods, policy and PRM of iteration {iteration}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_summary(run_dirs: list[str | Path]) -> str:
    """Markdown: per seed and as mean +- standard deviation over seeds, the held-out accuracy of policy_0 and
    of the last iteration for each method, from each run folder's metrics.json."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no metrics (has the run evaluated anything?)")
        seed = json.loads((Path(d) / "config.json").read_text())["seed"]
        runs.append((seed, json.loads(path.read_text())["iterations"]))
    rows = ["| method | " + " | ".join(f"seed {s}" for s, _ in runs) + " | mean change +- std |",
            "| --- |" + " --- |" * (len(runs) + 1)]
    for key, name in (("rest_mcts", "ReST-MCTS*"), ("rest_em", "ReST-EM")):
        for m in runs[0][1][-1][key]:
            first = np.array([its[0][key][m]["accuracy"] for _, its in runs])
            last = np.array([its[-1][key][m]["accuracy"] for _, its in runs])
            cells = " | ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(first, last))
            change = 100 * (last - first)
            spread = change.std(ddof=1) if len(runs) > 1 else 0.0
            rows.append(f"| {name} {_LABELS.get(m, m)} | {cells} | {change.mean():+.1f} +- {spread:.1f} points |")
    return "\n".join(rows) + "\n"
