"""Training algorithms by name: `python -m jaxreason train --config X.yaml` runs the one X names in `algorithm:`.

An algorithm is a frozen config class and `run(config, resume) -> metrics`; its module calls
`register_algorithm` when imported. The built-in modules are imported only when their algorithm is asked for,
so that the command line starts without loading JAX.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# name -> the module that registers it (imported on first use)
_BUILTIN = {"grpo": "jaxreason.algorithms.grpo", "rest_mcts": "jaxreason.algorithms.rest_mcts",
            "rstar": "jaxreason.algorithms.rstar", "score": "jaxreason.algorithms.score",
            "selfplay": "jaxreason.algorithms.selfplay",
            "sft": "jaxreason.algorithms.sft", "step_rl": "jaxreason.algorithms.step_rl",
            "vstar": "jaxreason.algorithms.vstar"}


class RunInterrupted(RuntimeError):
    """A run stopped by SIGTERM after saving its checkpoint; running it again with `resume` continues it."""


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    config_class: type  # a frozen dataclass, read from the YAML by `jaxreason.config.from_dict`
    run: Callable[[Any, bool], dict]  # (config, resume) -> metrics
    summarize: Callable[[Any, dict], str] | None  # (config, metrics) -> lines for the terminal
    interrupted: tuple[type[BaseException], ...]  # what `run` raises when SIGTERM stopped it after a checkpoint

    def summary(self, config, metrics: dict) -> str:
        if self.summarize is not None:
            return self.summarize(config, metrics)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k} {v}"
                          for k, v in scalars.items())
        return f"{self.name}: finished" + (f" ({shown})" if shown else "")


_registry: dict[str, Algorithm] = {}

def register_algorithm(
    name: str,
    config_class: type,
    run: Callable[[Any, bool], dict],
    *,
    summarize: Callable[[Any, dict], str] | None = None,
    interrupted: type[BaseException] | tuple[type[BaseException], ...] = RunInterrupted,
) -> Algorithm:
    """Makes `algorithm: name` in a config run `run(config_class from the YAML, resume)`."""
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"algorithm {name!r}: config_class must be a dataclass, got {config_class!r}")
    algorithm = Algorithm(name, config_class, run, summarize,
                          interrupted if isinstance(interrupted, tuple) else (interrupted,))
    if name in _registry and _registry[name] != algorithm:
        raise ValueError(f"algorithm {name!r} is registered already (by {_registry[name].run.__module__})")
    _registry[name] = algorithm
    return algorithm


def algorithm_names() -> list[str]:
    return sorted(set(_registry) | set(_BUILTIN))


def get_algorithm(name: str) -> Algorithm:
    if name not in _registry and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
        if name not in _registry:  # a bug, not a user error: keep the traceback
            raise RuntimeError(f"{_BUILTIN[name]} does not register algorithm {name!r}")
    if name not in _registry:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(algorithm_names())})")
    return _registry[name]


def load_algorithm_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, default: str | None = None
) -> tuple[Algorithm, Any]:
    """The algorithm that the config names in `algorithm:` (else `default`) and the rest of it in its config class.

    `algorithm=NAME` among the overrides picks another algorithm; unknown keys are errors as in `load_config`.
    """
    from jaxreason.config import from_dict, read_config

    raw, source = read_config(path, overrides)
    name = raw.pop("algorithm", default)
    known = ", ".join(algorithm_names())
    if name is None:
        raise ValueError(f"{source}: missing key 'algorithm' (known algorithms: {known})")
    if not isinstance(name, str) or name not in algorithm_names():
        raise ValueError(f"{source}: unknown algorithm {name!r} in key 'algorithm' (known algorithms: {known})")
    algorithm = get_algorithm(name)
    return algorithm, from_dict(algorithm.config_class, raw, source)
