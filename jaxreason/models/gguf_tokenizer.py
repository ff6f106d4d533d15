"""Build a `transformers` tokenizer from a GGUF file's `tokenizer.*` metadata, without PyTorch.

llama.cpp stores a byte-level BPE tokenizer (`tokenizer.ggml.model` = "gpt2") as its vocabulary in the
byte-to-unicode spelling, its merges, per-token types, special token ids and a pre-tokenizer name
(`tokenizer.ggml.pre`). The pre-tokenizer itself is not stored, only its name, so each supported name maps
to the splitting rule of the model's own `tokenizer.json`.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxreason.models.gguf_reader import field_value, open_gguf

# The split regexes of Meta's Llama 3 and of Qwen2 `tokenizer.json`; they differ only in digit runs.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")}
# `tokenizer.ggml.pre` names built here; "gpt-2" is also what a file without the field means.
_PRE_TOKENIZERS = ("gpt-2", "smollm", *_REGEX_SPLITS)
# Llama 3's tokenizer.json looks a whole word up in the vocabulary before merging (BPE ignore_merges).
_WHOLE_WORDS_FIRST = {"llama-bpe"}
_SUPPORTED_MODELS = ("gpt2",)


def load_gguf_tokenizer(path: str | os.PathLike):
    """The `transformers.PreTrainedTokenizerFast` a GGUF file describes, with its chat template and special ids.

    Byte-level BPE (`tokenizer.ggml.model` "gpt2") with a pre-tokenizer in `_PRE_TOKENIZERS` is built here;
    anything else (SentencePiece files of Llama 2 or Mistral, say) goes through transformers' own GGUF
    conversion, which needs torch: without it, a ValueError names the file and the type.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    reader = open_gguf(path)
    keys = gguf.Keys.Tokenizer
    model_type = field_value(reader, keys.MODEL)
    pre = field_value(reader, keys.PRE) or "gpt-2"
    if model_type not in _SUPPORTED_MODELS:
        return _converted_by_transformers(path, reader, f"GGUF tokenizer model {model_type!r}")
    if pre not in _PRE_TOKENIZERS:
        return _converted_by_transformers(path, reader, f"GGUF pre-tokenizer {pre!r}")
    tokens = field_value(reader, keys.LIST)
    merges = field_value(reader, keys.MERGES)
    if not tokens or not merges:
        raise ValueError(f"{path}: incomplete GGUF tokenizer (no {keys.LIST if not tokens else keys.MERGES})")
    token_types = field_value(reader, keys.TOKEN_TYPE) or [gguf.TokenType.NORMAL] * len(tokens)

    # No unk token, as in the models' own files: a byte missing from the vocabulary is dropped.
    backend = Tokenizer(models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ", 1)) for merge in merges],
        ignore_merges=pre in _WHOLE_WORDS_FIRST,
    ))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # CONTROL tokens are special (dropped by skip_special_tokens); USER_DEFINED ones are only kept whole.
    typed = list(zip(tokens, token_types))
    control, user_defined = gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == user_defined])

    special = {}
    for role, key in (("bos", keys.BOS_ID), ("eos", keys.EOS_ID), ("pad", keys.PAD_ID), ("unk", keys.UNK_ID)):
        token_id = field_value(reader, key)
        if token_id is not None:
            special[role] = (tokens[token_id], int(token_id))
    post_processor = _added_specials(special, field_value(reader, keys.ADD_BOS), field_value(reader, keys.ADD_EOS))
    if post_processor is not None:
        backend.post_processor = post_processor

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=field_value(reader, keys.CHAT_TEMPLATE),
        clean_up_tokenization_spaces=False,  # byte-level decoding is already exact
        **{f"{role}_token": token for role, (token, _) in special.items()},
    )


def _converted_by_transformers(path: Path, reader, what: str):
    """transformers' GGUF tokenizer conversion (it imports torch), with the file's chat template and special ids."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except ModuleNotFoundError as e:
        raise ValueError(f"{path}: {what} is built only by transformers' GGUF conversion, which needs torch "
                         f"({e}); built without it: byte-level BPE with pre-tokenizer {', '.join(_PRE_TOKENIZERS)}"
                         ) from None
    keys = gguf.Keys.Tokenizer
    template = field_value(reader, keys.CHAT_TEMPLATE)
    if template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = template
    for role, key in (("bos", keys.BOS_ID), ("eos", keys.EOS_ID), ("pad", keys.PAD_ID)):
        token_id = field_value(reader, key)
        if token_id is not None and getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    return tokenizer


def _pre_tokenizer(pre: str):
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex is built in
    if pre == "gpt-2":
        return gpt2
    if pre == "smollm":  # SmolLM2's tokenizer.json: every digit its own piece, then GPT-2's regex between them
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _added_specials(special: dict[str, tuple[str, int]], add_bos: bool | None, add_eos: bool | None):
    """A post-processor that wraps each encoded text in BOS/EOS where the file asks for them, else None."""
    before = [special["bos"]] if add_bos and "bos" in special else []
    after = [special["eos"]] if add_eos and "eos" in special else []
    if not before and not after:
        return None
    first = " ".join([*(t for t, _ in before), "$A", *(t for t, _ in after)])
    second = " ".join([*(f"{t}:1" for t, _ in before), "$B:1", *(f"{t}:1" for t, _ in after)])
    return processors.TemplateProcessing(
        single=first, pair=f"{first} {second}", special_tokens=list(dict.fromkeys(before + after))
    )
