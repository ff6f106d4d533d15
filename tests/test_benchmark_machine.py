"""benchmarks/machine.py: the CPU class read from its extensions, and the header every benchmark prints first."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import machine  # noqa: E402


def test_the_class_is_the_best_extension_the_cpu_has():
    assert machine.kind({"avx2", "fma"}) == "AVX2"
    assert machine.kind({"avx2", "avx512f"}) == "AVX512"
    assert machine.kind({"avx2", "avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert machine.kind({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}) == "AMX"
    assert machine.kind(set()) == "no AVX2"


def test_the_header_names_the_machine_and_the_libraries():
    info = machine.describe()
    assert set(info) == {"cpu", "cores", "kind", "extensions", "gpus", "versions"}
    assert info["versions"]["jax"] and info["cores"] >= 1
    line = machine.header(info)
    assert line.startswith(f"machine: {info['cpu']}, {info['cores']} cores, {info['kind']}")
    assert f"jax {info['versions']['jax']}" in line
