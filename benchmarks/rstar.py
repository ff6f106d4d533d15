"""rStar's generator: every question in one jitted search against the same search one question at a time.

Same model, prompt, settings and keys for both engines (a problem's tree depends only on its own key, so both
build the same trees; the script checks that they sampled the same tokens):
  (a) all B questions in one `rstar_trees` call (batch_size = B);
  (b) one question per call (batch_size = 1), B calls of the same compiled program.
Each engine is called once to compile (not timed), then timed over `--repeats` runs (median). Reported:
questions per second, the ratio a/b, and per question the tokens sampled and the model calls a per-sample engine
(the reference's vLLM code issues one request per sample) would make.

    python benchmarks/rstar.py --model tiny       # a small random Llama (char tokenizer)
    python benchmarks/rstar.py --model smollm2    # SmolLM2-135M-Instruct from the shipped GGUF
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import machine
import numpy as np
from flax import nnx

from jaxreason.models import CausalLM, ModelConfig, load_pretrained
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.search.rstar import rstar_trees
from jaxreason.search.rstar_config import RStarConfig
from jaxreason.tasks import ArithTask


def _model(name: str):
    if name == "smollm2":
        return load_pretrained("smollm2-135m-instruct", dtype=jnp.float32)
    tokenizer = build_char_tokenizer()
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                         num_kv_heads=4, head_dim=32, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    return CausalLM(config, rngs=nnx.Rngs(0)), tokenizer


def _search(problems, policy, tokenizer, task, config, chat):
    """Every problem's tree (numpy), in batches of config.batch_size."""
    out = []
    for tree, real in rstar_trees(problems, policy=policy, tokenizer=tokenizer, task=task, config=config,
                                  key=jax.random.key(0), chat=chat):
        visited = np.asarray(tree.node_visits) > 0
        out += [(np.asarray(tree.embeddings.generated_tokens)[r] * visited[r],
                 np.asarray(tree.embeddings.model_calls)[r] * visited[r],
                 np.asarray(tree.embeddings.candidates)[r]) for r in range(real)]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    policy, tokenizer = _model(args.model)
    chat = args.model == "smollm2"
    task = ArithTask(min_ops=1, max_ops=2, max_operand=20, max_factor=9, last_number=True)
    problems = task.problems("test", n=args.problems, seed=0)
    batched = RStarConfig(num_rollouts=args.rollouts, answer_tokens=16, solution_tokens=48, shrink_at=(0.5, 0.25),
                          batch_size=args.problems)
    engines = {"a_batched": batched, "b_one_at_a_time": dataclasses.replace(batched, batch_size=1)}
    results = {}
    for name, config in engines.items():
        started = time.perf_counter()
        _search(problems[:config.batch_size], policy, tokenizer, task, config, chat)  # compile
        first = time.perf_counter() - started
        times, trees = [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            trees = _search(problems, policy, tokenizer, task, config, chat)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        results[name] = {"questions_per_s": len(problems) / seconds, "seconds": seconds, "first_call_s": first,
                         "tokens_per_question": float(np.mean([t.sum() for t, _, _ in trees])),
                         "calls_per_question": float(np.mean([c.sum() for _, c, _ in trees])), "trees": trees}
        print(f"{name}: {results[name]['questions_per_s']:.3f} questions/s ({seconds:.1f} s for {len(problems)}; "
              f"first call {first:.1f} s)", flush=True)
    same = all(np.array_equal(x[2], y[2]) for x, y in zip(results["a_batched"]["trees"],
                                                          results["b_one_at_a_time"]["trees"]))
    a = results["a_batched"]
    print(machine.header())
    print(f"model {args.model}, {len(problems)} questions, {args.rollouts} rollouts, {jax.device_count()} device(s)")
    print(f"ratio a/b: {a['questions_per_s'] / results['b_one_at_a_time']['questions_per_s']:.2f}x")
    print(f"per question: {a['tokens_per_question']:.0f} tokens sampled, {a['calls_per_question']:.1f} model calls "
          f"(one per sample); same trees in both engines: {same}")


if __name__ == "__main__":
    main()
