"""Test-wide setup. Eight fake CPU devices must be requested before jax is first imported."""

import os
import tempfile

import pytest

# A collective on fake CPU devices waits for all eight device threads; on a loaded 2-core machine one can lag
# past XLA's default wait, which aborts the whole worker process, so the waits are raised.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=1800 --xla_cpu_collective_timeout_seconds=1800"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A persistent XLA cache shared by the test workers and the CLI subprocesses they start (which inherit
# the environment): the same tiny shapes compile once per machine instead of once per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxreason-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module. Each XLA CPU executable holds memory mappings of its
    own, and one process that keeps all the suite's programs alive runs past the kernel's map limit
    (vm.max_map_count, 65530 by default), which kills it in mmap; the persistent cache reloads what a later
    module shares."""
    yield
    import jax

    jax.clear_caches()
