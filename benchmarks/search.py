"""Batched search throughput: jaxreason's jitted mctx search against a per-node Python MCTS, side by side.

Same budget for every engine: B problems, `--simulations` expansions per problem, K candidate steps sampled
per expansion (each up to `--step-tokens` tokens, stopping at the step delimiter), the PRM scoring each new
node. Engines:
  (a) jaxreason, all B problems in one jitted `search_trees` call;
  (b) jaxreason, one problem at a time (the same compiled program with B = 1);
  (c) a straightforward Python MCTS (UCT) that calls transformers' `generate` (torch) once per expansion, K
      return sequences, and a torch value head for each node;
  (d) the same with one `generate` call per candidate, as ReST-MCTS*'s own MCTS code expands a node
      (`get_next_steps_expand` proposes each of the K next steps with its own model call).
Every engine samples from the model's full distribution at the same temperature (no top-k, no top-p), so the
engines build trees of the same statistics. Each engine runs in its own subprocess, its timed runs repeated
(`--repeats`, median), so that no engine's threads outlive its turn. (a) runs over a mesh of one CPU device
per core (`--xla_force_host_platform_device_count`, the batch split over them, see `search_trees(mesh=...)`); (b)
searches a single problem, which does not split, on one device using every core; (c) and (d) are timed at
each `--torch-threads` setting and reported at their fastest.
jaxreason searches with ReST-MCTS*'s UCT as (c) and (d) do: unvisited children first by prior, mctx's running-mean
backup, no roll-forward (`unvisited="prior", backup="running_mean", rollout_steps=0`), c = 1. With
`--compilation-cache DIR`, (a) reads and writes JAX's persistent compilation cache there: a second run with the
same folder shows (a)'s first call with its program read back from disk.
Reported: nodes/s (simulations per second) and generated tokens/s, and the ratios a/c, a/d and a/b.

    python benchmarks/search.py --model tiny      # a small random Llama (char tokenizer), weights shared by both
    python benchmarks/search.py --model smollm2   # SmolLM2-135M-Instruct from the shipped GGUF
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import machine

ENGINES = ("a_batched", "b_one_at_a_time", "c_python_torch", "d_per_candidate")
ONE_DEVICE = "a1_one_device"  # (a) on a single device using every core: what splitting over devices gains
JAX_ENGINES = ("a_batched", "b_one_at_a_time", ONE_DEVICE)


def _models(name: str, dtype: str = "float32"):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxreason.models import CausalLM, ModelConfig, ValueModel, load_pretrained
    from jaxreason.models.char_tokenizer import build_char_tokenizer

    dt = jnp.dtype(dtype)  # compute and parameters: a search never updates its weights
    if name == "smollm2":
        policy, tokenizer = load_pretrained("smollm2-135m-instruct", dtype=dt, param_dtype=dt)
    else:
        tokenizer = build_char_tokenizer()
        config = ModelConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_layers=4,
                             num_heads=8, num_kv_heads=4, head_dim=32, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        policy = CausalLM(config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0))
    prm = ValueModel(policy.config, backbone=policy.transformer, dtype=dt, rngs=nnx.Rngs(1))
    prm.head[...] = 0.05 * jax.random.normal(jax.random.key(2), prm.head[...].shape)  # an informative-ish head
    return policy, prm, tokenizer


def _setup(args):
    from jaxreason.sampling import SamplingConfig
    from jaxreason.search import MCTSConfig
    from jaxreason.tasks import get_task

    policy, prm, tokenizer = _models(args.model, args.dtype)
    task = get_task("arith")
    problems = task.problems("test", n=args.problems, seed=0)
    sampling = SamplingConfig(max_new_tokens=args.step_tokens, temperature=1.0,
                              shrink_at=tuple(float(f) for f in args.shrink_at.split(",") if f))
    # The rule (c) and (d) implement: UCT with unvisited children first, running-mean values, no roll-forward.
    config = MCTSConfig(rule="rest_mcts", num_simulations=args.simulations, num_candidates=args.candidates,
                        max_depth=6, sampling=sampling, c=1.0, unvisited="prior", backup="running_mean",
                        rollout_steps=0, expansion_sizes=tuple(float(f) for f in args.expansion_sizes.split(",")),
                        prefill_packing=tuple(float(f) for f in args.prefill_packing.split(",") if f))
    return policy, prm, tokenizer, task, problems, config


def run_jax(args, one_at_a_time: bool) -> dict:
    """(a): all problems in one search over every device; (b): one problem per search, one device. (a1) is (a)
    started without the device-per-core flag, so its mesh has one device."""
    import jax

    from jaxreason.compilation_cache import enable_compilation_cache
    from jaxreason.search import search_trees
    from jaxreason.sharding import MeshConfig, make_mesh
    from jaxreason.verifiers import ValueVerifier

    if args.compilation_cache and args.engine == "a_batched":
        enable_compilation_cache(args.compilation_cache)
    cache_hits = []
    jax.monitoring.register_event_listener(
        lambda event, **_: cache_hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    policy, prm, tokenizer, task, problems, config = _setup(args)
    verifier = ValueVerifier(prm)
    if one_at_a_time:
        batches, mesh = [[p] for p in problems[: args.single_problems]], None
    else:
        batches, mesh = [problems], make_mesh(MeshConfig(data=-1))

    def once():
        start, nodes, tokens = time.perf_counter(), 0, 0
        for i, batch in enumerate(batches):
            result, _ = search_trees(batch, policy=policy, verifier=verifier, tokenizer=tokenizer, task=task,
                                     config=config, key=jax.random.key(i + 1), mesh=mesh)
            nodes += len(batch) * config.num_simulations
            tokens += result.total_tokens
        return {"seconds": time.perf_counter() - start, "nodes": nodes, "tokens": tokens}

    start = time.perf_counter()
    search_trees(batches[0], policy=policy, verifier=verifier, tokenizer=tokenizer, task=task, config=config,
                 key=jax.random.key(0), mesh=mesh)  # compile (then cached)
    first_call = time.perf_counter() - start
    runs = [once() for _ in range(args.repeats)]
    return {**_median(runs), "first_call_s": first_call, "devices": 1 if mesh is None else mesh.size,
            "compilation_cache_hits": len(cache_hits)}


def run_torch(args, per_candidate: bool, threads: int) -> dict:
    """UCT over text nodes; every expansion is one `generate` call with K return sequences, or K calls of one."""
    import numpy as np
    import torch
    import transformers

    from jaxreason.models import save_pretrained

    policy, prm, tokenizer, task, problems, config = _setup(args)
    torch.set_num_threads(threads)

    folder = tempfile.mkdtemp()
    save_pretrained(policy, tokenizer, folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    head = torch.tensor(np.asarray(prm.head[...], np.float32))
    delimiter = task.step_delimiter

    def value(ids):
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return torch.sigmoid(hidden.float() @ head).item()

    def generate(ids, n):
        with torch.no_grad():  # top_k=0: the full distribution, as jaxreason samples (transformers' default is 50)
            out = model.generate(torch.tensor([ids]), do_sample=True, temperature=config.sampling.temperature, top_k=0,
                                 top_p=1.0, max_new_tokens=config.max_step_tokens, num_return_sequences=n,
                                 stop_strings=[delimiter], tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        return out[:, len(ids):].tolist()

    def expand(ids):
        k = config.num_candidates
        rows = [generate(ids, 1)[0] for _ in range(k)] if per_candidate else generate(ids, k)
        children = []
        for row in rows:
            step = [t for t in row if t != tokenizer.pad_token_id]
            text = tokenizer.decode(step)
            ends = task.answer_prefix.strip() in text or tokenizer.eos_token_id in step
            children.append((ids + step, len(step), ends))
        return children

    def search(problems):
        start, nodes, tokens = time.perf_counter(), 0, 0
        for problem in problems:
            root = {"ids": tokenizer.encode(task.prompt(problem), add_special_tokens=False), "n": 0, "w": 0.0,
                    "children": None, "terminal": False, "depth": 0}
            for _ in range(config.num_simulations):
                path, node = [root], root
                while node["children"] and not node["terminal"]:
                    parent_n = node["n"]
                    node = max(node["children"], key=lambda c: math.inf if c["n"] == 0 else
                               c["w"] / c["n"] + config.c * math.sqrt(2 * math.log(parent_n) / c["n"]))
                    path.append(node)
                if not node["terminal"]:
                    node["children"] = []
                    for ids, n_new, ends in expand(node["ids"]):
                        tokens += n_new
                        node["children"].append({"ids": ids, "n": 0, "w": 0.0, "children": None,
                                                 "terminal": ends or node["depth"] + 1 >= config.max_depth,
                                                 "depth": node["depth"] + 1})
                    child = node["children"][0]
                    leaf_value = value(child["ids"])
                    path.append(child)
                else:
                    leaf_value = node["w"] / max(node["n"], 1)
                nodes += 1
                for n in path:
                    n["n"] += 1
                    n["w"] += leaf_value
        return {"seconds": time.perf_counter() - start, "nodes": nodes, "tokens": tokens}

    def once():
        torch.manual_seed(0)  # every repeat samples the same candidates
        return search(problems[: args.torch_problems])

    return {**_median([once() for _ in range(args.repeats)]), "threads": threads}


def _median(runs: list[dict]) -> dict:
    """The run of median time (every run does the same work: the same seeds)."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def _run_engine(name: str, threads: int | None = None) -> dict:
    """One engine in a subprocess of its own; (a) gets one CPU device per core."""
    env = dict(os.environ)
    if name == "a_batched":
        flag = f"--xla_force_host_platform_device_count={os.cpu_count()}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    cmd = [sys.executable, __file__, "--engine", name] + sys.argv[1:]
    if threads is not None:
        cmd += ["--engine-threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"engine {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--simulations", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--step-tokens", type=int, default=24)
    parser.add_argument("--torch-problems", type=int, default=4, help="(c) and (d) are timed on this many problems")
    parser.add_argument("--single-problems", type=int, default=None,
                        help="(b) is timed on this many problems (default: all); nodes/s is a rate either way")
    # On a loaded CPU torch's multi-threaded matmuls stall (one descheduled thread holds up the rest); on an
    # idle one either may be faster, so both are timed and the faster is reported.
    parser.add_argument("--torch-threads", default="1,2", help="torch.set_num_threads values tried for (c), (d)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the median is reported")
    # Tuned per model (BENCHMARKS.md): the tiny model's steps are cheap, so six compiled expansion sizes and no
    # decode shrinking; SmolLM2's are costly, so three sizes, three shrinking phases and packed prefills.
    # Longer first calls.
    parser.add_argument("--expansion-sizes", help="MCTSConfig.expansion_sizes for (a) and (b) (default: by model, "
                        "tiny 1,0.875,0.75,0.625,0.5,0.375, smollm2 1,0.75,0.5)")
    parser.add_argument("--shrink-at", "--decode-shrink", dest="shrink_at", help="MCTSConfig.sampling.shrink_at for "
                        "(a) and (b) ('' for none; default: by model, tiny none, smollm2 0.75,0.5,0.25)")
    parser.add_argument("--prefill-packing", help="MCTSConfig.prefill_packing for (a) and (b) ('' for none; "
                        "default: by model, tiny none, smollm2 0.25,0.5,0.75)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute and weight dtype of every engine (jax and torch alike)")
    parser.add_argument("--one-device", action="store_true",
                        help="also time (a) on one device using every core (a1), and print a/a1")
    parser.add_argument("--compilation-cache", metavar="DIR", help="JAX's persistent compilation cache for (a) in "
                        "DIR (jaxreason.compilation_cache); run twice with the same DIR to time a warm first call")
    parser.add_argument("--engine", choices=(*ENGINES, ONE_DEVICE), help=argparse.SUPPRESS)
    parser.add_argument("--engine-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tuned = {"tiny": ("1,0.875,0.75,0.625,0.5,0.375", "", ""),
             "smollm2": ("1,0.75,0.5", "0.75,0.5,0.25", "0.25,0.5,0.75")}[args.model]
    for name, default in zip(("expansion_sizes", "shrink_at", "prefill_packing"), tuned):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.engine:
        if args.engine in JAX_ENGINES:
            result = run_jax(args, one_at_a_time=args.engine == "b_one_at_a_time")
        else:
            result = run_torch(args, per_candidate=args.engine == "d_per_candidate", threads=args.engine_threads)
        print(json.dumps(result))
        return

    results = {}
    for name in ENGINES + ((ONE_DEVICE,) if args.one_device else ()):
        if name in JAX_ENGINES:
            results[name] = _run_engine(name)
        else:
            tries = [_run_engine(name, int(t)) for t in args.torch_threads.split(",")]
            results[name] = min(tries, key=lambda r: r["seconds"])
            results[name]["seconds_by_threads"] = {r["threads"]: round(r["seconds"], 3) for r in tries}
    for r in results.values():
        r["nodes_per_s"] = r["nodes"] / r["seconds"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    info = machine.describe()
    print(machine.header(info))
    print(f"search, {args.model}: {args.problems} problems, {args.simulations} simulations x K={args.candidates}, "
          f"steps <= {args.step_tokens} tokens, {args.dtype}; expansion sizes {args.expansion_sizes}, decode shrink "
          f"{args.shrink_at or 'none'}, prefill packing {args.prefill_packing or 'none'}; (c), (d) timed on "
          f"{args.torch_problems} problems; median of {args.repeats}")
    for name, r in results.items():
        cache = (f", compilation cache {args.compilation_cache} ({r['compilation_cache_hits']} hits)"
                 if name == "a_batched" and args.compilation_cache else "")
        setting = (f"{r['devices']} device(s); first call {r['first_call_s']:.1f} s{cache}" if "devices" in r else
                   f"{r['threads']} torch thread(s), by threads {r['seconds_by_threads']}")
        print(f"  {name:<16} {r['nodes_per_s']:9.2f} nodes/s  {r['tokens_per_s']:9.1f} gen. tokens/s  "
              f"({r['nodes']} nodes, {r['tokens']} tokens, {r['seconds']:.2f} s; {setting})")
    a, b, c, d = (results[k]["nodes_per_s"] for k in ENGINES)
    print(f"  ratio a/c (batched jaxreason / per-node Python+torch): {a / c:.1f}x   "
          f"ratio a/d (/ one generate per candidate): {a / d:.1f}x   ratio a/b: {a / b:.1f}x"
          + (f"   ratio a/a1 (devices / one device): {a / results[ONE_DEVICE]['nodes_per_s']:.2f}x"
             if args.one_device else ""))
    print(json.dumps({"model": args.model, **results, "machine": info}))


if __name__ == "__main__":
    main()
