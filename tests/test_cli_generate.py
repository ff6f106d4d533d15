"""`python -m jaxreason generate`: a real run on a small saved model, and one-line errors for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxreason.models import CausalLM, ModelConfig, load_pretrained, save_pretrained
from jaxreason.models.char_tokenizer import build_char_tokenizer


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxreason", "generate", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    tokenizer = build_char_tokenizer()
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return save_pretrained(CausalLM(config, rngs=nnx.Rngs(0)), tokenizer, tmp_path_factory.mktemp("tiny"))


def test_generate_from_folder(tiny_folder):
    result = _cli("--model", str(tiny_folder), "--prompt", "12 + 7 =", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.rstrip("\n")) > 0


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_preset():
    _assert_one_line_error(_cli("--model", "smollm9-1b", "--prompt", "x"), "unknown model preset", "smollm9-1b")


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    _assert_one_line_error(_cli("--model", str(missing), "--prompt", "x"), "does not exist", str(missing))


def test_folder_without_config(tmp_path):
    _assert_one_line_error(_cli("--model", str(tmp_path), "--prompt", "x"), "config.json")


def test_unsupported_architecture(tiny_folder, tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    config = json.loads((tiny_folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes())
    _assert_one_line_error(_cli("--model", str(folder), "--prompt", "x"), "unsupported architecture",
                           "GPT2LMHeadModel")


@pytest.mark.parametrize("damage", ["missing", "misshapen"])
def test_damaged_checkpoint_names_the_tensor(tiny_folder, tmp_path, damage):
    folder = tmp_path / damage
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_folder / name).read_bytes())
    tensors = load_file(str(tiny_folder / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    if damage == "missing":
        del tensors[name]
    else:
        tensors[name] = np.zeros((3, 5), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_pretrained(folder)
    _assert_one_line_error(_cli("--model", str(folder), "--prompt", "x"), name)


def test_unexpected_tensor_is_an_error(tiny_folder, tmp_path):
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    tensors = load_file(str(tiny_folder / "model.safetensors"))
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="extra_proj"):
        load_pretrained(folder)
