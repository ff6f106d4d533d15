"""V-STaR's run folder results: metrics.json, report.md (per iteration the generators' held-out accuracy and the
verifiers' Best-of-N; the final Best-of-k table) and best_of_k.png (Best-of-k against k for the DPO verifier, the
ORM, majority vote and pass@k)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from jaxreason.algorithms.report import load_runs, standard_error

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

_NAMES = {"verifier": "V-STaR verifier (DPO)", "orm": "ORM", "majority": "majority vote", "pass": "pass@k"}


def collect_vstar_metrics(config: dict, stages: dict[str, Any]) -> dict:
    """metrics.json's content from the stage log."""
    n = config["evaluation"]["num_samples"]
    final = stages.get("best_of_k", {})
    iterations = []
    for t in range(config["iterations"] + 1):
        if f"eval_{t}" not in stages:
            break
        row = {"iteration": t, **stages[f"eval_{t}"]}
        if str(t) in final:
            curves = final[str(t)]["curves"]
            row["best_of_n"] = {name: curve[-1] for name, curve in curves.items() if name != "k"}
            row["auc"], row["auc_within_problems"] = final[str(t)]["auc"], final[str(t)]["auc_within_problems"]
        iterations.append(row)
    last = final.get(str(config["iterations"]), {})
    return {"num_samples": n, "test_problems": config["problems"]["test"], "iterations": iterations,
            "best_of_k": last.get("curves"), "star_best_of_k": last.get("star_curves"),
            "verifier_pairs": stages.get("verifier_pairs"),
            "training": {name: r for name, r in stages.items() if isinstance(r, dict) and "steps" in r}}


def write_vstar_report(run_dir: str | Path, config: dict, stages: dict[str, Any]) -> dict:
    run_dir = Path(run_dir)
    metrics = collect_vstar_metrics(config, stages)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    n, p = metrics["num_samples"], metrics["test_problems"]
    lines = [
        "# V-STaR run report", "",
        f"Task `{config['problems']['task']['name']}`, {config['problems']['train']} training queries, "
        f"{config['samples_per_problem']} samples each per iteration, {config['iterations']} iterations (generator "
        f"from `{config['generator_init']}`), seed {config['seed']}. Held-out: greedy and {n} samples on each of {p} "
        f"problems (binomial standard error up to {100 * standard_error(0.5, p):.1f} points). Best-of-{n}: the "
        "verifier's pick among the N samples; every Best-of-k is the unbiased estimate over all k-subsets.", "",
        "| iteration | V-STaR greedy | V-STaR pass@1 | STaR greedy | STaR pass@1 | majority@N | Best-of-N: V-STaR "
        "verifier | Best-of-N: ORM | pass@N | verifier AUC (within problems) | ORM AUC (within problems) |",
        "| --- |" + " --- |" * 10,
    ]
    for row in metrics["iterations"]:
        v, s, b = row["vstar"], row.get("star") or {}, row.get("best_of_n", {})
        auc = lambda name: (f"{_cell(row['auc'].get(name))} ({_cell(row['auc_within_problems'].get(name))})"
                            if "auc" in row and name in row["auc"] else "-")
        lines.append(f"| {row['iteration']} | {_cell(v['greedy'])} | {_cell(v['pass@1'])} | {_cell(s.get('greedy'))} "
                     f"| {_cell(s.get('pass@1'))} | {_cell(v[f'majority@{n}'])} | {_cell(b.get('verifier'))} | "
                     f"{_cell(b.get('orm'))} | {_cell(v[f'pass@{n}'])} | {auc('verifier')} | {auc('orm')} |")
    curves = metrics["best_of_k"]
    if curves:
        names = [name for name in _NAMES if name in curves]
        shown = [k for k in curves["k"] if k & (k - 1) == 0 or k == curves["k"][-1]]  # powers of two and N
        lines += ["", f"Best-of-k of the last generator's held-out samples (iteration {config['iterations']}):", "",
                  "| k | " + " | ".join(_NAMES[name] for name in names) + " |", "| --- |" + " --- |" * len(names)]
        for k in shown:
            i = curves["k"].index(k)
            lines.append(f"| {k} | " + " | ".join(f"{curves[name][i]:.3f}" for name in names) + " |")
        lines += ["", "![Best-of-k](best_of_k.png)"]
        _plot(curves, metrics["star_best_of_k"], run_dir / "best_of_k.png")
    if metrics["verifier_pairs"]:
        c = metrics["verifier_pairs"]
        lines += ["", f"Verifier data: {c['pairs']} pairs from {c['problems_with_pairs']} of {c['problems']} training "
                      f"queries ({c['only_correct']} had only correct samples, {c['only_incorrect']} only incorrect "
                      "ones: no pair)."]
    lines += ["", "| training stage | steps | examples | final loss |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {r['steps']} | {r['examples']} | {_cell(r['final_loss'])} |"
              for name, r in metrics["training"].items()]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return metrics


def _cell(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _plot(curves: dict, star: dict | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, label in _NAMES.items():
        if name in curves:
            ax.plot(curves["k"], curves[name], "--o" if name == "pass" else "-o", markersize=3, label=label)
    if star:
        ax.plot(star["k"], star["majority"], ":", color="gray", label="STaR generator, majority vote")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curves["k"][::max(1, len(curves["k"]) // 8)])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def vstar_seed_summary(run_dirs: list[str | Path]) -> str:
    """Markdown: per seed and as mean +- standard deviation over seeds, the last iteration's held-out figures and
    Best-of-k of every curve at k = 1, 2, 4, ... N, from each run folder's metrics.json."""
    runs = load_runs(run_dirs)
    n = runs[0][1]["num_samples"]
    figures: dict[str, list[float]] = {}
    for _, m in runs:
        last = m["iterations"][-1]
        row = {"V-STaR generator greedy": last["vstar"]["greedy"], "V-STaR generator pass@1": last["vstar"]["pass@1"]}
        if last.get("star"):
            row |= {"STaR generator greedy": last["star"]["greedy"], "STaR generator pass@1": last["star"]["pass@1"]}
        curves = m["best_of_k"]
        for name in _NAMES:
            for k in (k for k in curves["k"] if k & (k - 1) == 0 or k == n):
                if name in curves:
                    row[f"{_NAMES[name]}, k = {k}"] = curves[name][curves["k"].index(k)]
        for name, auc in last.get("auc_within_problems", {}).items():
            row[f"{_NAMES[name]}: AUC within problems"] = auc
        for key, value in row.items():
            figures.setdefault(key, []).append(value)
    lines = ["| figure (last iteration) | " + " | ".join(f"seed {s}" for s, _ in runs) + " | mean +- std |",
             "| --- |" + " --- |" * (len(runs) + 1)]
    for key, values in figures.items():
        x = np.asarray([np.nan if v is None else v for v in values], float)
        std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
        lines.append(f"| {key} | " + " | ".join(f"{v:.3f}" for v in x) + f" | {x.mean():.3f} +- {std:.3f} |")
    return "\n".join(lines) + "\n"
