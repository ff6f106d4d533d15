"""SFT data: JSONL records with file:line errors, loss masks, truncation and the (seed, position) batch stream."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from jaxreason.data.sft_data import SFTDataset, read_jsonl
from jaxreason.models.char_tokenizer import build_char_tokenizer

SAMPLE = Path(__file__).parents[2] / "configs" / "sft" / "data" / "arith_sample.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _records(n):
    return [{"prompt": f"Q{i}:", "completion": f"{i}"} for i in range(n)]


# ---------------------------------------------------------------- read_jsonl


def test_read_jsonl_sample():
    records = read_jsonl(SAMPLE, ("prompt", "completion"))
    assert len(records) == 256
    assert records[0]["prompt"].startswith("Q: ") and records[0]["completion"].startswith("25 + 49")


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "a", "completion": "b"}', "", "  ", '{"prompt": "c"}'])
    with pytest.raises(ValueError) as e:
        read_jsonl(path, ("prompt", "completion"))
    assert str(e.value) == f"{path}:4: missing field 'completion'"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "completion": ', "malformed JSON"),
        ('["prompt", "completion"]', "expected a JSON object"),
        ('{"prompt": "a", "completion": 3}', "field 'completion' must be a string"),
        ('{"completion": "b"}', "missing field 'prompt'"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "a", "completion": "b"}', line])
    with pytest.raises(ValueError) as e:
        read_jsonl(path, ("prompt", "completion"))
    assert str(e.value).startswith(f"{path}:2: {message}")
    assert "\n" not in str(e.value)


def test_read_jsonl_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file does not exist: .*nowhere.jsonl"):
        read_jsonl(tmp_path / "nowhere.jsonl", ("prompt",))
    with pytest.raises(ValueError, match="no records"):
        read_jsonl(_write(tmp_path / "empty.jsonl", ["", ""]), ("prompt",))


def test_read_jsonl_is_utf8(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps({"prompt": "π ≈ ?", "completion": "3.14"}, ensure_ascii=False).encode() + b"\n")
    assert read_jsonl(path, ("prompt", "completion"))[0]["prompt"] == "π ≈ ?"


# ---------------------------------------------------------------- masks and truncation


def test_loss_mask_covers_completion_and_eos_only(tokenizer):
    data = SFTDataset(tokenizer, [{"prompt": "12+3=", "completion": "15"}, {"prompt": "7*8=", "completion": "56"}], 16)
    batch = data.batch([0, 1])
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 16) for k in ("tokens", "attention_mask", "loss_mask")}
    assert all(v.dtype == np.int32 for v in batch.values())
    prompt = tokenizer.encode("12+3=", add_special_tokens=False)
    completion = tokenizer.encode("15", add_special_tokens=False) + [tokenizer.eos_token_id]
    n = len(prompt) + len(completion)
    np.testing.assert_array_equal(batch["tokens"][0, :n], prompt + completion)
    np.testing.assert_array_equal(batch["tokens"][0, n:], tokenizer.pad_token_id)
    np.testing.assert_array_equal(batch["attention_mask"][0], [1] * n + [0] * (16 - n))
    np.testing.assert_array_equal(batch["loss_mask"][0], [0] * len(prompt) + [1] * len(completion) + [0] * (16 - n))
    assert batch["tokens"][0, n - 1] == tokenizer.eos_token_id
    # the loss mask marks exactly the decoded completion plus EOS
    trained = batch["tokens"][1][batch["loss_mask"][1] == 1]
    assert tokenizer.decode(trained[:-1]) == "56" and trained[-1] == tokenizer.eos_token_id


def test_bos_is_prepended_to_the_prompt_when_the_tokenizer_asks(tokenizer):
    class WithBos:
        pad_token_id, bos_token_id, eos_token_id, add_bos_token = None, 1, 2, True

        def encode(self, text, add_special_tokens):
            assert not add_special_tokens
            return [ord(c) for c in text]

    data = SFTDataset(WithBos(), [{"prompt": "ab", "completion": "c"}], 8)
    batch = data.batch([0])
    np.testing.assert_array_equal(batch["tokens"][0], [1, 97, 98, 99, 2, 0, 0, 0])  # pad_id falls back to 0
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 1, 1, 0, 0, 0])


def test_truncation_on_the_right(tokenizer):
    record = {"prompt": "abcd", "completion": "efgh"}
    batch = SFTDataset(tokenizer, [record], 6).batch([0])
    assert tokenizer.decode(batch["tokens"][0]) == "abcdef"  # EOS and the end of the completion are cut
    np.testing.assert_array_equal(batch["attention_mask"][0], [1] * 6)
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 0, 1, 1])
    short = SFTDataset(tokenizer, [record], 3).batch([0])  # the prompt alone overflows: nothing to train on
    assert tokenizer.decode(short["tokens"][0]) == "abc"
    assert short["loss_mask"].sum() == 0


# ---------------------------------------------------------------- the batch stream


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _rows(batch):
    return [tuple(row) for row in batch["tokens"]]


def test_batches_are_deterministic_in_seed(tokenizer):
    data = SFTDataset(tokenizer, _records(20), 8)
    a, b = _take(data.batches(4, seed=3), 12), _take(data.batches(4, seed=3), 12)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = _take(data.batches(4, seed=4), 12)
    assert any(_rows(x) != _rows(y) for x, y in zip(a, other))


@pytest.mark.parametrize("start", [0, 1, 4, 5, 11])
def test_batches_from_start_continue_the_stream(tokenizer, start):
    data = SFTDataset(tokenizer, _records(21), 8)  # 5 batches of 4 per epoch, one record left over each epoch
    full = _take(data.batches(4, seed=7), 14)
    resumed = _take(data.batches(4, seed=7, start=start), 14 - start)
    for x, y in zip(full[start:], resumed, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_each_epoch_is_a_fresh_permutation(tokenizer):
    data = SFTDataset(tokenizer, _records(20), 8)
    batches = _take(data.batches(4, seed=0), 10)
    epochs = [sum((_rows(b) for b in batches[e * 5 : (e + 1) * 5]), []) for e in range(2)]
    everything = sorted(_rows(data.batch(range(20))))
    assert sorted(epochs[0]) == everything and sorted(epochs[1]) == everything  # each record once per epoch
    assert epochs[0] != epochs[1]  # reshuffled


def test_data_smaller_than_a_batch_repeats(tokenizer):
    data = SFTDataset(tokenizer, _records(3), 8)
    batches = _take(data.batches(5, seed=0), 3)
    assert all(b["tokens"].shape == (5, 8) for b in batches)
    assert set(_rows(batches[0])) == set(_rows(data.batch(range(3))))
