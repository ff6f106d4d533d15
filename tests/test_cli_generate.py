"""`python -m jaxreason generate`: real runs on a small saved model and the preset, one-line errors for bad input."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxreason.models
from jaxreason.cli import main
from jaxreason.models import CausalLM, ModelConfig, load_pretrained, save_pretrained
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.models.pretrained import PRESETS, resolve_model_path
from jaxreason.sampling import SamplingConfig, decode_completions, encode_prompts, generate


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


def _main_error(capsys, *args) -> str:
    """Runs the CLI in this process and returns its one-line error (the exit status must be 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("name", ["smollm2-1.7b", "qwen2.5-0.5b-instruct", "smollm9"])
def test_unknown_preset_with_a_dot_lists_presets(capsys, name):
    line = _main_error(capsys, "--model", name, "--prompt", "x")
    assert f"unknown model preset {name!r}" in line and all(preset in line for preset in PRESETS)


@pytest.mark.parametrize("name", ["nowhere/model", "model.gguf", "./smollm2-1.7b", "~/nowhere-42/x", "w.safetensors"])
def test_missing_path_like_names_say_the_path_does_not_exist(name):
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        resolve_model_path(name)


def test_truncated_safetensors_is_a_one_line_error(tiny_folder, tmp_path, capsys):
    folder = tmp_path / "truncated"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    weights = (tiny_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    line = _main_error(capsys, "--model", str(folder), "--prompt", "x")
    assert str(folder / "model.safetensors") in line and "safetensors" in line


def test_unreadable_weights_and_missing_packages_are_one_line_errors(tiny_folder, monkeypatch, capsys):
    def fail(error):
        def load(*args, **kwargs):
            raise error
        return load

    monkeypatch.setattr(jaxreason.models, "load_pretrained", fail(PermissionError(13, "Permission denied", "/m/w")))
    assert "Permission denied" in _main_error(capsys, "--model", str(tiny_folder), "--prompt", "x")
    monkeypatch.setattr(jaxreason.models, "load_pretrained", fail(ModuleNotFoundError("No module named 'torch'")))
    assert "torch" in _main_error(capsys, "--model", str(tiny_folder), "--prompt", "x")


def test_preset_greedy_matches_generate(monkeypatch, capsys):
    """The README's command on the shipped preset prints what generate + decode_completions give."""
    loaded = []

    def recording_load(*args, **kwargs):
        loaded.append(load_pretrained(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(jaxreason.models, "load_pretrained", recording_load)  # one load serves both sides
    prompt = "If I have 3 apples and buy 5 more, how many apples do I have?"
    main(["generate", "--model", "smollm2-135m-instruct", "--prompt", prompt, "--max-new-tokens", "8",
          "--temperature", "0"])
    model, tokenizer = loaded[0]
    tokens, mask = encode_prompts(tokenizer, [prompt], chat=True)
    out = generate(model, tokens, mask, jax.random.key(1), SamplingConfig(max_new_tokens=8, temperature=0),
                   eos_ids=model.config.eos_token_ids, pad_id=tokenizer.pad_token_id)
    expected = decode_completions(tokenizer, out)[0]
    assert expected.strip() and int(out.lengths[0]) > 0
    assert capsys.readouterr().out == expected + "\n"


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
