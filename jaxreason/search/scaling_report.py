"""The scaling study's report: report.md and two PNG plots (accuracy against compute per difficulty level and
method; the compute-optimal strategy against the best fixed setting and best-of-N per budget), from the metrics
of `jaxreason.search.scaling.analyse`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

_LABELS = {"greedy": "greedy", "self_consistency": "self-consistency", "best_of_n": "best-of-N (PRM)",
           "weighted_vote": "PRM-weighted vote", "weighted_best_of_n": "PRM-weighted best-of-N",
           "beam_search": "PRM beam search", "mcts": "MCTS* (PRM)"}


def write_scaling_report(run_dir: str | Path, config: dict, metrics: dict) -> None:
    run_dir = Path(run_dir)
    _plot_methods(metrics, run_dir / "accuracy_vs_compute.png")
    _plot_strategies(metrics, run_dir / "compute_optimal.png")
    levels = list(metrics["levels"])
    pool, sampling = config["pool"], config["budget"]["baseline"]["sampling"]
    verifier = config["verifier"]["path"] or "PRM_0, trained in this run on rollout-labelled warm-up solutions"
    lines = [
        "# Test-time compute scaling study", "",
        f"Task `{config['problems']['task']['name']}`, {metrics['problems']} held-out problems ({metrics['validation']}"
        f" validation, {metrics['test']} test), policy `{_policy(config)}`, verifier: {verifier}; seed "
        f"{config['seed']}.", "",
        "**Compute** is counted per problem as generated plus verifier tokens, in samples-equivalent: divided by the "
        f"mean length of one sampled solution of the policy ({metrics['tokens_per_sample']:.1f} tokens at "
        f"temperature {sampling['temperature']}, at most {sampling['max_new_tokens']}). Self-consistency, best-of-n "
        f"and PRM-weighted vote at n = 1, 2, 4, ... come from one pool of {pool['num_samples']} samples per problem "
        f"(each problem's accuracy averaged over up to {pool['max_subsets']} subsets of n samples; n samples cost n "
        "times the problem's mean sample); every other setting is one run over the same problems. A setting's "
        "compute is its mean over all held-out problems, the same in every difficulty level.", "",
        f"**Difficulty** is each problem's pass rate among its {pool['num_samples']} pool samples (Snell et al.'s "
        "oracle difficulty, from the policy's own samples, which also make the pool's accuracies), in "
        f"{config['num_bins']} quantile bins of that pass rate; problems with equal pass rates share a bin, so there "
        f"can be fewer. Level 1 is the easiest.", "",
        "| level | problems | pass rate |", "| --- | --- | --- |",
        *[f"| {k} | {v['problems']} | {v['pass_rate_min']:.2f} - {v['pass_rate_max']:.2f} |"
          for k, v in metrics["levels"].items()],
        "", "## Accuracy against compute (all held-out problems)", "",
        "| setting | compute (samples-eq.) | generated tokens / problem | verifier tokens / problem | accuracy | "
        + " | ".join(f"level {k}" for k in levels) + " |",
        "|" + " --- |" * (5 + len(levels)),
        *[f"| {s['name']} | {s['compute']:.2f} | {s['generated_tokens_per_problem']:.1f} | "
          f"{s['verifier_tokens_per_problem']:.1f} | {s['accuracy']:.3f} | "
          + " | ".join(f"{s['accuracy_by_level'][k]:.3f}" for k in levels) + " |"
          for s in sorted(metrics["settings"], key=lambda s: (s["method"], s["compute"]))],
        "", "![accuracy against compute per difficulty level](accuracy_vs_compute.png)", "",
        "## Compute-optimal against fixed settings (test half)", "",
        "At each budget the compute-optimal strategy takes, per difficulty level, the setting within the budget with "
        "the best accuracy on that level's validation problems; the best fixed setting is the one best on all "
        f"validation problems; {_LABELS.get(metrics['reference']['method'])} spends the budget on its largest n. All "
        "three are scored on the test problems.", "",
        "| budget (samples-eq.) | compute-optimal | its compute | its choice per level | best fixed | its choice | "
        f"{_LABELS.get(metrics['reference']['method'])} | its setting |",
        "|" + " --- |" * 8,
    ]
    for opt, fixed, ref in zip(metrics["compute_optimal"], metrics["best_fixed"], metrics["reference"]["curve"]):
        choice = ", ".join(f"{k}: {v}" for k, v in opt["choice"].items()) or "-"
        lines.append(f"| {opt['budget']:g} | {_cell(opt['accuracy'])} | {_cell(opt['compute'], 2)} | {choice} | "
                     f"{_cell(fixed['accuracy'])} | {fixed['choice'] or '-'} | {_cell(ref['accuracy'])} | "
                     f"{ref['setting'] or '-'} |")
    lines += ["", ratio_sentence(metrics), "", "![compute-optimal against fixed settings](compute_optimal.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))


def ratio_sentence(metrics: dict) -> str:
    """Where the compute-optimal strategy matches the reference's costliest setting, and its cheapest setting of the
    best test accuracy."""
    costliest, best = metrics["compute_ratio"], metrics["compute_ratio_at_best"]
    if costliest is None:
        return f"Compute ratio: no {metrics['reference']['method']} setting was measured."
    text = "Compute ratio: " + _matched(costliest)
    if best["reference"] != costliest["reference"]:
        text += " Against its cheapest setting of the best test accuracy: " + _matched(best)
    return text


def _matched(r: dict) -> str:
    head = (f"{r['reference']} reaches {r['reference_accuracy']:.3f} on the test half at {r['reference_compute']:.1f} "
            f"samples-equivalent (budget {r['reference_budget']:g}); ")
    if r["ratio"] is None:
        return head + "the compute-optimal strategy does not reach that accuracy at any budget."
    return head + f"the compute-optimal strategy matches it at budget {r['budget']:g}: {r['ratio']:g}x less compute."


def _policy(config: dict) -> str:
    policy = config["policy"]
    base = policy["pretrained"] or "scratch model ({hidden_size} wide, {num_layers} layers)".format(**policy["scratch"])
    return base + (", after SFT on gold solutions" if config["sft"] else "")


def _cell(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _plot_methods(metrics: dict, path: Path) -> None:
    """Accuracy against compute, one panel per difficulty level and one for all problems, one curve per method."""
    panels = [("all problems", "accuracy"), *[(f"level {k}", k) for k in metrics["levels"]]]
    methods = list(dict.fromkeys(s["method"] for s in metrics["settings"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharey=True, squeeze=False)
    for ax, (title, key) in zip(axes[0], panels):
        for method in methods:
            rows = sorted((s for s in metrics["settings"] if s["method"] == method), key=lambda s: s["compute"])
            y = [s["accuracy"] if key == "accuracy" else s["accuracy_by_level"][key] for s in rows]
            ax.plot([s["compute"] for s in rows], y, "-o", ms=3, label=_LABELS.get(method, method))
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("compute (samples-equivalent)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy")
    axes[0, -1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_strategies(metrics: dict, path: Path) -> None:
    """Test accuracy against budget: compute-optimal, the best fixed setting and the reference method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    reference = _LABELS.get(metrics["reference"]["method"], metrics["reference"]["method"])
    for rows, label, style in ((metrics["compute_optimal"], "compute-optimal (per level)", "-o"),
                               (metrics["best_fixed"], "best fixed setting", "--s"),
                               (metrics["reference"]["curve"], reference, ":^")):
        shown = [r for r in rows if r["accuracy"] is not None]
        ax.plot([r["budget"] for r in shown], [r["accuracy"] for r in shown], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (samples-equivalent: generated + verifier tokens)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
