"""rStar's mutual-consistency discriminator (Qi et al. 2024, arXiv 2408.06195; zhentingqi/rStar
run_src/do_discriminate.py).

Each candidate solution is cut to a prefix at several ratios of its tokens (the reference's `num_masked` ratios
evenly spaced in [mask_left, mask_right] = [0.2, 0.5]), a discriminator model completes each prefix at
temperature 1, and the candidate is consistent when enough completions reach its answer. The reference's default
rule "mid" asks for at least half (`agreeing >= total // 2`); "loose" asks for one, "strict" for all.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Int

from jaxreason import sharding
from jaxreason.distributed import addressable
from jaxreason.models.kv_cache import KVCache
from jaxreason.sampling.buckets import round_up
from jaxreason.sampling.continuations import read_after_prompts
from jaxreason.sampling.generate import SamplingConfig, sample_from_cache
from jaxreason.sampling.placement import inference_state
from jaxreason.sampling.prompts import eos_ids, pad_left, pad_token_id, prompt_ids
from jaxreason.sampling.stopping import build_stop_table
from jaxreason.tasks.math_answers import answers_equal
from jaxreason.train.metrics import progress

RULES = ("loose", "mid", "strict")
_WIDTH_MULTIPLE = 64  # prompt widths round up to this, so calls over similar candidates share compiled shapes


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    ratios: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)  # fractions of the trajectory's tokens kept as the prefix
    completions_per_mask: int = 1
    rule: str = "mid"  # "loose" | "mid" | "strict"
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=96, temperature=1.0)
    stop: str = "\n\n"  # where a completion ends besides EOS: the few-shot prompt's separator ("" for none)
    batch_size: int = 64  # completions per jitted generate call (fixed shape; the last batch is padded)

    def __post_init__(self):
        if not self.ratios or not all(0 < r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be a non-empty tuple of fractions in (0, 1), got {self.ratios}")
        if self.completions_per_mask < 1:
            raise ValueError(f"completions_per_mask must be >= 1, got {self.completions_per_mask}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def completions_per_candidate(self) -> int:
        return len(self.ratios) * self.completions_per_mask


@dataclasses.dataclass(frozen=True)
class Candidate:
    prompt: str  # the problem's prompt as the generator saw it, before the chat template
    trajectory: str  # the solution text after the prompt
    answer: str | None  # the candidate's extracted answer


@dataclasses.dataclass
class Consistency:
    """Per candidate (C of them; M = len(ratios) * completions_per_mask completions each, none for a candidate
    whose answer is None: its `completions` entry is empty)."""

    consistent: list[bool]  # [C]
    agreeing: list[int]  # [C] completions that reached the candidate's answer
    completions: list[list[str]]  # [C][M] the discriminator's completions, ratio-major
    tokens: list[int]  # [C] tokens the discriminator generated for each candidate

    @property
    def generated_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def model_calls(self) -> int:  # sequences the discriminator generated
        return sum(map(len, self.completions))


def is_consistent(agreeing: int, total: int, rule: str) -> bool:
    """Whether `agreeing` of `total` completions reaching the answer pass `rule` (see the module docstring).

    Unlike the reference, "mid" also needs one agreeing completion: with total 1, 0 >= 1 // 2 would pass it.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    need = {"loose": 1, "mid": total // 2, "strict": total}[rule]
    return agreeing >= max(need, 1)


def prefix_lengths(num_tokens: int, ratios: Sequence[float]) -> list[int]:
    """Tokens kept at each ratio: round(r * n), at least 1 when n > 0 (a prefix that gives the model a start)."""
    return [max(1, round(r * num_tokens)) if num_tokens else 0 for r in ratios]


def check_vocab(tokenizer, generator_tokenizer) -> None:
    """Raises ValueError unless both tokenizers map the same tokens to the same ids: the trajectory's ids are cut
    by position, so a prefix means the same text only under one vocabulary."""
    ours, theirs = tokenizer.get_vocab(), generator_tokenizer.get_vocab()
    if ours == theirs:
        return
    if len(ours) != len(theirs):
        raise ValueError(f"discriminator tokenizer differs from the generator's: {len(ours)} vs {len(theirs)} tokens")
    diff = sorted(t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t))[:5]
    raise ValueError("discriminator tokenizer differs from the generator's: token ids "
                     + ", ".join(f"{t!r}: {ours.get(t)} vs {theirs.get(t)}" for t in diff))


