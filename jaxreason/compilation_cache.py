"""JAX's persistent compilation cache, on by default for the command line: a program compiled once (the search's
first call compiles for minutes on a CPU) is read back from disk by every later run with the same shapes."""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "JAXREASON_CACHE_DIR"


def default_cache_dir() -> Path:
    """$JAXREASON_CACHE_DIR, else $XDG_CACHE_HOME/jaxreason/xla, else ~/.cache/jaxreason/xla."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxreason" / "xla"


def enable_compilation_cache(path: str | Path | None = None, min_compile_seconds: float = 1.0) -> Path | None:
    """Turns the cache on at `path` (default `default_cache_dir()`) for programs that took at least
    `min_compile_seconds` to compile; returns the folder. A cache folder already set (JAX_COMPILATION_CACHE_DIR)
    wins; JAXREASON_CACHE_DIR=off turns it off (returns None)."""
    if os.environ.get(ENV, "").lower() == "off":
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    folder = Path(path) if path is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
