"""Command-line entry point: `python -m jaxreason {generate,sft,search,scaling,train,report,plan} ...`.

Errors a user can fix (a missing or unreadable file, an unknown preset, a bad checkpoint, a package that is
not installed) print one line naming the problem and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _generate(args: argparse.Namespace) -> None:
    import jax

    from jaxreason.models import load_pretrained
    from jaxreason.sampling import SamplingConfig, build_stop_table, decode_completions, encode_prompts, generate

    model, tokenizer = load_pretrained(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer files beside the weights")
    chat = bool(getattr(tokenizer, "chat_template", None)) and not args.no_chat
    tokens, mask = encode_prompts(tokenizer, args.prompt, chat=chat)
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
    )
    stop_table = build_stop_table(tokenizer, args.stop, model.config.vocab_size) if args.stop else None
    eos_ids = tuple(model.config.eos_token_ids) or (tokenizer.eos_token_id,)
    start = time.perf_counter()
    out = generate(model, tokens, mask, jax.random.key(args.seed), config,
                   eos_ids=eos_ids, pad_id=tokenizer.pad_token_id or 0, stop_table=stop_table)
    completions = decode_completions(tokenizer, out)
    seconds = time.perf_counter() - start
    for prompt, completion in zip(args.prompt, completions):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(completion)
    print(f"[{int(out.lengths.sum())} tokens in {seconds:.1f}s, compile included]", file=sys.stderr)


def _sft(args: argparse.Namespace) -> None:
    _run_algorithm(args, resume=True, only="sft")  # an sft run always continues from its checkpoints


def _search(args: argparse.Namespace) -> None:
    from jaxreason.config import load_config
    from jaxreason.search.command import SearchCommandConfig, run_search_command

    run_search_command(load_config(SearchCommandConfig, args.config, args.overrides))


def _scaling(args: argparse.Namespace) -> None:
    from jaxreason.algorithms.registry import RunInterrupted
    from jaxreason.config import load_config
    from jaxreason.search.scaling_command import ScalingConfig, run_scaling
    from jaxreason.search.scaling_report import ratio_sentence

    config = load_config(ScalingConfig, args.config, args.overrides)
    try:
        metrics = run_scaling(config)
    except RunInterrupted as e:
        print(f"jaxreason scaling: {e}; run the same command again", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, after the checkpoint was saved
    print(ratio_sentence(metrics))
    print(f"report: {config.run_dir}/report.md")


def _train(args: argparse.Namespace) -> None:
    _run_algorithm(args, resume=args.resume)


def _run_algorithm(args: argparse.Namespace, resume: bool, only: str | None = None) -> None:
    """Runs the algorithm that `args.config` names in `algorithm:` (`only`: that one, also when not named)."""
    from jaxreason import distributed

    distributed.initialize()  # multi-host jobs (SLURM, TPU pods, JAXREASON_*); before any jax computation
    from jaxreason.algorithms.registry import load_algorithm_config

    algorithm, config = load_algorithm_config(args.config, args.overrides, default=only)
    if only is not None and algorithm.name != only:
        raise ValueError(f"{args.config}: algorithm {algorithm.name!r} runs with `jaxreason train`, not `{only}`")
    try:
        metrics = algorithm.run(config, resume)
    except algorithm.interrupted as e:
        again = "run the same command again" if only else "continue with --resume"
        print(f"jaxreason {args.command}: {e}; {again}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, after the checkpoint was saved
    print(algorithm.summary(config, metrics))


def _report(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from jaxreason.algorithms.report import seed_summary
    from jaxreason.algorithms.score_report import score_seed_summary
    from jaxreason.algorithms.selfplay_report import selfplay_seed_summary
    from jaxreason.algorithms.vstar_report import vstar_seed_summary

    first = Path(args.run_dirs[0]) / "metrics.json"
    metrics = json.loads(first.read_text()) if first.exists() else {}
    summary = vstar_seed_summary if "best_of_k" in metrics else score_seed_summary if "models" in metrics \
        else selfplay_seed_summary if "comparison" in metrics else seed_summary
    print(summary(args.run_dirs), end="")


def _plan(args: argparse.Namespace) -> None:
    from jaxreason.memory_plan import GIB, devices_needed, format_plan, load_plan_config, plan_config

    config = load_plan_config(args.config, args.overrides)
    devices = args.devices or _default_devices(config.mesh)
    plan = plan_config(config, devices, args.prompt_len)
    memory = int(args.memory_gib * GIB)
    needed = None if plan.peak <= memory else devices_needed(config, memory, devices + 1, args.prompt_len)
    print(format_plan(plan, memory, needed, args.prompt_len))


def _default_devices(mesh) -> int:
    """The mesh's own count when it fixes every axis, else this machine's devices."""
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    if -1 not in sizes:
        return sizes[0] * sizes[1] * sizes[2]
    import jax

    return jax.device_count()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxreason", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="sample a completion from a model")
    gen.add_argument("--model", default="smollm2-135m-instruct", help="preset, Hugging Face folder or .gguf file")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.set_defaults(run=_generate)

    sft = commands.add_parser("sft", help="supervised fine-tuning on a JSONL of {prompt, completion}")
    sft.add_argument("--config", required=True, help="YAML file (configs/sft/*.yaml)")
    sft.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    sft.set_defaults(run=_sft)

    search = commands.add_parser("search", help="compare MCTS and the test-time baselines on a problem set")
    search.add_argument("--config", required=True, help="YAML file (configs/search/*.yaml)")
    search.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    search.set_defaults(run=_search)

    scaling = commands.add_parser("scaling", help="test-time compute scaling study: methods at budgets per difficulty "
                                                  "bin, and the compute-optimal choice (resumes a finished stage)")
    scaling.add_argument("--config", required=True, help="YAML file (configs/scaling/*.yaml)")
    scaling.add_argument("overrides", nargs="*", help="key.sub=value overrides (run_dir=PATH, seed=1, ...)")
    scaling.set_defaults(run=_scaling)

    train = commands.add_parser("train", help="run the training algorithm a config names (rest_mcts, sft, ...)")
    train.add_argument("--config", required=True, help="YAML file naming its `algorithm:` (configs/rest_mcts/*.yaml)")
    train.add_argument("--resume", action="store_true", help="continue the run in run_dir from its last stage")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides (run_dir=PATH, seed=1, ...)")
    train.set_defaults(run=_train)

    report = commands.add_parser("report", help="headline figures over seeds, from several train runs (ReST-MCTS*, "
                                                "V-STaR, SCoRe, self-play)")
    report.add_argument("run_dirs", nargs="+", help="run folders of `train` (one per seed)")
    report.set_defaults(run=_report)

    plan = commands.add_parser("plan", help="bytes per device of a train config's parameters, optimizer state, "
                                            "activations and search KV caches, without allocating them")
    plan.add_argument("--config", required=True, help="YAML file naming its `algorithm:` (configs/rest_mcts/*.yaml)")
    plan.add_argument("--devices", type=int, default=0,
                      help="plan for this many devices (default: the mesh's own count, else this machine's)")
    plan.add_argument("--prompt-len", type=int, default=256, help="longest search prompt in tokens")
    plan.add_argument("--memory-gib", type=float, default=80.0, help="device memory to fit in (H100: 80)")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides (policy.pretrained=configs/shapes/...)")
    plan.set_defaults(run=_plan)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    # ModuleNotFoundError is a package that is not installed; other ImportErrors are bugs and keep their traceback.
    try:
        from jaxreason.compilation_cache import enable_compilation_cache

        enable_compilation_cache()  # later runs read the compiled programs back (JAXREASON_CACHE_DIR=off: no)
        args.run(args)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        print(f"jaxreason {args.command}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).splitlines()) or type(error).__name__