def check_consistency(candidates: Sequence[Candidate], *, model, tokenizer, task, config: DiscriminatorConfig,
                      key: jax.Array, chat: bool = False, generator_tokenizer=None,
                      ids: Sequence[int] | None = None, mesh: Mesh | None = None) -> Consistency:
    """The discriminator `model`'s verdict on each of C candidates: each prefix `prompt_ids(prompt) +
    trajectory_ids[:k]` is completed to EOS or max_new_tokens, and the answer of prefix text + completion is
    compared with the candidate's (`answers_equal`).

    Row c * M + m (candidate c, ratio m // completions_per_mask) draws from `fold_in(key, c * M + m)`, so the
    completions depend neither on the batch size nor on which other candidates have answers; with `ids`, candidate
    c draws as number ids[c] (a candidate judged in any subset gets the completions it gets among all). With
    `mesh`, the model's weights are placed by the rules and each batch of completions is split over the mesh's
    batch devices: the same completions.
    """
    if generator_tokenizer is not None:
        check_vocab(tokenizer, generator_tokenizer)
    m = config.completions_per_candidate
    heads: dict[str, int] = {}  # prompt text -> its number: each prompt is prefilled once
    rows, prefixes, index, owner = [], [], [], []  # (prompt number, prefix ids), prefix texts, row numbers, candidates
    for c, cand in enumerate(candidates):
        if cand.answer is None:
            continue
        head = heads.setdefault(cand.prompt, len(heads))
        traj = tokenizer.encode(cand.trajectory, add_special_tokens=False)
        for j, k in enumerate(prefix_lengths(len(traj), config.ratios)):
            text = tokenizer.decode(traj[:k], skip_special_tokens=True)
            for s in range(config.completions_per_mask):
                rows.append((head, traj[:k]))
                prefixes.append(text)
                owner.append(c)
                index.append((c if ids is None else ids[c]) * m + j * config.completions_per_mask + s)
    prompts = [prompt_ids(tokenizer, text, chat=chat) for text in heads]
    texts, lengths = _complete(model, tokenizer, prompts, rows, index, config, key, mesh)
    completions = [[] for _ in candidates]
    agreeing, tokens = [0] * len(candidates), [0] * len(candidates)
    for c, prefix, text, n in zip(owner, prefixes, texts, lengths):
        completions[c].append(text)
        tokens[c] += n
        agreeing[c] += answers_equal(task.extract_answer(prefix + text), candidates[c].answer)
    consistent = [cand.answer is not None and is_consistent(a, m, config.rule) for cand, a in zip(candidates, agreeing)]
    return Consistency(consistent=consistent, agreeing=agreeing, completions=completions, tokens=tokens)


def _complete(model, tokenizer, prompts: list[list[int]], rows: list[tuple[int, list[int]]], index: list[int],
              config: DiscriminatorConfig, key: jax.Array, mesh: Mesh | None) -> tuple[list[str], list[int]]:
    """Completes each row (prompt number, prefix ids), row r with key fold_in(key, index[r]), in fixed-shape
    batches (rounded up to a multiple of `mesh`'s batch devices, over which they are split): texts and their token
    counts. The prompts are prefilled once; a row reads its prefix on top of a copy of its prompt's cache."""
    if not rows:
        return [], []
    pad, stop = pad_token_id(tokenizer), eos_ids(tokenizer, model.config)
    table = build_stop_table(tokenizer, [config.stop], model.config.vocab_size) if config.stop else None
    graphdef, state = nnx.split(model) if mesh is None else inference_state(model, mesh)
    prompt_tokens, prompt_mask = (jnp.asarray(x) for x in pad_left(prompts, pad, multiple=_WIDTH_MULTIPLE))
    if mesh is not None:
        prompt_tokens, prompt_mask = jax.device_put((prompt_tokens, prompt_mask), sharding.replicated(mesh))
    cache, last_hidden = _prefill_prompts(graphdef, state, prompt_tokens, prompt_mask)
    # One prefix width for every call, so batchings of the same rows read the same padded inputs.
    width = round_up(max(len(tail) for _, tail in rows), _WIDTH_MULTIPLE)
    texts, generated = [], []
    size = sharding.split_rows(config.batch_size, mesh)
    with progress(len(rows), description="discriminator") as bar:
        for start in range(0, len(rows), size):
            chunk, ids = rows[start:start + size], index[start:start + size]
            real = len(chunk)
            # Pad the last batch with copies of its last row (outputs dropped) so every call has `size` rows.
            chunk, ids = chunk + [chunk[-1]] * (size - real), ids + [ids[-1]] * (size - real)
            tails = np.full((size, width), pad, np.int32)
            for r, (_, tail) in enumerate(chunk):
                tails[r, :len(tail)] = tail
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(ids, jnp.uint32))
            batch = (jnp.asarray([h for h, _ in chunk]), jnp.asarray(tails),
                     jnp.asarray([len(t) for _, t in chunk], jnp.int32), keys)
            if mesh is not None:
                batch = sharding.put_rows(batch, mesh)
            out = _sample_rows(graphdef, state, cache, last_hidden, *batch, table, sampling=config.sampling,
                               eos_ids=stop, pad_id=pad)
            # addressable: rows split over the processes of a multi-host mesh are gathered before the host reads
            new, lengths = (np.asarray(x)[:real] for x in addressable((out.tokens, out.lengths)))
            texts += [tokenizer.decode(t[:n].tolist(), skip_special_tokens=True) for t, n in zip(new, lengths)]
            generated += [int(n) for n in lengths]
            bar.update(real)
    return texts, generated


@functools.partial(jax.jit, static_argnums=0)
def _prefill_prompts(graphdef, state, tokens: Int[Array, "U P"], mask: Int[Array, "U P"]):
    """The prompts' cache [U, P] and each one's last hidden state [U, E]."""
    model = nnx.merge(graphdef, state)
    cache = KVCache.init(model.config, tokens.shape[0], tokens.shape[1], dtype=model.transformer.dtype)
    hidden, cache = model.transformer(tokens, mask, cache=cache)
    return cache, hidden[:, -1]


@functools.partial(jax.jit, static_argnums=0, static_argnames=("sampling", "eos_ids", "pad_id"))
def _sample_rows(graphdef, state, prompts: KVCache, last_hidden, head: Int[Array, " B"], tails: Int[Array, "B W"],
                 tail_len: Int[Array, " B"], keys, stop_table, *, sampling: SamplingConfig, eos_ids, pad_id):
    """Row b: prompt head[b]'s cache, then its prefix tails[b, :tail_len[b]] read on top, then sampled."""
    model = nnx.merge(graphdef, state)
    cache, logits = read_after_prompts(model, prompts.take_rows(head), last_hidden[head], tails, tail_len,
                                       tails.shape[1], pad_id=pad_id)
    return sample_from_cache(model, logits, cache, keys, sampling, eos_ids=eos_ids, pad_id=pad_id,
                             stop_table=stop_table)
