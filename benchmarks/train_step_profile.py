"""Where the SFT train step's time goes, jaxreason beside transformers + torch, phase by phase.

The step of `benchmarks/train_step.py` (SmolLM2-135M, batch 8 x 256, float32, AdamW + clipping) cut into the
parts each engine runs, each timed alone on the same batch (median of `--steps` calls after a warm-up):

- forward: the loss alone (jax: a jitted loss; torch: the loss under `no_grad`);
- forward + backward: the loss and its gradients (jax: `jax.value_and_grad`, jitted; torch: `backward()`);
- whole step: forward, backward, clipping and AdamW (jax: `make_train_step`, state donated; torch: the loop of
  `benchmarks/train_step.py`); the optimizer's share is the whole step less forward + backward;
- decoder, forward + backward: the decoder stack alone (embedding to the final norm), its gradients taken
  through a fixed random projection of the last hidden state;
- LM head + loss, forward + backward: the vocabulary projection of fixed hidden states and the cross-entropy
  on the completion tokens, with the gradients of both the projection and the hidden states.

    python benchmarks/train_step_profile.py [--batch 8] [--seq-len 256] [--steps 3] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import machine
from train_step import BETAS, EPS, LR, MAX_GRAD_NORM, WEIGHT_DECAY, _batch

PHASES = ("forward", "forward + backward", "whole step", "decoder, forward + backward",
          "LM head + loss, forward + backward")


def _median_seconds(fn, steps: int) -> float:
    fn()  # warm-up (and, for jax, compilation)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxreason.models import load_pretrained
    from jaxreason.sharding import MeshConfig, make_mesh
    from jaxreason.train import losses
    from jaxreason.train.objectives import sft_objective
    from jaxreason.train.optimizer import OptimizerConfig, make_optimizer
    from jaxreason.train.step import init_train_state, make_train_step

    model, tokenizer = load_pretrained("smollm2-135m-instruct")
    tokens, attention_mask, loss_mask = (jnp.asarray(x) for x in _batch(tokenizer, args.batch, args.seq_len))
    batch = {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}
    graphdef, params = nnx.split(model)
    loss = lambda p: sft_objective(nnx.merge(graphdef, p), batch, None)[0]
    forward = jax.jit(loss)
    both = jax.jit(jax.value_and_grad(loss))
    e = model.config.hidden_size
    projection = jax.random.normal(jax.random.key(0), (e,), jnp.float32)
    hidden = jax.random.normal(jax.random.key(1), (args.batch, args.seq_len, e), jnp.float32)

    def decoder_loss(p):
        h, _ = nnx.merge(graphdef, p).transformer(tokens, attention_mask)
        return jnp.sum(h @ projection)

    def head_loss(p, h):
        return losses.sft_loss(nnx.merge(graphdef, p).logits_from_hidden(h), tokens, loss_mask)[0]

    decoder = jax.jit(jax.value_and_grad(decoder_loss))
    head = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1)))
    seconds = {
        "forward": _median_seconds(lambda: forward(params).block_until_ready(), args.steps),
        "forward + backward": _median_seconds(lambda: jax.block_until_ready(both(params)), args.steps),
        "decoder, forward + backward": _median_seconds(lambda: jax.block_until_ready(decoder(params)), args.steps),
        "LM head + loss, forward + backward": _median_seconds(lambda: jax.block_until_ready(head(params, hidden)),
                                                              args.steps),
    }
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LR, warmup_steps=0, total_steps=10**6,
                                               end_lr_fraction=1.0, weight_decay=WEIGHT_DECAY, b1=BETAS[0],
                                               b2=BETAS[1], eps=EPS, max_grad_norm=MAX_GRAD_NORM))
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    graphdef_t, state, shardings = init_train_state(model, optimizer, mesh)
    del model
    step = make_train_step(graphdef_t, sft_objective, optimizer, shardings, mesh)
    holder = {"state": state}
    del state

    def once():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    seconds["whole step"] = _median_seconds(once, args.steps)
    return seconds


def run_torch(args) -> dict:
    import torch
    import transformers

    from jaxreason.models.gguf_reader import smollm2_gguf_path

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    path = smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).train()
    tokens, attention_mask, loss_mask = _batch(tokenizer, args.batch, args.seq_len)
    ids, mask = torch.from_numpy(tokens).long(), torch.from_numpy(attention_mask).long()
    labels = ids.masked_fill(torch.from_numpy(loss_mask) == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    e = model.config.hidden_size
    projection = torch.randn(e)
    hidden = torch.randn(args.batch, args.seq_len, e, requires_grad=True)

    def forward():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()

    def both():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    def whole():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()

    def decoder():
        model.zero_grad(set_to_none=True)
        (model.model(input_ids=ids, attention_mask=mask).last_hidden_state @ projection).sum().backward()

    def head():
        model.zero_grad(set_to_none=True)
        hidden.grad = None
        logits = model.lm_head(hidden)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                          labels[:, 1:].reshape(-1), ignore_index=-100).backward()

    return {"forward": _median_seconds(forward, args.steps), "forward + backward": _median_seconds(both, args.steps),
            "decoder, forward + backward": _median_seconds(decoder, args.steps),
            "LM head + loss, forward + backward": _median_seconds(head, args.steps),
            "whole step": _median_seconds(whole, args.steps), "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed calls per phase (median reported)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--engine", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.engine:
        print(json.dumps((run_jax if args.engine == "jax" else run_torch)(args)))
        return

    info = machine.describe()
    print(machine.header(info), flush=True)
    results = {}
    for engine in ("jax", "torch"):
        proc = subprocess.run([sys.executable, __file__, "--engine", engine] + sys.argv[1:], capture_output=True,
                              text=True, env=os.environ)
        if proc.returncode:
            sys.exit(f"{engine} run failed:\n{proc.stderr[-3000:]}")
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    jx, pt = results["jax"], results["torch"]
    for r in (jx, pt):
        r["optimizer (whole step - forward + backward)"] = r["whole step"] - r["forward + backward"]
    print(f"SmolLM2-135M SFT step, batch {args.batch} x {args.seq_len}, float32, median of {args.steps} calls per "
          f"phase; torch {pt['threads']} threads\n")
    print("| phase | jaxreason | transformers + torch | jaxreason / torch time |")
    print("| --- | --- | --- | --- |")
    for phase in (*PHASES, "optimizer (whole step - forward + backward)"):
        print(f"| {phase} | {jx[phase]:.2f} s | {pt[phase]:.2f} s | {jx[phase] / pt[phase]:.2f} |")
    print(json.dumps({**results, "machine": info}))


if __name__ == "__main__":
    main()
