"""SCoRe's run folder results: metrics.json, report.md (the self-correction table of every model) and
self_correction.png (the held-out metrics over RL steps), from the stage log and the per-step history."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

from jaxreason.algorithms.report import load_runs, standard_error

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

MODELS = {"base": "base model + instruction", "star": "STaR (self-corrections)", "pair_sft": "Pair-SFT",
          "stage_1": "SCoRe Stage I", "score": "SCoRe"}
METRICS = {"acc_t1": "Acc@t1", "acc_t2": "Acc@t2", "delta": "Delta(t1, t2)", "delta_i_to_c": "Delta i->c",
           "delta_c_to_i": "Delta c->i", "changed": "attempt 2 differs"}


def collect_score_metrics(config: dict, stages: dict, rows: list[dict]) -> dict:
    """The held-out metrics of each model (base, baselines, SCoRe after its last Stage I phase and at the end)
    and the per-step history."""
    evaluations = [{"step": r["step"], "stage": r["stage"], "generated_tokens": r["generated_tokens"], **r["eval"]}
                   for r in rows if "eval" in r]
    models = {"base": stages["eval_base"]}
    models |= {name: stages[f"eval_{name}"] for name in ("star", "pair_sft") if f"eval_{name}" in stages}
    ends = np.cumsum([p["steps"] for p in config["schedule"]]).tolist()
    stage_1_ends = [end for end, p in zip(ends, config["schedule"]) if p["stage"] == 1]
    by_step = {e["step"]: e for e in evaluations}
    if stage_1_ends and stage_1_ends[-1] in by_step:
        models["stage_1"] = _figures(by_step[stage_1_ends[-1]])
    if evaluations and evaluations[-1]["step"] == ends[-1]:
        models["score"] = _figures(evaluations[-1])
    return {"test_problems": config["problems"]["test"], "num_samples": config["evaluation"]["num_samples"],
            "models": models, "evaluations": evaluations,
            "baseline_episodes": stages.get("base_episodes"),
            "training": {name: s for name, s in stages.items() if isinstance(s, dict) and "steps" in s},
            "steps": [{k: v for k, v in r.items() if k != "eval"} for r in rows if r["step"] > 0]}


def write_score_report(run_dir: str | Path, config: dict, stages: dict, rows: list[dict]) -> dict:
    run_dir = Path(run_dir)
    metrics = collect_score_metrics(config, stages, rows)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    n, samples = metrics["test_problems"], metrics["num_samples"]
    schedule = ", ".join(f"Stage {'I' if p['stage'] == 1 else 'II'} for {p['steps']} steps"
                         for p in config["schedule"])
    t = config["evaluation"]["sampling"]["temperature"]
    lines = [
        "# SCoRe run report", "",
        f"Task `{config['problems']['task']['name']}`, seed {config['seed']}; {schedule}; "
        f"{config['prompts_per_step']} problems x {config['group_size']} episodes per step; beta1 {config['beta1']}, "
        f"beta2 {config['beta2']}, alpha {config['alpha']}. Held-out: {samples} episode(s) of each of {n} problems "
        f"at temperature {t} (binomial standard error of an accuracy up to "
        f"{100 * standard_error(0.5, n * samples):.1f} points, counting episodes as independent). Delta i->c and "
        "Delta c->i are fractions of all episodes; Delta(t1, t2) = Acc@t2 - Acc@t1 = i->c - c->i.", "",
        "| model | " + " | ".join(METRICS.values()) + " |", "| --- |" + " --- |" * len(METRICS),
    ]
    for name, m in metrics["models"].items():
        lines.append(f"| {MODELS[name]} | " + " | ".join(_signed(k, m.get(k)) for k in METRICS) + " |")
    if metrics["baseline_episodes"] is not None:
        training = metrics["training"]
        lines += ["", "Baselines' training examples (from the base model's episodes on training problems): STaR "
                  f"{training.get('star', {}).get('examples', '-')}, Pair-SFT "
                  f"{training.get('pair_sft', {}).get('examples', '-')}."]
    lines += ["", "| step | stage | generated tokens | " + " | ".join(METRICS.values()) + " |",
              "| --- | --- | --- |" + " --- |" * len(METRICS)]
    for e in metrics["evaluations"]:
        lines.append(f"| {e['step']} | {e['stage'] or '-'} | {e['generated_tokens']} | "
                     + " | ".join(_signed(k, e.get(k)) for k in METRICS) + " |")
    lines += ["", "![self-correction over training](self_correction.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    _plot(metrics, run_dir / "self_correction.png")
    return metrics


def score_seed_summary(run_dirs: list[str | Path]) -> str:
    """Markdown: every model's held-out metrics per seed and as mean +- standard deviation over the seeds."""
    runs = load_runs(run_dirs)
    lines = ["| model | figure | " + " | ".join(f"seed {s}" for s, _ in runs) + " | mean +- std |",
             "| --- | --- |" + " --- |" * (len(runs) + 1)]
    for name in MODELS:
        for key, label in METRICS.items():
            values = [m["models"].get(name, {}).get(key) for _, m in runs]
            if all(v is None for v in values):
                continue
            x = np.asarray([np.nan if v is None else v for v in values], float)
            std = float(np.nanstd(x, ddof=1)) if np.sum(~np.isnan(x)) > 1 else 0.0
            lines.append(f"| {MODELS[name]} | {label} | " + " | ".join(f"{v:+.3f}" if key.startswith("delta")
                                                                      else f"{v:.3f}" for v in x)
                         + f" | {np.nanmean(x):.3f} +- {std:.3f} |")
    return "\n".join(lines) + "\n"


def _figures(evaluation: dict) -> dict:
    return {k: evaluation[k] for k in METRICS if k in evaluation}


def _signed(key: str, x) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if key == "delta" else f"{x:.3f}"


def _plot(metrics: dict, path: Path) -> None:
    evaluations = metrics["evaluations"]
    steps = [e["step"] for e in evaluations]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("acc_t1", "acc_t2"):
        axes[0].plot(steps, [e[key] for e in evaluations], "-o", label=METRICS[key])
    for key in ("delta", "delta_i_to_c", "delta_c_to_i"):
        axes[1].plot(steps, [e[key] for e in evaluations], "-o", label=METRICS[key])
    axes[1].axhline(0, color="gray", lw=0.8)
    stage_1 = [e["step"] for e, nxt in zip(evaluations, evaluations[1:]) if e["stage"] == 1 and nxt["stage"] == 2]
    for ax in axes:
        for x in stage_1:
            ax.axvline(x, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("RL step (dashed: Stage I -> II)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("held-out accuracy per attempt", fontsize=9)
    axes[1].set_title("held-out self-correction", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
