"""The per-step RL run's results: metrics.json, report.md (held-out accuracy of RFT and per-step RL at each data
size, the data-efficiency ratio, the negatives' first pits, the data and token counts) and data_efficiency.png
(held-out accuracy against the number of synthetic problems, log x)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

from jaxreason.algorithms.report import standard_error

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

_START = {"rft": "RFT_n (SFT on the positives first, as the paper)", "policy_0": "policy_0"}


def rft_data_needed(sizes: Sequence[int], rft: Sequence[float], accuracy: float) -> tuple[float | None, bool]:
    """The synthetic problems RFT needs to reach `accuracy`, and whether that is only an upper bound.

    RFT's curve is read as piecewise linear in log n between its measured points (sizes increasing): at its first
    point j with rft[j] >= accuracy, n = exp(log n_{j-1} + t (log n_j - log n_{j-1})) with
    t = (accuracy - rft[j-1]) / (rft[j] - rft[j-1]). When its first point already reaches it the answer is
    sizes[0], an upper bound (less data was not measured); (None, False) when RFT never reaches it.
    """
    j = next((j for j, a in enumerate(rft) if a >= accuracy), None)
    if j is None:
        return None, False
    if j == 0:
        return float(sizes[0]), True
    t = (accuracy - rft[j - 1]) / (rft[j] - rft[j - 1])
    return float(math.exp(math.log(sizes[j - 1]) + t * (math.log(sizes[j]) - math.log(sizes[j - 1])))), False


def data_efficiency(sizes: Sequence[int], rft: Sequence[float], step_rl: Sequence[float]) -> dict:
    """For each per-step RL point (n, accuracy a): the data RFT needs for a (`rft_data_needed`) and the ratio
    n_RFT / n. The headline is the ratio at the largest RL accuracy RFT reaches (ties: the smaller n); "RFT never
    reaches it" when RFT reaches none of them; with "RL never reaches RFT's best" added when RL's best accuracy is
    below RFT's."""
    points = []
    for n, a in zip(sizes, step_rl):
        needed, bound = rft_data_needed(sizes, rft, a)
        points.append({"n": n, "accuracy": a, "rft_needs": needed, "upper_bound": bound,
                       "ratio": None if needed is None else needed / n})
    reached = [p for p in points if p["ratio"] is not None]
    out = {"points": points, "ratio": None, "upper_bound": False, "at_accuracy": None, "n_step_rl": None,
           "n_rft": None, "notes": []}
    if reached:
        best = max(reached, key=lambda p: (p["accuracy"], -p["n"]))
        out |= {"ratio": best["ratio"], "upper_bound": best["upper_bound"], "at_accuracy": best["accuracy"],
                "n_step_rl": best["n"], "n_rft": best["rft_needs"]}
        bound = "at most " if best["upper_bound"] else ""
        headline = (f"{bound}{best['ratio']:.2f}x (per-step RL reaches {best['accuracy']:.3f} with {best['n']} "
                    f"problems; RFT needs {bound}{best['rft_needs']:.0f})")
    else:
        out["notes"].append("RFT never reaches it")
        headline = (f"RFT never reaches it (per-step RL's lowest accuracy {min(step_rl):.3f} is above RFT's best "
                    f"{max(rft):.3f})")
    if max(step_rl) < max(rft):
        out["notes"].append("RL never reaches RFT's best")
        headline += f"; RL never reaches RFT's best ({max(rft):.3f}; RL's best {max(step_rl):.3f})"
    out["headline"] = headline
    return out


def collect_step_rl_metrics(config: dict, stages: dict[str, Any], data: list[dict], pits: dict) -> dict:
    """metrics.json's content from the stage log, the per-size data rows and the whole pool's pit statistics."""
    sizes = [row["n"] for row in data]
    points = [{"n": n, "rft": stages[f"eval_rft_{n}"]["greedy"], "step_rl": stages[f"eval_step_rl_{n}"]["greedy"],
               "data": row, "rft_training": stages.get(f"rft_{n}"), "step_rl_training": stages.get(f"step_rl_{n}")}
              for n, row in zip(sizes, data)]
    return {"num_test_problems": config["problems"]["test"], "policy_0": stages["eval_policy_0"]["greedy"],
            "points": points,
            "efficiency": data_efficiency(sizes, [p["rft"] for p in points], [p["step_rl"] for p in points]),
            "pits": pits, "sample": stages["sample"], "values": stages["values"]}


