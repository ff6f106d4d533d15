"""Supervised fine-tuning: `python -m jaxreason sft --config configs/sft/NAME.yaml [key.sub=value ...]`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
from flax import nnx

from jaxreason import sharding
from jaxreason.config import to_dict
from jaxreason.data.sft_data import SFTDataset, read_jsonl
from jaxreason.distributed import is_main_process
from jaxreason.models.lora import DEFAULT_TARGETS, LoRAParam, add_lora
from jaxreason.models.pretrained import save_pretrained
from jaxreason.models.spec import ModelSpec, build_model
from jaxreason.train.checkpoint import CheckpointConfig, Checkpointer
from jaxreason.train.loop import LoopResult, run_training
from jaxreason.train.metrics import MetricsLogger
from jaxreason.train.objectives import sft_objective
from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
from jaxreason.train.step import init_train_state, make_train_step


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the decoder's kernels (`jaxreason.models.lora`); only they are trained."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        unknown = sorted(set(self.targets) - set(DEFAULT_TARGETS))
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; choose from {', '.join(DEFAULT_TARGETS)}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    model: ModelSpec
    data: str  # JSONL with {"prompt": ..., "completion": ...} per line
    run_dir: str = "runs/sft"
    max_len: int = 256
    batch_size: int = 8
    grad_accum_steps: int = 1
    num_steps: int = 100
    seed: int = 0
    save_model: bool = True  # write a Hugging Face folder to run_dir/model at the end
    optimizer: OptimizerConfig = OptimizerConfig()  # its schedule spans num_steps unless total_steps is set
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    lora: LoRAConfig | None = None  # null: train every parameter


def run_sft(config: SFTConfig) -> LoopResult:
    """Trains, checkpointing under run_dir/checkpoints and resuming from there when checkpoints exist."""
    records = read_jsonl(config.data, ("prompt", "completion"))  # data errors before a slow model load
    mesh = sharding.make_mesh(config.mesh)
    rows = mesh.shape["data"] * mesh.shape["fsdp"] * config.grad_accum_steps
    if config.batch_size % rows:
        raise ValueError(
            f"batch_size {config.batch_size} is not a multiple of mesh data x fsdp x grad_accum_steps = {rows}"
        )
    run_dir = Path(config.run_dir)
    main_process = is_main_process()  # in a multi-host job one process writes the run folder's files
    run_dir.mkdir(parents=True, exist_ok=True)
    if main_process:
        (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    model, tokenizer = build_model(config.model, config.seed)
    if tokenizer is None:
        raise ValueError(f"{config.model.pretrained}: no tokenizer beside the weights")
    dataset = SFTDataset(tokenizer, records, config.max_len)
    trainable = nnx.Param
    if config.lora is not None:
        # a key apart from the model's own initialisation, so A does not repeat the first weights drawn
        rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(config.seed), 1))
        add_lora(model, config.lora.rank, config.lora.alpha, targets=config.lora.targets, rngs=rngs)
        trainable = LoRAParam
    optimizer = make_optimizer(config.optimizer.for_steps(config.num_steps))
    graphdef, state, shardings = init_train_state(model, optimizer, mesh, trainable, seed=config.seed)
    step = make_train_step(graphdef, sft_objective, optimizer, shardings, mesh, config.grad_accum_steps)
    checkpointer = Checkpointer.from_config(run_dir / "checkpoints", config.checkpoint)
    logger = MetricsLogger(run_dir, "sft") if main_process else None
    try:
        result = run_training(
            step, state, lambda position: dataset.batches(config.batch_size, config.seed, position),
            num_steps=config.num_steps, seed=config.seed, checkpointer=checkpointer, logger=logger,
            description="sft",
        )
    finally:
        checkpointer.close()
        if logger is not None:
            logger.close()
    if config.save_model and not result.interrupted:
        # Parameters may be split across hosts: gather them everywhere, then one process writes.
        gather = jax.jit(lambda tree: tree, out_shardings=sharding.replicated(mesh))
        trained = nnx.merge(graphdef, gather(result.state.trainable), gather(result.state.frozen))
        if main_process:
            save_pretrained(trained, tokenizer, run_dir / "model")
    return result

