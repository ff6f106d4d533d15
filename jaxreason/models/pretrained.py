"""Load models from Hugging Face folders, GGUF files and built-in presets; save Hugging Face folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxreason.models import gguf_reader, gguf_tokenizer
from jaxreason.models.config import ModelConfig
from jaxreason.models.llama import CausalLM
from jaxreason.models.lora import merged_kernels
from jaxreason.models.params import hf_to_nnx, nnx_to_hf

# Presets resolve to a local file shipped in a pip package: nothing is downloaded at run time.
PRESETS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": gguf_reader.smollm2_gguf_path,
}

_MODEL_FILE_SUFFIXES = (".gguf", ".safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_model_path(path_or_preset: str | os.PathLike) -> Path:
    """A preset name or a path to an existing folder or .gguf file; errors name what was not found."""
    name = str(path_or_preset)
    if name in PRESETS:
        return PRESETS[name]()
    path = Path(name).expanduser()
    if path.exists():
        return path
    if _looks_like_path(name):
        raise FileNotFoundError(f"model path does not exist: {name}")
    raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)} (or pass a folder or .gguf file)")


def _looks_like_path(name: str) -> bool:
    """A folder separator, a leading . or ~, or a weights-file suffix; a dot alone does not (`smollm2-1.7b`)."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (
        any(s in name for s in separators)
        or name.startswith((".", "~"))
        or Path(name).suffix.lower() in _MODEL_FILE_SUFFIXES
    )


def load_pretrained(
    path_or_preset: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32
) -> tuple[CausalLM, object]:
    """Loads `(model, tokenizer)` from a preset, a Hugging Face folder or a GGUF file.

    The tokenizer is a `transformers` tokenizer, or None for a folder that holds no tokenizer files.
    `dtype` is the compute dtype, `param_dtype` the stored parameter dtype.
    """
    path = resolve_model_path(path_or_preset)
    if path.is_dir():
        hf_config, tensors, source = _read_hf_folder(path)
        tokenizer = _folder_tokenizer(path)
    elif path.suffix == ".gguf":
        hf_config, tensors = gguf_reader.read_gguf(path)
        source = str(path)
        tokenizer = gguf_tokenizer.load_gguf_tokenizer(path)
    else:
        raise ValueError(f"not a model folder or .gguf file: {path}")
    config = ModelConfig.from_hf(hf_config, source=source)
    return model_from_hf_tensors(config, tensors, source, dtype=dtype, param_dtype=param_dtype), tokenizer


def model_from_hf_tensors(
    config: ModelConfig, tensors, source: str, *, dtype=jnp.float32, param_dtype=jnp.float32
) -> CausalLM:
    """Builds a `CausalLM` from Hugging Face-named tensors without a random initialisation first."""
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    tree = hf_to_nnx(tensors, config, nnx.to_pure_dict(state), source)
    nnx.replace_by_pure_dict(state, _to_jax(tree))
    return nnx.merge(graphdef, state)


def save_pretrained(model: CausalLM, tokenizer, folder: str | os.PathLike) -> Path:
    """Writes a Hugging Face folder (config.json, model.safetensors, tokenizer files) for transformers/vLLM.

    Files are written to a temporary folder beside the target and moved in, so a crash leaves no half file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = nnx_to_hf(merged_kernels(model), model.config)  # adapters, if any, folded in
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        (staging / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        for item in staging.iterdir():
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _read_hf_folder(folder: Path) -> tuple[dict, dict[str, np.ndarray], str]:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{folder}: no config.json")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON ({e})") from None
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (PyTorch .bin files are not read)")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        file = folder / name
        if not file.exists():
            raise FileNotFoundError(f"{file}: listed in the index but missing")
        try:
            with safe_open(str(file), framework="flax") as f:  # flax: bf16 arrays load without a numpy dtype gap
                for key in f.keys():
                    tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
        except SafetensorError as e:  # its messages ("incomplete metadata") do not name the file
            raise ValueError(f"{file}: not a valid safetensors file ({e})") from None
    source = str(folder / files[0]) if len(files) == 1 else str(folder)
    return hf_config, tensors, source


def _folder_tokenizer(folder: Path):
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _to_jax(tree):
    return {k: _to_jax(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}
