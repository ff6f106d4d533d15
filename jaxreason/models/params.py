"""Hugging Face parameter names and layouts <-> the NNX decoder's parameter tree.

Hugging Face `nn.Linear` weights are [out, in] with heads flattened; the NNX decoder keeps [in, heads,
head_dim] kernels and stacks layers on a leading axis. Each rule below converts one tensor both ways.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from jaxreason.models.config import ModelConfig

# Tensors a checkpoint may carry that carry no parameters (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Rule:
    hf_name: str  # may contain {i}, the layer index
    path: tuple[str, ...]  # path in the NNX pure-dict parameter tree
    to_nnx: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]


def _same(w, cfg):
    return w


def _transpose(w, cfg):
    return w.T


def _rules(cfg: ModelConfig) -> list[_Rule]:
    e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def in_heads(n):  # [n*d, e] -> [e, n, d]
        return (lambda w, c: w.T.reshape(e, n, d)), (lambda w, c: w.reshape(e, n * d).T)

    def bias(n):  # [n*d] -> [n, d]
        return (lambda w, c: w.reshape(n, d)), (lambda w, c: w.reshape(n * d))

    layer = "model.layers.{i}."
    t = ("transformer", "layers")
    rules = [
        _Rule("model.embed_tokens.weight", ("transformer", "embed"), _same, _same),
        _Rule("model.norm.weight", ("transformer", "norm", "scale"), _same, _same),
        _Rule(layer + "input_layernorm.weight", t + ("attention_norm", "scale"), _same, _same),
        _Rule(layer + "post_attention_layernorm.weight", t + ("mlp_norm", "scale"), _same, _same),
        _Rule(layer + "self_attn.q_proj.weight", t + ("attention", "q"), *in_heads(h)),
        _Rule(layer + "self_attn.k_proj.weight", t + ("attention", "k"), *in_heads(kv)),
        _Rule(layer + "self_attn.v_proj.weight", t + ("attention", "v"), *in_heads(kv)),
        _Rule(
            layer + "self_attn.o_proj.weight",
            t + ("attention", "o"),
            lambda w, c: w.T.reshape(h, d, e),
            lambda w, c: w.reshape(h * d, e).T,
        ),
        _Rule(layer + "mlp.gate_proj.weight", t + ("mlp", "gate"), _transpose, _transpose),
        _Rule(layer + "mlp.up_proj.weight", t + ("mlp", "up"), _transpose, _transpose),
        _Rule(layer + "mlp.down_proj.weight", t + ("mlp", "down"), _transpose, _transpose),
    ]
    if cfg.attention_bias:
        for name, n in (("q", h), ("k", kv), ("v", kv)):
            rules.append(_Rule(layer + f"self_attn.{name}_proj.bias", t + ("attention", f"{name}_bias"), *bias(n)))
    if not cfg.tie_word_embeddings:
        rules.append(_Rule("lm_head.weight", ("lm_head",), _transpose, _transpose))
    return rules


def hf_to_nnx(
    tensors: Mapping[str, np.ndarray], cfg: ModelConfig, expected: Mapping, source: str
) -> dict:
    """Converts Hugging Face tensors to a pure-dict parameter tree shaped like `expected`.

    Args:
      tensors: Hugging Face name -> array (float of any precision).
      cfg: the model config; decides which tensors must exist.
      expected: the model's abstract pure dict (`nnx.to_pure_dict` of `nnx.eval_shape`), for shapes.
      source: the checkpoint's file name, quoted in errors.

    Raises:
      ValueError naming the tensor when one is missing, misshapen or unexpected.
    """
    used = set()
    tree: dict = {}
    for rule in _rules(cfg):
        layered = "{i}" in rule.hf_name
        names = [rule.hf_name.format(i=i) for i in range(cfg.num_layers)] if layered else [rule.hf_name]
        want = _lookup(expected, rule.path)
        want_shape = tuple(want.shape[1:] if layered else want.shape)
        hf_shape = rule.to_hf(np.empty(want_shape, np.float32), cfg).shape
        parts = []
        for name in names:
            if name not in tensors:
                raise ValueError(f"{source}: missing tensor {name!r}")
            tensor = np.asarray(tensors[name])
            if tensor.shape != hf_shape:
                raise ValueError(f"{source}: tensor {name!r} has shape {tensor.shape}, expected {hf_shape}")
            parts.append(rule.to_nnx(tensor, cfg))
            used.add(name)
        value = np.stack(parts) if layered else parts[0]
        _assign(tree, rule.path, value.astype(want.dtype))
    leftover = sorted(
        n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES) and not _is_tied_head(n, cfg)
    )
    if leftover:
        raise ValueError(f"{source}: unexpected tensor(s) the model has no place for: {', '.join(leftover[:5])}")
    return tree


def nnx_to_hf(tree: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_nnx`: a pure-dict parameter tree to Hugging Face tensors (float32)."""
    out = {}
    for rule in _rules(cfg):
        value = np.asarray(_lookup(tree, rule.path), dtype=np.float32)
        if "{i}" in rule.hf_name:
            for i in range(cfg.num_layers):
                out[rule.hf_name.format(i=i)] = np.ascontiguousarray(rule.to_hf(value[i], cfg))
        else:
            out[rule.hf_name] = np.ascontiguousarray(rule.to_hf(value, cfg))
    return out


def _is_tied_head(name: str, cfg: ModelConfig) -> bool:
    # transformers may save the tied head as its own tensor; it is the embedding and carries nothing new.
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def _lookup(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _assign(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
