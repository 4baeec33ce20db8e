"""`runtime.retain_freed_memory`: freed XLA buffers are reused, not faulted in again."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from synjax import configlib, runtime

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A fresh process (the allocator is set before JAX starts its threads): a jitted
# call whose 64 MB output (above glibc's 32 MB mmap ceiling) is freed and
# allocated again every call; the median of the minor page faults per call after
# a warm-up (outputs are freed asynchronously: the heap grows over the first
# calls, a dozen of them on a loaded machine, until it holds those in flight).
_RUN = """
import json, resource, statistics, sys
from synjax import runtime

took = runtime.retain_freed_memory() if sys.argv[1] == "retain" else None
import jax, jax.numpy as jnp

double = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((16_000_000,), jnp.float32)
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    double(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults_per_call": statistics.median(faults[-15:])}))
"""

PAGES_OF_OUTPUT = 16_000_000 * 4 // 4096


def _faults(policy: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _RUN, policy],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_retained_memory_is_reused_without_page_faults():
    retained = _faults("retain")
    if not retained["took"]:
        pytest.skip("no glibc mallopt on this platform")
    # Without the setting every call faults its output in again (~15,600 pages
    # of 4 KiB; fewer where the kernel backs it with huge pages).
    assert retained["faults_per_call"] < PAGES_OF_OUTPUT / 20, retained
    system = _faults("system")
    assert system["faults_per_call"] > retained["faults_per_call"], (system, retained)


def test_config_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "retain_freed_memory", lambda: calls.append(1) or True)
    runtime.configure_host_memory(ml_collections.ConfigDict({"retain_freed_memory": False}))
    assert calls == []
    runtime.configure_host_memory(ml_collections.ConfigDict(configlib.job_fields("partners")))
    assert calls == [1]