def write_step_rl_report(run_dir: str | Path, config: dict, stages: dict[str, Any], data: list[dict],
                         pits: dict) -> dict:
    """Writes the three files; returns the metrics."""
    run_dir = Path(run_dir)
    metrics = collect_step_rl_metrics(config, stages, data, pits)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot(metrics, run_dir / "data_efficiency.png")
    p, v = config["problems"], config["values"]
    n_test, e = metrics["num_test_problems"], metrics["efficiency"]
    lines = [
        "# Per-step RL on negatives against positive-only SFT (RFT)", "",
        f"Task `{p['task']['name']}`, {config['samples_per_problem']} samples per synthetic problem from policy_0 "
        f"(temperature {config['sampling']['temperature']}; {100 * metrics['sample']['accuracy']:.1f}% correct, "
        f"{100 * metrics['sample']['solved']:.1f}% of problems with a correct one), prefix values from "
        f"{v['num_rollouts']} continuations per step, pit threshold {v['pit_threshold']}, seed {config['seed']}. "
        f"Held-out greedy accuracy on {n_test} problems (binomial standard error up to "
        f"{100 * standard_error(0.5, n_test):.1f} points); policy_0: {metrics['policy_0']:.3f}.", "",
        f"Equal data: both methods read the distinct samples of the same n problems, {_passes(config)}; RFT trains on "
        "the correct ones, per-step RL on all of them with A_i = Q_i - Q_{i-1} on step i's tokens, from "
        f"{_START[config.get('rl_start', 'policy_0')]} and with KL {config['update']['kl_coef']} to it.", "",
        f"**Data-efficiency ratio** (n_RFT / n_RL at equal held-out accuracy, RFT's curve interpolated in log n): "
        f"{e['headline']}.", "",
        "| synthetic problems n | RFT | per-step RL | RFT needs (problems) | ratio | negatives with a pit | mean pit "
        "step (of steps) | advantage at pit / elsewhere in negatives |",
        "| --- |" + " --- |" * 7,
    ]
    for point, eff in zip(metrics["points"], e["points"]):
        q = point["data"]["pits"]
        bound = "<= " if eff["upper_bound"] else ""
        needs = "never" if eff["rft_needs"] is None else f"{bound}{eff['rft_needs']:.0f}"
        ratio = "-" if eff["ratio"] is None else f"{bound}{eff['ratio']:.2f}"
        lines.append(f"| {point['n']} | {point['rft']:.3f} | {point['step_rl']:.3f} | {needs} | {ratio} | "
                     f"{q['with_pit']} of {q['negatives']} | {_cell(q['mean_pit_step'], 2)} "
                     f"({_cell(q['mean_negative_steps'], 2)}) | {_cell(q['advantage_at_pit'])} / "
                     f"{_cell(q['advantage_elsewhere_in_negatives'])} |")
    lines += ["", "![data efficiency](data_efficiency.png)", "", *_pit_lines(pits), "", *_data_lines(metrics), ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return metrics


def _passes(config: dict) -> str:
    rft = config["rft"]
    if rft["epochs"] is None:
        return f"{rft['num_steps']} updates of {rft['batch_size']} rows each"
    return (f"{rft['epochs']:g} passes over its own rows in batches of {rft['batch_size']} (at most "
            f"{rft['num_steps']} updates)")


def _pit_lines(pits: dict) -> list[str]:
    lines = [
        "## First pits", "",
        f"Over the whole pool's distinct samples: {pits['with_pit']} of {pits['negatives']} negatives "
        f"({_percent(pits['pit_fraction'])}) have a first pit (a step after which the estimated success is about 0, "
        "after a prefix above it); the rest fail from the prompt on. The pit is step "
        f"{_cell(pits['mean_pit_step'], 2)} on average, {_percent(pits['mean_pit_place'])} of the way through the "
        "solution.", "",
        "| steps | mean advantage A_i = Q_i - Q_{i-1} |", "| --- | --- |",
        f"| the pits | {_cell(pits['advantage_at_pit'])} |",
        f"| the other steps of negatives with a pit | {_cell(pits['advantage_elsewhere_in_negatives'])} |",
        f"| the steps of positives | {_cell(pits['advantage_in_positives'])} |", "",
        f"The pit is a negative's most negative step (ties included) in {_percent(pits['pit_is_most_negative_step'])} "
        "of the negatives with one.",
    ]
    if pits["pits_with_first_wrong_step"] is not None:
        lines[-1] += (f" Against the task's own step labels: of {pits['pits_with_first_wrong_step']} negatives with a "
                      f"pit and a known first wrong step, the pit is that step in "
                      f"{_percent(pits['pit_at_first_wrong_step'])}.")
    return lines


def _data_lines(metrics: dict) -> list[str]:
    lines = ["## Data and tokens", "",
             "| n | samples (distinct) | positives / negatives | problems solved | sample tokens | prefix-rollout "
             "tokens | RFT rows, tokens, updates | per-step RL rows, tokens, updates |", "| --- |" + " --- |" * 7]
    for point in metrics["points"]:
        d, rft, rl = point["data"], point["rft_training"] or {}, point["step_rl_training"] or {}
        lines.append(f"| {d['n']} | {d['samples']} ({d['distinct']}) | {d['positives']} / {d['negatives']} | "
                     f"{d['problems_solved']} | {d['sample_tokens']} | {d['rollout_tokens']} | {d['positives']}, "
                     f"{d['rft_tokens']}, {rft.get('steps', '-')} | {d['distinct']}, {d['step_rl_tokens']}, "
                     f"{rl.get('steps', '-')} |")
    lines += ["", "Tokens are completion tokens (prompts excluded). The prefix rollouts are continuations of "
                  "policy_0 that estimate Q; only per-step RL reads them."]
    return lines


def _cell(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _percent(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _plot(metrics: dict, path: Path) -> None:
    points = metrics["points"]
    sizes = [p["n"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [p["rft"] for p in points], "-o", label="positive-only SFT (RFT)")
    ax.plot(sizes, [p["step_rl"] for p in points], "-s", label="per-step RL (positives + negatives)")
    ax.axhline(metrics["policy_0"], color="gray", linestyle="--", label="policy_0")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("synthetic problems used")
    ax.set_ylabel(f"held-out greedy accuracy ({metrics['num_test_problems']} problems)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
