"""Self-play's run folder results: metrics.json, report.md (per round the generator's held-out accuracy beside GRPO
with the gold reward at the same generated tokens, how well its reward agreed with the gold answers, and the
verifier comparison) and selfplay.png (held-out accuracy against generated tokens; Best-of-k against k per
verifier)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from jaxreason.algorithms.report import standard_error

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {"genrm": "GenRM (direct)", "genrm_cot": "GenRM-CoT", "orm": "ORM (discriminative)",
         "reward_model": "Bradley-Terry RM", "dpo": "DPO verifier", "judge": "LLM-as-judge (policy_0)",
         "majority": "majority vote", "pass": "pass@k"}


def collect_selfplay_metrics(config: dict, stages: dict[str, Any], histories: dict[str, list[dict]]) -> dict:
    """Per round r = 0 .. T: each generator's held-out greedy accuracy and generated tokens after r rounds, and
    over the round's steps the mean reward, the mean gold accuracy of the samples and the reward's AUC against the
    gold labels; the comparison stage; the training stages."""
    s = config["steps_per_round"]
    rounds = []
    for t in range(config["rounds"] + 1):
        row = {"round": t, "step": t * s}
        for name, rows in histories.items():
            at = [h for h in rows if h["step"] == t * s and "eval" in h]
            row[name] = at[0]["eval"]["greedy"] if at else None
            row[f"{name}_tokens"] = at[0]["generated_tokens"] if at else None
            steps = [h for h in rows if (t - 1) * s < h["step"] <= t * s and h["step"] > 0]
            for key in ("reward", "gold_accuracy", "reward_auc", "reward_auc_within"):
                values = [h[key] for h in steps if h.get(key) is not None]
                row[f"{name}_{key}"] = float(np.mean(values)) if values else None
        rounds.append(row)
    return {"test_problems": config["problems"]["test"], "rounds": rounds, "samples_0": stages.get("samples_0"),
            "comparison": stages.get("comparison"),
            "training": {name: r for name, r in stages.items() if isinstance(r, dict) and "steps" in r}}


def write_selfplay_report(run_dir: str | Path, config: dict, stages: dict[str, Any],
                          histories: dict[str, list[dict]]) -> dict:
    run_dir = Path(run_dir)
    metrics = collect_selfplay_metrics(config, stages, {k: v for k, v in histories.items() if v})
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    p = config["problems"]
    lines = [
        "# Generator-verifier self-play run report", "",
        f"Task `{p['task']['name']}`, {config['rounds']} rounds of {config['steps_per_round']} RL steps "
        f"({config['prompts_per_step']} problems x {config['group_size']} samples per step), generator rewarded by "
        f"`{config['reward']}`, seed {config['seed']}. Held-out greedy accuracy on {p['test']} problems (binomial "
        f"standard error up to {100 * standard_error(0.5, p['test']):.1f} points). The gold answers label the "
        "verifiers' training data and score the evaluation; the self-play generator's reward never reads them.", "",
        "| round | generated tokens | self-play greedy | GRPO (gold reward) greedy | self-play mean reward | "
        "self-play samples' gold accuracy | reward AUC vs gold (within problems) | GRPO samples' gold accuracy |",
        "| --- |" + " --- |" * 7,
    ]
    for row in metrics["rounds"]:
        lines.append(f"| {row['round']} | {row.get('selfplay_tokens', '-')} | {_cell(row.get('selfplay'))} | "
                     f"{_cell(row.get('grpo_gold'))} | {_cell(row.get('selfplay_reward'))} | "
                     f"{_cell(row.get('selfplay_gold_accuracy'))} | {_cell(row.get('selfplay_reward_auc'))} "
                     f"({_cell(row.get('selfplay_reward_auc_within'))}) | "
                     f"{_cell(row.get('grpo_gold_gold_accuracy'))} |")
    comparison = metrics["comparison"]
    if comparison:
        n, ks = comparison["samples"], comparison["k"]
        shown = [k for k in (1, 2, 4, 8, 16, 32, 64) if k in ks]
        lines += [
            "", f"## Verifiers on the same samples: the final generator's {n} samples of each of "
                f"{comparison['problems']} held-out problems (mean accuracy {comparison['accuracy']:.3f})", "",
            "| verifier | AUC | AUC within problems | " + " | ".join(f"Best-of-{k}" for k in shown) + " |",
            "| --- | --- | --- |" + " --- |" * len(shown),
        ]
        for name, curve in comparison["curves"].items():
            by_k = dict(zip(ks, curve))
            lines.append(f"| {NAMES.get(name, name)} | {_cell(comparison['auc'].get(name))} | "
                         f"{_cell(comparison['auc_within_problems'].get(name))} | "
                         + " | ".join(_cell(by_k[k]) for k in shown) + " |")
        lines += ["", "Best-of-k is the unbiased estimate over all k-subsets of the N samples (ties by sample order); "
                  "majority vote and pass@k need no verifier."]
    lines += ["", "![self-play](selfplay.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    _plot(metrics, run_dir / "selfplay.png")
    return metrics


def _cell(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _plot(metrics: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    for name, label in (("selfplay", "self-play (verifier reward)"), ("grpo_gold", "GRPO (gold reward)")):
        points = [(r[f"{name}_tokens"], r[name]) for r in metrics["rounds"] if r.get(name) is not None]
        if points:
            ax.plot(*zip(*points), "-o", label=label)
    ax.set_xlabel("generated training tokens")
    ax.set_title("held-out greedy accuracy", fontsize=9)
    comparison = metrics["comparison"]
    if comparison:
        for name, curve in comparison["curves"].items():
            axes[1].plot(comparison["k"], curve, "--" if name in ("majority", "pass") else "-o",
                         label=NAMES.get(name, name), markersize=3)
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("k (samples per problem)")
        axes[1].set_title("Best-of-k on the final generator's held-out samples", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def selfplay_seed_summary(run_dirs: list[str]) -> str:
    """The headline figures over seeds (mean +- std): the final greedy accuracies and the verifier comparison."""
    from jaxreason.algorithms.report import load_runs

    runs = [metrics for _, metrics in load_runs(run_dirs)]
    lines = [f"self-play over {len(runs)} runs ({', '.join(run_dirs)}):"]
    last = [m["rounds"][-1] for m in runs]
    first = [m["rounds"][0] for m in runs]
    for name in ("selfplay", "grpo_gold"):
        if all(r.get(name) is not None for r in last):
            lines.append(f"  {name} greedy: {_ms([r[name] for r in first])} -> {_ms([r[name] for r in last])}")
    comparisons = [m["comparison"] for m in runs if m.get("comparison")]
    if comparisons:
        n = comparisons[0]["k"][-1]
        for name in comparisons[0]["curves"]:
            best = [c["curves"][name][-1] for c in comparisons]
            auc = [c["auc"].get(name) for c in comparisons if name in c["auc"]]
            within = [c["auc_within_problems"].get(name) for c in comparisons if name in c["auc"]]
            extra = f", AUC {_ms(auc)}, within problems {_ms(within)}" if auc and None not in auc + within else ""
            lines.append(f"  Best-of-{n} {NAMES.get(name, name)}: {_ms(best)}{extra}")
    return "\n".join(lines) + "\n"


def _ms(values: list[float]) -> str:
    return f"{np.mean(values):.3f} +- {np.std(values):.3f}"
