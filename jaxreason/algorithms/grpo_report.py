"""GRPO's run folder results: metrics.json, report.md and training_curves.png, from the per-step history."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from jaxreason.algorithms.report import standard_error

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

_LABELS = {"greedy": "greedy accuracy", "sample": "sample accuracy"}
_CURVES = (("reward", "mean reward of the samples"), ("kl", "KL to policy_0 (k3, per token)"),
           ("response_length", "response length (tokens)"))


def write_grpo_report(run_dir: str | Path, config: dict, rows: list[dict]) -> dict:
    """Writes the three files; returns the metrics (evaluations with their step and generated tokens)."""
    run_dir = Path(run_dir)
    n = config["problems"]["test"]
    evaluations = [{"step": r["step"], "generated_tokens": r["generated_tokens"], **r["eval"]}
                   for r in rows if "eval" in r]
    steps = [{k: v for k, v in r.items() if k != "eval"} for r in rows if r["step"] > 0]
    metrics = {"num_test_problems": n, "evaluations": evaluations, "steps": steps}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot(evaluations, steps, run_dir / "training_curves.png")

    first, last = evaluations[0], evaluations[-1]
    accuracies = [k for k in first if k not in ("step", "generated_tokens")]
    change = 100 * (last["greedy"] - first["greedy"])
    lines = [
        "# GRPO run report", "",
        f"Task `{config['problems']['task']['name']}`, {n} held-out problems, {config['problems']['train']} training "
        f"problems, {config['prompts_per_step']} problems x {config['group_size']} samples per step, "
        f"{last['step']} of {config['num_steps']} steps, seed {config['seed']}.", "",
        f"Held-out greedy accuracy: {first['greedy']:.3f} (policy_0) -> {last['greedy']:.3f} ({change:+.1f} points; "
        f"binomial standard error of each figure about {100 * standard_error(last['greedy'], n):.1f} points) after "
        f"{last['generated_tokens']} generated training tokens.", "",
        "| step | generated tokens | " + " | ".join(f"held-out {_LABELS.get(k, k)}" for k in accuracies)
        + " | mean reward (that step) | KL | response length |",
        "|" + " --- |" * (len(accuracies) + 5),
    ]
    by_step = {s["step"]: s for s in steps}
    for e in evaluations:
        s = by_step.get(e["step"], {})
        cells = [_cell(e.get(k)) for k in accuracies] + [_cell(s.get("reward")), _cell(s.get("kl"), 4),
                                                         _cell(s.get("response_length"), 1)]
        lines.append(f"| {e['step']} | {e['generated_tokens']} | " + " | ".join(cells) + " |")
    lines += ["", "![training curves](training_curves.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return metrics


def _cell(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _plot(evaluations: list[dict], steps: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    ax = axes[0, 0]
    for key in [k for k in evaluations[0] if k not in ("step", "generated_tokens")]:
        ax.plot([e["step"] for e in evaluations], [e.get(key) for e in evaluations], "-o", label=_LABELS.get(key, key))
    ax.set_title("held-out accuracy", fontsize=9)
    ax.legend(fontsize=7)
    for ax, (key, title) in zip(axes.flat[1:], _CURVES):
        ax.plot([s["step"] for s in steps], [s[key] for s in steps])
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
