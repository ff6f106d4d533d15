"""Load models from Hugging Face folders, GGUF files and built-in presets; save Hugging Face folders.

Value models (PRM, ORM, verifier) go out and come back as a Hugging Face folder of their backbone with the scalar
head beside it:

    config.json, model.safetensors    the backbone, as `transformers.AutoModel` loads it
    value_head.safetensors            head [E] and bias [] (float32)
    value_head.json                   what the two tensors are: value = sigmoid(hidden[t] @ head + bias)
    tokenizer files                   when a tokenizer is given
"""

from __future__ import annotations

import dataclasses
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
from jaxreason.models.value_head import ValueModel

# Presets resolve to a local file shipped in a pip package: nothing is downloaded at run time.
PRESETS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": gguf_reader.smollm2_gguf_path,
}

_MODEL_FILE_SUFFIXES = (".gguf", ".safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_CARD = "value_head.json"
_VALUE_HEAD_FORMAT = "jaxreason.value_head"


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
    tensors = nnx_to_hf(merged_kernels(model), model.config)  # adapters, if any, folded in
    return _write_hf_folder(folder, model.config, tensors, tokenizer)


def save_value_model(model: ValueModel, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Writes a value model (PRM, ORM, verifier) as a Hugging Face folder of its backbone plus its head.

    config.json and model.safetensors hold the backbone (adapters, if any, folded in), which
    `transformers.AutoModel` loads; `value_head.safetensors` holds `head` [E] and `bias` [] in float32 and
    `value_head.json` says what they are: the value at token t is sigmoid(hidden[t] @ head + bias), with hidden
    the backbone's last hidden state (after the final norm). A plain value model has no LM head: load it with
    `load_value_model`, or its backbone with `AutoModel`. One that reads its LM's solution likelihood adds `scale`
    to the head file and `"likelihood": true` to the card, and an untied one writes its `lm_head` too, so
    `transformers.AutoModelForCausalLM` loads the language model it reads. A value model that shares its backbone
    with a policy still writes that backbone in full, so the folder stands alone; `load_value_model` gives it a
    backbone of its own. Written through a staging folder, as `save_pretrained`.
    """
    tree = merged_kernels(model)
    tensors = nnx_to_hf(tree, _backbone_rules(model.config, model.likelihood))
    head = {name: np.array(tree[name], np.float32) for name in _head_tensors(model.likelihood)}  # keeps 0-d

    def write_head(staging: Path) -> None:
        save_file(head, str(staging / VALUE_HEAD_FILE))
        card = _value_head_card(model.config, model.likelihood)
        (staging / VALUE_HEAD_CARD).write_text(json.dumps(card, indent=2))

    return _write_hf_folder(folder, model.config, tensors, tokenizer, write_head)


def load_value_model(
    folder: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32
) -> tuple[ValueModel, object]:
    """Loads `(value_model, tokenizer)` from a folder written by `save_value_model`.

    The tokenizer is None for a folder without tokenizer files; `dtype` and `param_dtype` are as in
    `load_pretrained`. Errors name the missing or misshapen file and tensor.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"value model folder does not exist: {folder}")
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing; a value model folder holds its backbone's config.json")
    head_file = folder / VALUE_HEAD_FILE
    if not head_file.exists():
        raise FileNotFoundError(
            f"{head_file}: missing; {folder} holds no value head (a policy folder loads with load_pretrained)"
        )
    likelihood = _check_value_head_card(folder / VALUE_HEAD_CARD)
    hf_config, tensors, source = _read_hf_folder(folder, skip=(VALUE_HEAD_FILE,))
    config = ModelConfig.from_hf(hf_config, source=str(config_file))
    abstract = nnx.eval_shape(lambda: ValueModel(config, dtype=dtype, param_dtype=param_dtype,
                                                 likelihood=likelihood, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = nnx.to_pure_dict(state)
    tree = hf_to_nnx(tensors, _backbone_rules(config, likelihood), expected, source)
    tree.update(_read_value_head(head_file, expected, config, _head_tensors(likelihood)))
    nnx.replace_by_pure_dict(state, _to_jax(tree))
    return nnx.merge(graphdef, state), _folder_tokenizer(folder)


def _write_hf_folder(
    folder: str | os.PathLike,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    tokenizer,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """config.json, model.safetensors, the tokenizer's files and `write_extra`'s, staged and then moved in."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        (staging / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if write_extra is not None:
            write_extra(staging)
        for item in staging.iterdir():
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _backbone_rules(config: ModelConfig, likelihood: bool = False) -> ModelConfig:
    """The config whose tensor rules cover what a value model's folder holds: the backbone, plus the LM head of
    an untied model that reads the likelihood. Otherwise a value model has no LM head to map (an
    `lm_head.weight` found in its folder is ignored, as a tied head is)."""
    return config if likelihood else dataclasses.replace(config, tie_word_embeddings=True)


def _head_tensors(likelihood: bool) -> tuple[str, ...]:
    return ("head", "bias", "scale") if likelihood else ("head", "bias")


def _value_head_card(config: ModelConfig, likelihood: bool = False) -> dict:
    e = config.hidden_size
    card = {
        "format": _VALUE_HEAD_FORMAT,
        "version": 1,
        "file": VALUE_HEAD_FILE,
        "tensors": {
            "head": {"shape": [e], "dtype": "float32", "role": "weights of the scalar head on the hidden state"},
            "bias": {"shape": [], "dtype": "float32", "role": "bias of the scalar head"},
        },
        "hidden": "the backbone's last hidden state after its final norm (transformers AutoModel last_hidden_state)",
        "logit": "hidden[t] @ head + bias",
        "value": "sigmoid(logit) in [0, 1]: the value of the tokens up to and including t (read at a step's end)",
        "likelihood": likelihood,
    }
    if likelihood:
        card["tensors"]["scale"] = {"shape": [], "dtype": "float32", "role": "weight of the solution likelihood"}
        card["logit"] = "hidden[t] @ head + bias + scale * min_logprob[t]"
        card["min_logprob"] = ("the lowest log p(token | tokens before it) under the backbone's LM (its tied "
                               "embedding, else lm_head in model.safetensors) over the solution's tokens up to t; "
                               "0 before the solution")
    return card


def _check_value_head_card(card_file: Path) -> bool:
    """Whether the card says the model reads the LM's likelihood. The card otherwise only describes the tensors;
    a folder without one loads as a plain value head."""
    if not card_file.exists():
        return False
    try:
        card = json.loads(card_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{card_file}: invalid JSON ({e})") from None
    if not isinstance(card, dict) or card.get("format") != _VALUE_HEAD_FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ValueError(f"{card_file}: format {found!r}, expected {_VALUE_HEAD_FORMAT!r}")
    likelihood = card.get("likelihood", False)
    if not isinstance(likelihood, bool):
        raise ValueError(f"{card_file}: key 'likelihood' must be true or false, got {likelihood!r}")
    return likelihood


def _read_value_head(file: Path, expected: dict, config: ModelConfig,
                     names: tuple[str, ...] = ("head", "bias")) -> dict[str, np.ndarray]:
    """The head's tensors (`names`: head [E], bias [], and scale [] for a model that reads the likelihood) from
    the head file, in the dtypes of `expected` (the model's abstract pure dict)."""
    try:
        with safe_open(str(file), framework="flax") as f:
            found = {key: np.asarray(f.get_tensor(key), dtype=np.float32) for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{file}: not a valid safetensors file ({e})") from None
    head = {}
    for name in names:
        want = expected[name]
        if name not in found:
            raise ValueError(f"{file}: missing tensor {name!r}")
        if found[name].shape != tuple(want.shape):
            raise ValueError(
                f"{file}: tensor {name!r} has shape {found[name].shape}, expected {tuple(want.shape)} "
                f"(hidden_size {config.hidden_size} in config.json)"
            )
        head[name] = found[name].astype(want.dtype)
    leftover = sorted(set(found) - set(head))
    if leftover:
        raise ValueError(f"{file}: unexpected tensor(s): {', '.join(leftover)}; this value head holds "
                         f"{', '.join(names)} (value_head.json says which)")
    return head


def _read_hf_folder(folder: Path, skip: tuple[str, ...] = ()) -> tuple[dict, dict[str, np.ndarray], str]:
    """The folder's config dict, its weights by Hugging Face name and the file named in errors; `skip`: files
    beside the weights that are not part of them (a value head)."""
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
        files = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in skip)
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
