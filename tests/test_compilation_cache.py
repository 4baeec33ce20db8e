"""JAX's persistent compilation cache: a second run loads what the first compiled."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from synjax import runtime
from synjax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A run in a fresh process (JAX sets its cache up once per process): a jitted
# function and its gradient, then the counts as JSON.
_RUN = """
import json, pathlib, sys
import jax, jax.numpy as jnp
import ml_collections
from synjax import runtime

config = ml_collections.ConfigDict({"compilation_cache": sys.argv[1]})
log = runtime.enable_compilation_cache(config, pathlib.Path(sys.argv[2]))
loss = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)
x = jnp.ones((8, 4))
jax.jit(loss)(jnp.ones((4, 3)), x).block_until_ready()
jax.jit(jax.grad(loss))(jnp.ones((4, 3)), x).block_until_ready()
print(json.dumps({"loaded": log.loaded, "stored": log.stored} if log else None))
"""


def _run(setting: str, workdir: pathlib.Path):
    done = subprocess.run(
        [sys.executable, "-c", _RUN, setting, str(workdir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_run_compiles_nothing_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    first = _run(str(cache), tmp_path / "run1")
    second = _run(str(cache), tmp_path / "run2")
    assert first["stored"] >= 2 and first["loaded"] == 0
    assert second == {"loaded": first["stored"], "stored": 0}


def test_auto_cache_lies_beside_the_workdir(tmp_path):
    first = _run("auto", tmp_path / "run1")
    assert first["stored"] >= 2
    assert any((tmp_path / runtime.AUTO_CACHE_DIR).iterdir())
    # Another run in the same parent folder loads them.
    assert _run("auto", tmp_path / "run2")["stored"] == 0


def test_no_cache_when_turned_off(tmp_path):
    assert _run("", tmp_path / "run") is None
    assert runtime.cache_directory(None, tmp_path) is None


def test_cache_folder_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = ml_collections.ConfigDict({"compilation_cache": str(blocker / "cache")})
    with pytest.raises(ConfigError, match="config.compilation_cache: cannot create"):
        runtime.enable_compilation_cache(config, tmp_path / "run")
