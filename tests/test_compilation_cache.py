"""The persistent compilation cache the command line turns on: where it goes, and how to move or stop it."""

import os
import subprocess
import sys

CHILD = """
import jax
from jaxreason.compilation_cache import enable_compilation_cache
folder = enable_compilation_cache()
print(folder, jax.config.jax_compilation_cache_dir)
"""


def _run(tmp_path, **env):
    environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environment.update(HOME=str(tmp_path), XDG_CACHE_HOME="", **env)
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_default_folder_and_override(tmp_path):
    folder, configured = _run(tmp_path)
    assert folder == configured == str(tmp_path / ".cache" / "jaxreason" / "xla")
    folder, configured = _run(tmp_path, JAXREASON_CACHE_DIR=str(tmp_path / "elsewhere"))
    assert folder == configured == str(tmp_path / "elsewhere")


def test_off(tmp_path):
    folder, configured = _run(tmp_path, JAXREASON_CACHE_DIR="off")
    assert folder == configured == "None"
