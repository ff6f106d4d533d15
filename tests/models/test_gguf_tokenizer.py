"""The torch-free GGUF tokenizer against transformers' own GGUF tokenizer (which needs PyTorch)."""

import json
import subprocess
import sys

import gguf
import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from jaxreason.models.gguf_tokenizer import load_gguf_tokenizer

TEXTS = [
    "What is 12 + 7?",
    "Natalia sold clips to 48 of her friends in April, 3.14159 and 1,000,000; x2 = 0x1F",
    "  Leading spaces, ünïcödé and\nnew lines.\t",
    "a\n\n\n  b   \r\n\ttabs\t\t",
    "emoji 😀👍🏽 and 日本語のテキスト, Россия, مرحبا",
    "I'm sure they'll say it's fine, don't you think?",
    "def f(x):\n    return x ** 2  # comment",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|><repo_name>",
    "hello . world , !",
    "",
]
# Whitespace runs before digits: where SmolLM2's digit split changes the tokens.
DIGITS_AFTER_SPACES = ["a  48", "x   1 2  3", "\n\n  7"]
MESSAGES = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Count to 3."}],
]


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return load_gguf_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def reference(smollm2_path):
    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def reference_with_digit_split(smollm2_path):
    """transformers' tokenizer with the pre-tokenizer of SmolLM2's tokenizer.json (Digits, then ByteLevel)."""
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return tokenizer


def test_encode_and_decode_match_transformers(ours, reference):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
        if "<|" not in text:
            assert ours.decode(ids) == text


def test_digits_are_split_as_smollm2_was_trained(ours, reference, reference_with_digit_split):
    # transformers does not know llama.cpp's pre-tokenizer name "smollm" and falls back to GPT-2's regex, which
    # lets a space join the digits after it; SmolLM2's own tokenizer.json splits digits first.
    assert ours.convert_ids_to_tokens(ours.encode("a  48")) == ["a", "ĠĠ", "4", "8"]
    assert reference.convert_ids_to_tokens(reference.encode("a  48")) == ["a", "Ġ", "Ġ", "4", "8"]
    for text in TEXTS + DIGITS_AFTER_SPACES:
        assert ours.encode(text) == reference_with_digit_split.encode(text), text


def test_chat_template_matches_transformers(ours, reference):
    for messages in MESSAGES:
        for generation_prompt in (True, False):
            text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert text == reference.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=generation_prompt)
            assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    prompt = ours.apply_chat_template(MESSAGES[0], tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in prompt  # the template's own default system turn
    assert prompt.endswith("<|im_start|>assistant\n")


def test_special_tokens_match_transformers(ours, reference):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (1, 2, 2, 0)
    for role in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{role}_token") == getattr(reference, f"{role}_token"), role
    assert sorted(ours.all_special_ids) == sorted(reference.all_special_ids)
    assert len(ours) == len(reference) == 49152
    assert ours.encode("<|im_end|>") == [2]  # matched whole, not cut into pieces


def test_loads_and_generates_without_torch():
    child = """
import json, sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, as where torch is not installed
import jax, numpy as np
from jaxreason.models import load_pretrained
from jaxreason.sampling import SamplingConfig, encode_prompts, generate
model, tokenizer = load_pretrained("smollm2-135m-instruct")
tokens, mask = encode_prompts(tokenizer, ["What is 2 + 2?"], chat=True)
out = generate(model, tokens, mask, jax.random.key(0), SamplingConfig(max_new_tokens=4, temperature=0),
               eos_ids=model.config.eos_token_ids, pad_id=tokenizer.pad_token_id)
torch = sorted(m for m, module in sys.modules.items() if m.split(".")[0] == "torch" and module is not None)
print(json.dumps({"tokens": np.asarray(out.tokens[0]).tolist(), "torch": torch}))
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torch"] == []
    assert len(report["tokens"]) == 4 and all(0 <= t < 49152 for t in report["tokens"])


# --- tiny files written here ----------------------------------------------------------------------------

_BYTES = list(bytes_to_unicode().values())
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2"), ("12", "3"), ("Ġ", "Ġ"), ("i", "n"), ("Ċ", "Ċ"),
           ("'", "s"), ("Ġ", "1")]
_SPECIALS = ["<|begin|>", "<|end|>", "<think>"]  # control, control, user-defined
_TINY_TEXTS = ["the 123 12345 1", "it's\n\n the<think> x", "  the   1  2", "<|begin|>the<|end|>",
               "héllo wörld 日本"]


def _write_tokenizer(path, model="gpt2", pre=None, add_bos=False, extra_tokens=()):
    tokens = _SPECIALS + _BYTES + [a + b for a, b in _MERGES] + list(extra_tokens)
    types = [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED]
    types += [gguf.TokenType.NORMAL] * (len(tokens) - len(types))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in _MERGES])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", None])
def test_tiny_byte_level_files_match_transformers(tmp_path, pre):
    path = _write_tokenizer(tmp_path / "tiny.gguf", pre=pre, add_bos=pre == "llama-bpe")
    ours = load_gguf_tokenizer(path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in _TINY_TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert (ours.encode("x")[0] == 0) == (pre == "llama-bpe")  # BOS only where the file asks for it


def test_llama3_takes_vocabulary_words_whole(tmp_path):
    # "tin" is in the vocabulary but no merge builds it; Llama 3's tokenizer.json sets ignore_merges.
    llama3 = load_gguf_tokenizer(_write_tokenizer(tmp_path / "llama3.gguf", pre="llama-bpe", extra_tokens=["tin"]))
    gpt2 = load_gguf_tokenizer(_write_tokenizer(tmp_path / "gpt2.gguf", pre="gpt-2", extra_tokens=["tin"]))
    assert llama3.convert_ids_to_tokens(llama3.encode("tin")) == ["tin"]
    assert gpt2.convert_ids_to_tokens(gpt2.encode("tin")) == ["t", "in"]


def test_other_pre_tokenizers_go_through_transformers(tmp_path):
    """A file this module does not build is converted by transformers (torch installed, as in the tests)."""
    path = _write_tokenizer(tmp_path / "odd.gguf", pre="deepseek-llm")
    ours = load_gguf_tokenizer(path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in _TINY_TEXTS:
        assert ours.encode(text) == reference.encode(text), text


def test_without_torch_other_files_name_file_and_type(tmp_path):
    spm = _write_tokenizer(tmp_path / "spm.gguf", model="llama")
    odd = _write_tokenizer(tmp_path / "odd.gguf", pre="deepseek-llm")
    child = f"""
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, as where torch is not installed
from jaxreason.models.gguf_tokenizer import load_gguf_tokenizer
for path in ({str(spm)!r}, {str(odd)!r}):
    try:
        load_gguf_tokenizer(path)
    except ValueError as e:
        print(e)
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(f"{spm}: GGUF tokenizer model 'llama'") and "needs torch" in lines[0]
    assert lines[1].startswith(f"{odd}: GGUF pre-tokenizer 'deepseek-llm'") and "needs torch" in lines[1]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_gguf_tokenizer(tmp_path / "absent.gguf")
