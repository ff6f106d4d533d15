"""Batched search throughput: jaxreason's jitted mctx search against a per-node Python MCTS, side by side.

Same budget for every engine: B problems, `--simulations` expansions per problem, K candidate steps sampled
per expansion (each up to `--step-tokens` tokens, stopping at the step delimiter), the PRM scoring each new
node. Engines:
  (a) jaxreason, all B problems in one jitted `mcts` call;
  (b) jaxreason, one problem at a time (the same compiled program with B = 1);
  (c) a straightforward Python MCTS (UCT) that calls transformers' `generate` (torch) once per expansion, K
      return sequences, and a torch value head for each node;
  (d) the same with one `generate` call per candidate, as ReST-MCTS*'s own MCTS code expands a node
      (`get_next_steps_expand` proposes each of the K next steps with its own model call).
Reported: nodes/s (expansions per second) and generated tokens/s, and the ratios a/c, a/d and a/b.

    python benchmarks/search.py --model tiny      # a small random Llama (char tokenizer), weights shared by both
    python benchmarks/search.py --model smollm2   # SmolLM2-135M-Instruct from the shipped GGUF
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from jaxreason.models import CausalLM, ModelConfig, ValueModel, load_pretrained, save_pretrained
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.search.mcts import MCTSConfig, mcts
from jaxreason.tasks import get_task


def _models(name: str):
    if name == "smollm2":
        policy, tokenizer = load_pretrained("smollm2-135m-instruct")
    else:
        tokenizer = build_char_tokenizer()
        config = ModelConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_layers=4,
                             num_heads=8, num_kv_heads=4, head_dim=32, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        policy = CausalLM(config, rngs=nnx.Rngs(0))
    prm = ValueModel(policy.config, backbone=policy.transformer, rngs=nnx.Rngs(1))
    prm.head[...] = 0.05 * jax.random.normal(jax.random.key(2), prm.head[...].shape)  # an informative-ish head
    return policy, prm, tokenizer


def run_jax(policy, prm, tokenizer, task, problems, config, one_at_a_time: bool):
    batches = [[p] for p in problems] if one_at_a_time else [problems]
    start = time.perf_counter()
    mcts(policy, prm, tokenizer, task, batches[0], config, jax.random.key(0))  # compile (cached after the first)
    first_call = time.perf_counter() - start
    start, nodes, tokens = time.perf_counter(), 0, 0
    for i, batch in enumerate(batches):
        result, _ = mcts(policy, prm, tokenizer, task, batch, config, jax.random.key(i + 1))
        nodes += len(batch) * config.num_simulations
        tokens += result.total_tokens
    return {"seconds": time.perf_counter() - start, "nodes": nodes, "tokens": tokens, "first_call_s": first_call}


def run_torch(policy, prm, tokenizer, task, problems, config, max_problems: int, threads: int, per_candidate: bool):
    """UCT over text nodes; every expansion is one `generate` call with K return sequences, or K calls of one."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)  # every repeat samples the same candidates

    folder = tempfile.mkdtemp()
    save_pretrained(policy, tokenizer, folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    head = torch.tensor(np.asarray(prm.head[...]))
    delimiter = task.step_delimiter

    def value(ids):
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return torch.sigmoid(hidden @ head).item()

    def generate(ids, n):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=True, temperature=config.temperature,
                                 max_new_tokens=config.max_step_tokens, num_return_sequences=n,
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

    start, nodes, tokens = time.perf_counter(), 0, 0
    for problem in problems[:max_problems]:
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
    # On a shared, loaded CPU torch's multi-threaded matmuls stall (one descheduled thread holds up the rest):
    # with 2 threads a tiny-model generate call took 0.1-10 s, with 1 thread a steady 0.1 s.
    parser.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads for (c) and (d)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the median is reported")
    args = parser.parse_args()

    policy, prm, tokenizer = _models(args.model)
    task = get_task("arith")
    problems = task.problems("test", n=args.problems, seed=0)
    config = MCTSConfig(rule="rest_mcts", num_simulations=args.simulations, num_candidates=args.candidates,
                        max_depth=6, max_step_tokens=args.step_tokens, temperature=1.0, chat=False)
    engines = {
        "a_batched": lambda: run_jax(policy, prm, tokenizer, task, problems, config, one_at_a_time=False),
        "b_one_at_a_time": lambda: run_jax(policy, prm, tokenizer, task, problems[:args.single_problems], config,
                                           one_at_a_time=True),
        "c_python_torch": lambda: run_torch(policy, prm, tokenizer, task, problems, config, args.torch_problems,
                                            args.torch_threads, per_candidate=False),
        "d_per_candidate": lambda: run_torch(policy, prm, tokenizer, task, problems, config, args.torch_problems,
                                             args.torch_threads, per_candidate=True),
    }
    results = {}
    for name, engine in engines.items():  # the engines take turns, so a slow spell of the machine hits all
        for _ in range(args.repeats):
            r = engine()
            results.setdefault(name, []).append(r)
    # Each engine's median run by time (the same seeds every run: the same work each time).
    first_calls = {name: runs[0]["first_call_s"] for name, runs in results.items() if "first_call_s" in runs[0]}
    results = {name: sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2] for name, runs in results.items()}
    for name, seconds in first_calls.items():  # the compile is paid by the first run only
        results[name]["first_call_s"] = seconds
    for r in results.values():
        r["nodes_per_s"] = r["nodes"] / r["seconds"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    print(f"search, {args.model}: {args.problems} problems, {args.simulations} simulations x K={args.candidates}, "
          f"steps <= {args.step_tokens} tokens; (c), (d) timed on {args.torch_problems} problems, "
          f"{args.torch_threads} torch thread(s)")
    for name, r in results.items():
        print(f"  {name:<16} {r['nodes_per_s']:9.2f} nodes/s  {r['tokens_per_s']:9.1f} gen. tokens/s  "
              f"({r['nodes']} nodes, {r['tokens']} tokens, {r['seconds']:.1f} s"
              + (f"; first call {r['first_call_s']:.1f} s" if "first_call_s" in r else "") + ")")
    a, b, c, d = (results[k]["nodes_per_s"] for k in ("a_batched", "b_one_at_a_time", "c_python_torch",
                                                       "d_per_candidate"))
    print(f"  ratio a/c (batched jaxreason / per-node Python+torch): {a / c:.1f}x   "
          f"ratio a/d (/ one generate per candidate): {a / d:.1f}x   ratio a/b: {a / b:.1f}x")
    print(json.dumps({"model": args.model, **results}))


if __name__ == "__main__":
    main()
