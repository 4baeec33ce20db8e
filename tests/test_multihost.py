"""Multi-host training: two local CPU processes equal one process with both shares.

Each process of `tests/_multihost_worker.py` has one CPU device, joins the run
through `synjax.runtime.initialize_distributed` (`JAX_COORDINATOR_ADDRESS`,
`SYNJAX_NUM_PROCESSES`, `SYNJAX_PROCESS_ID`; gloo CPU collectives), loads
only its half of a fixed batch of 4 and takes one train step of the real
loop. A single process that loads all 4 rows must end with the same
parameters; one that loads only the first half must not (so the second
process's share did count). Only process 0 writes the metrics and the
checkpoint.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from synjax import runtime
from synjax.errors import ConfigError
from tests.conftest import REPO_ROOT

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNJAX_", "JAX_COORD"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _worker(out_dir, workdir, rows, env, distributed=False) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests._multihost_worker", str(out_dir), str(workdir), rows]
    return subprocess.Popen(
        args + (["--distributed"] if distributed else []),
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen) -> None:
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"worker did not finish in {TIMEOUT_S} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]


def _params(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _single(tmp_path, name: str, rows: str) -> tuple[subprocess.Popen, object]:
    """A one-process run on `rows` of the batch, started; and where its parameters go."""
    out = tmp_path / name
    out.mkdir()
    return _worker(out, tmp_path / f"{name}_run", rows, _env()), out / "params_0.npz"


def test_two_processes_equal_one_process_with_both_shares(tmp_path):
    out, workdir = tmp_path / "two", tmp_path / "two_run"
    out.mkdir()
    port = _free_port()
    # All four runs at once: the test takes the time of the slowest.
    singles = {
        name: _single(tmp_path, name, rows) for name, rows in (("whole", "0:4"), ("half", "0:2"))
    }
    processes = [
        _worker(
            out,
            workdir,
            "0:4",
            _env(
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                SYNJAX_NUM_PROCESSES="2",
                SYNJAX_PROCESS_ID=str(i),
            ),
            distributed=True,
        )
        for i in range(2)
    ]
    for process in processes + [process for process, _ in singles.values()]:
        _finish(process)
    two = [_params(out / f"params_{i}.npz") for i in range(2)]
    whole, half = (_params(singles[name][1]) for name in ("whole", "half"))

    assert sorted(whole) == sorted(two[0]) == sorted(two[1]) and whole
    for key in whole:
        np.testing.assert_array_equal(two[0][key], two[1][key])  # replicated state
        np.testing.assert_allclose(two[0][key], whole[key], rtol=1e-5, atol=1e-6)
    # The second share counted: one process's half alone gives other parameters.
    assert any(not np.allclose(whole[k], half[k], rtol=1e-3, atol=1e-5) for k in whole)

    # Only process 0 wrote: one metrics line for the one step, one checkpoint.
    lines = (workdir / "metrics" / "tiny.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]
    assert sorted(p.name for p in (workdir / "checkpoints" / "tiny").iterdir()) == ["1"]


def test_distributed_without_a_cluster_is_a_config_error(monkeypatch):
    monkeypatch.setenv(runtime.NUM_PROCESSES_ENV, "two")
    with pytest.raises(ConfigError, match="SYNJAX_NUM_PROCESSES='two': expected an integer"):
        runtime.initialize_distributed({"distributed": True})


def test_not_distributed_does_nothing(monkeypatch):
    # A bad variable is not even read when the config does not ask for several processes.
    monkeypatch.setenv(runtime.NUM_PROCESSES_ENV, "two")
    runtime.initialize_distributed({"distributed": False})
