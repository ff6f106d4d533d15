"""The generic training loop: resume, step, log, checkpoint, and save on SIGTERM."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator

import numpy as np

from jaxreason.train.checkpoint import Checkpointer, StopSignal
from jaxreason.train.metrics import MetricsLogger, progress

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoopResult:
    state: object
    step: int
    history: list[dict[str, float]]  # one entry per step run in this call
    interrupted: bool = False  # stopped by SIGTERM after saving a checkpoint


def run_training(
    step_fn: Callable,
    state,
    batches: Callable[[int], Iterator[dict[str, np.ndarray]]],
    *,
    num_steps: int,
    seed: int,
    checkpointer: Checkpointer | None = None,
    logger: MetricsLogger | None = None,
    description: str = "train",
) -> LoopResult:
    """Runs `step_fn(state, batch)` up to `num_steps`, resuming from the latest checkpoint if there is one.

    `batches(position)` yields the data stream from batch number `position`, so a resumed run sees the
    batches it would have seen. Every checkpoint stores the state (with its RNG key, see `TrainState`) and
    the data position, so a resumed run also draws the keys it would have drawn.
    """
    start = 0
    if checkpointer is not None:
        restored = checkpointer.restore_latest(state)
        if restored is not None:
            start, state, meta = restored
            if meta.get("seed") != seed:
                raise ValueError(
                    f"{checkpointer.directory}: checkpoint was written with seed {meta.get('seed')}, run has {seed}"
                )
            start = int(meta["data_position"])
            log.info("resumed from %s at step %d", checkpointer.directory, start)
    history: list[dict[str, float]] = []
    stream = batches(start)
    step = start
    with StopSignal() as stop, progress(num_steps, start, description) as bar:
        while step < num_steps:
            batch = next(stream)
            began = time.perf_counter()
            state, metrics = step_fn(state, batch)
            loss = float(metrics["loss"])  # blocks: the timing below covers the whole step
            seconds = time.perf_counter() - began
            step += 1
            tokens = int(np.sum(batch["attention_mask"])) if "attention_mask" in batch else 0
            scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
            scalars.update(tokens_per_s=tokens / seconds, step_seconds=seconds)
            if logger is not None:
                logger.log(step, scalars)
            history.append(scalars)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
            bar.update(1)
            interrupted = stop.requested.is_set()
            if checkpointer is not None and (checkpointer.should_save(step) or interrupted or step == num_steps):
                checkpointer.save(step, state, {"data_position": step, "seed": seed}, wait=interrupted)
            if interrupted:
                log.warning("SIGTERM: saved checkpoint at step %d, stopping", step)
                return LoopResult(state, step, history, interrupted=True)
    if checkpointer is not None:
        checkpointer.wait()
    return LoopResult(state, step, history)

