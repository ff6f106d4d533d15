"""Supervised fine-tuning as a training algorithm (`algorithm: sft`): `jaxreason.train.sft` behind `train`."""

from __future__ import annotations

from pathlib import Path

from jaxreason.algorithms.registry import RunInterrupted, register_algorithm
from jaxreason.train.sft import SFTConfig, run_sft


def run(config: SFTConfig, resume: bool = False) -> dict:
    """Trains; with `resume`, continues from the checkpoints in run_dir (without, they are an error)."""
    checkpoints = Path(config.run_dir) / "checkpoints"
    if not resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ValueError(f"{checkpoints} holds a run already: pass --resume to continue it, or set run_dir=NEW")
    result = run_sft(config)
    if result.interrupted:
        raise RunInterrupted(f"sft stopped by SIGTERM at step {result.step} (checkpoint saved)")
    return {"step": result.step, "final_loss": result.history[-1]["loss"] if result.history else None}


def summarize(config: SFTConfig, metrics: dict) -> str:
    loss = float("nan") if metrics["final_loss"] is None else metrics["final_loss"]
    return f"sft: finished at step {metrics['step']}, last loss {loss:.4f}"


register_algorithm("sft", SFTConfig, run, summarize=summarize)
