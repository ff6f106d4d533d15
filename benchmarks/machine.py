"""Where a benchmark's figures come from: the CPU (model, cores, the vector extensions that decide its matmul
speed), the GPU when one is visible, and the versions of the libraries compared. Every benchmark prints
`header()` first and puts `describe()` in its JSON, so a figure is never read against another machine's.

    python benchmarks/machine.py    # the header and the JSON alone
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess

# The extensions that set a CPU's float32 / bfloat16 matmul rate, as /proc/cpuinfo names them.
EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "mctx", "torch", "transformers")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:  # not Linux: the model from `platform`, no extensions known
        pass
    return model, flags


def kind(flags: set[str]) -> str:
    """The CPU's class for the benchmark tables: the best of AMX, AVX512-BF16, AVX512, AVX2 it has."""
    for name, needs in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"), ("AVX512", "avx512f"), ("AVX2", "avx2")):
        if needs in flags:
            return name
    return "no AVX2"


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def describe() -> dict:
    model, flags = _cpuinfo()
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": model, "cores": os.cpu_count(), "kind": kind(flags),
            "extensions": [e for e in EXTENSIONS if e in flags], "gpus": _gpus(), "versions": versions}


def header(info: dict | None = None) -> str:
    """One line: CPU model, cores, its class and extensions, GPUs, and the library versions."""
    d = info or describe()
    gpus = f"; GPU: {', '.join(d['gpus'])}" if d["gpus"] else ""
    versions = ", ".join(f"{k} {v}" for k, v in d["versions"].items() if v)
    return (f"machine: {d['cpu']}, {d['cores']} cores, {d['kind']} ({' '.join(d['extensions']) or 'none'}){gpus}; "
            f"{versions}")


if __name__ == "__main__":
    print(header())
    print(json.dumps(describe()))
