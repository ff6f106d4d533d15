"""rStar's run folder results: metrics.json, report.md (the paper's table: accuracy, tokens and model calls per
question for each method) and accuracy_vs_rollouts.png."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from jaxreason.algorithms.report import standard_error

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def write_rstar_report(run_dir: str | Path, config: dict, metrics: dict) -> None:
    run_dir = Path(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot(metrics, run_dir / "accuracy_vs_rollouts.png")
    n = metrics["num_problems"]
    gen = config["generator"]
    lines = [
        "# rStar run report", "",
        f"Task `{config['task']['name']}` ({config['split']} split), {n} problems, seed {config['seed']}; "
        f"generator: {gen['num_rollouts']} rollouts, depth at most {gen['max_depth']}, c = {gen['c']}; "
        f"discriminator: prefix ratios {list(config['discriminator']['ratios'])}, rule "
        f"`{config['discriminator']['rule']}`; generator reward: "
        f"{'the verifier at ' + config['verifier']['path'] if config['verifier']['path'] else 'majority confidence'}. "
        f"Binomial standard error of each accuracy: up to "
        f"{100 * standard_error(0.5, n):.1f} points.", "",
        "| method | accuracy | generated tokens / question | model calls / question | verifier tokens / question |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['method']} | {r['accuracy']:.3f} | {r['tokens_per_question']:.0f} | "
              f"{r['calls_per_question']:.1f} | {r.get('verifier_tokens_per_question', 0):.0f} |"
              for r in metrics["methods"]]
    lines += ["", "Self-consistency votes over each problem's first N samples, N the most whose mean tokens per "
              "question stay within what rStar's generator and discriminator spent together (at most "
              f"`max_self_consistency` = {config['max_self_consistency']}).", "",
              "| rollouts | trajectories / question | generator + majority | generator + discriminator | "
              "tokens / question (with discriminator) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {p['rollouts']} | {p['trajectories_per_question']:.1f} | {p['majority']:.3f} | "
              f"{p['discriminator']:.3f} | {p['tokens_per_question']['discriminator']:.0f} |"
              for p in metrics["curve"]]
    lines += ["", "![accuracy against rollouts](accuracy_vs_rollouts.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))


def _plot(metrics: dict, path: Path) -> None:
    curve = metrics["curve"]
    x = [p["rollouts"] for p in curve]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(x, [p["majority"] for p in curve], "-o", label="generator + majority")
    ax.plot(x, [p["discriminator"] for p in curve], "-o", label="generator + discriminator")
    for row, style in zip(metrics["methods"][:2], ("--", ":")):
        ax.axhline(row["accuracy"], linestyle=style, color="gray", label=row["method"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(r) for r in x])
    ax.set_xlabel("rollouts")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
