"""One process of the two-process test (tests/test_distributed.py); not collected by pytest.

`python tests/distributed_worker.py PROCESS_ID PORT` joins a 2-process job on 127.0.0.1:PORT (run it with
JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=4), builds the global 8-device
mesh for every shape in MESH_SHAPES, runs the sharded SFT step on the same batch in every process, reads the
trained weights whole (`jaxreason.distributed.addressable`: fsdp splits them over each process's devices) and
prints {"process": i, "devices": n, "losses": {shape: [[loss, grad_norm], ...]}, "weights": {shape: sum}} as its
last line.
The test imports `train` from here to compute the single-process reference.

`python tests/distributed_worker.py PROCESS_ID PORT --late SECONDS`: process 1 sleeps SECONDS (longer than the 30 s
gloo gives a peer to join a collective) before both read a row-split array whole with `addressable`; each prints
the array's sum.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

MESH_SHAPES = [(2, 4, 1)]  # data splits the batch over the processes, fsdp the parameters inside each
STEPS = 2


def batch(rows: int = 8, length: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, (rows, length)).astype(np.int32)
    attention = np.ones_like(tokens)
    attention[::2, -3:] = 0  # some right padding
    loss_mask = attention.copy()
    loss_mask[:, :5] = 0  # the prompt
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}


def train(mesh_shape: tuple[int, int, int], steps: int = STEPS) -> tuple[list[list[float]], float]:
    """[loss, grad_norm] per step of the sharded SFT step on the global mesh of this shape, and the sum of the
    trained weights' absolute values, read whole on this process."""
    import jax
    from flax import nnx

    from jaxreason import sharding
    from jaxreason.distributed import addressable
    from jaxreason.models import CausalLM, ModelConfig
    from jaxreason.train.objectives import sft_objective
    from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
    from jaxreason.train.step import init_train_state, make_train_step

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    # No warmup: the first step already moves the parameters, so the second loss checks the update.
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10))
    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
    model = nnx.jit(lambda: CausalLM(config, rngs=nnx.Rngs(0)))()  # one compile, not one per initialiser
    graphdef, state, shardings = init_train_state(model, optimizer, mesh)
    step = make_train_step(graphdef, sft_objective, optimizer, shardings, mesh)
    out = []
    for _ in range(steps):
        state, metrics = step(state, batch())
        out.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    weights = jax.tree.leaves(addressable(state.trainable))
    return out, float(sum(np.abs(np.asarray(w, np.float64)).sum() for w in weights))


def late_peer(seconds: float) -> float:
    """The sum of a [8, 4] array whose rows are split over both processes' devices, read whole after process 1
    sleeps `seconds`."""
    import jax

    from jaxreason import sharding
    from jaxreason.distributed import addressable

    mesh = sharding.make_mesh(sharding.MeshConfig(8, 1, 1))
    rows = np.arange(32, dtype=np.float32).reshape(8, 4)[4 * jax.process_index():4 * jax.process_index() + 4]
    split = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, 2), rows)
    if jax.process_index() == 1:
        time.sleep(seconds)
    return float(np.asarray(addressable(split)).sum())


def main() -> None:
    process_id, port = int(sys.argv[1]), int(sys.argv[2])
    from jaxreason import distributed

    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)  # no-op
    import jax

    if sys.argv[3:4] == ["--late"]:
        print(json.dumps({"sum": late_peer(float(sys.argv[4]))}), flush=True)
        return

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    results = {"x".join(map(str, shape)): train(shape) for shape in MESH_SHAPES}
    print(json.dumps({"process": jax.process_index(), "main": distributed.is_main_process(),
                      "devices": jax.device_count(), "losses": {k: v[0] for k, v in results.items()},
                      "weights": {k: v[1] for k, v in results.items()}}), flush=True)


if __name__ == "__main__":
    from two_processes import run_worker

    run_worker(main)
