"""jaxreason: LLM reasoning that improves itself (search, verify, train, repeat) in JAX/Flax NNX.

The packages, each with a short public API:

    jaxreason.models       Llama-family NNX decoder, value heads, Hugging Face / GGUF weights in and out
    jaxreason.sampling     jitted batched generation with a KV cache
    jaxreason.verifiers    one interface for every scorer of solutions; where scores are read; verifier metrics
    jaxreason.search       test-time methods (MCTS on mctx, best-of-N, votes, beam search) behind one signature
    jaxreason.train        losses, sharded train steps, optimizers, checkpoints, `fit`
    jaxreason.rl           on-policy RL: rollouts from the live weights, rewards, advantages, the clipped update
    jaxreason.data         the tensorstore trace store and training batches
    jaxreason.tasks        problem sets and answer checking
    jaxreason.algorithms   the outer loops (ReST-MCTS*, ReST-EM, GRPO, SFT), registered by name for `jaxreason train`
"""

__version__ = "0.1.0"
__all__ = ["enable_compilation_cache", "__version__"]


def __getattr__(name: str):
    # Lazily, so that `import jaxreason` (and `python -m jaxreason --help`) does not import jax.
    if name == "enable_compilation_cache":
        from jaxreason.compilation_cache import enable_compilation_cache

        return enable_compilation_cache
    raise AttributeError(f"module 'jaxreason' has no attribute {name!r}")
