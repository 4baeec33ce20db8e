"""The benchmark harness (`benchmarks/run_all.py`): its output's structure and FLOP counts.

No time is asserted: only that the harness runs, writes what it says, and that
the FLOPs it divides by come out as counted by hand.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import common, torch_nets  # noqa: E402

# The quick run's sizes, as in run_all.QUICK (its own values are checked below).
MATMUL = 128
CONV_INPUT = (1, 4, 8, 8, 2)  # [b, z, y, x, c]
CONV_FEATURES = 3
REQUIRED = ("section", "name", "framework", "mode", "median_s", "repeats")


def _valid_output_voxels(shape, kernel=3):
    b, z, y, x, _ = shape
    return b * (z - kernel + 1) * (y - kernel + 1) * (x - kernel + 1)


def test_flops_of_a_matmul_and_a_conv_match_a_hand_count():
    a = jnp.ones((8, 16))
    b = jnp.ones((16, 4))
    compiled, _ = common.compile_jax(jax.jit(jnp.matmul), a, b)
    assert common.flops(compiled) == 2 * 8 * 16 * 4

    x = jnp.ones((1, 4, 6, 6, 2))
    k = jnp.ones((3, 3, 3, 2, 5))

    def conv(v, w):
        dims = ("NDHWC", "DHWIO", "NDHWC")
        return jax.lax.conv_general_dilated(v, w, (1, 1, 1), "VALID", dimension_numbers=dims)

    compiled, _ = common.compile_jax(jax.jit(conv), x, k)
    # Output 2x4x4 voxels, 5 channels, each a sum of 27 taps x 2 channels: a multiply and an add.
    assert common.flops(compiled) == 2 * (2 * 4 * 4) * 5 * 27 * 2


def test_quick_run_writes_json_and_table(tmp_path):
    out, readme = tmp_path / "all.json", tmp_path / "README.md"
    command = [
        sys.executable,
        "benchmarks/run_all.py",
        "--quick",
        "--sections",
        "conv",
        "merge",
        "--no-torch",
        "--out",
        str(out),
        "--readme",
        str(readme),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(out.read_text())

    assert payload["quick"] is True
    assert payload["errors"] == {}
    assert payload["torch"] == "--no-torch"
    for key in ("commit", "environment", "versions", "load_average", "sizes", "command"):
        assert key in payload
    assert payload["sizes"]["matmul"] == MATMUL
    assert tuple(payload["sizes"]["conv"][0]) == CONV_INPUT
    assert payload["sizes"]["conv"][1] == CONV_FEATURES
    rows = payload["rows"]
    for r in rows:
        for key in REQUIRED:
            assert key in r, (key, r)
        assert r["repeats"] >= 1
    # The peak is measured even when not asked for; conv and merge as asked; nothing else.
    assert {r["section"] for r in rows} == {"peak", "conv", "ops"}

    peaks = [r for r in rows if r["section"] == "peak"]
    assert sorted(r["dtype"] for r in peaks) == ["bfloat16", "float32"]
    for r in peaks:
        assert r["flops"] == 2 * MATMUL**3
        assert r["peak_flop_per_s"] > 0
        assert payload["peaks_gflop_per_s"][r["dtype"]] == pytest.approx(r["peak_flop_per_s"] / 1e9)

    convs = [r for r in rows if r["section"] == "conv"]
    assert sorted(r["dtype"] for r in convs) == ["bfloat16", "float32"]
    hand = 2 * _valid_output_voxels(CONV_INPUT) * 27 * CONV_INPUT[-1] * CONV_FEATURES
    for r in convs:
        if r["dtype"] == "float32":
            assert r["flops"] == hand
        else:
            # A backend without bfloat16 convolutions (XLA's CPU) converts both operands
            # to float32 first, and the cost analysis counts one FLOP per converted element.
            converted = np.prod(CONV_INPUT) + 27 * CONV_INPUT[-1] * CONV_FEATURES
            assert hand <= r["flops"] <= hand + converted
        assert r["output_shape"] == [1, 2, 6, 6, CONV_FEATURES]
        # Rates are the FLOPs over the median, and a fraction of the row's dtype's peak.
        assert r["gflop_per_s"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        peak = payload["peaks_gflop_per_s"][r["dtype"]] * 1e9
        assert r["peak_fraction"] == pytest.approx(r["flops"] / r["median_s"] / peak)

    merge = [r for r in rows if r["section"] == "ops"]
    assert [r["framework"] for r in merge] == ["numpy/scipy", "python"]
    assert merge[0]["kept"] > 0

    table = readme.read_text()
    assert payload["environment"]["device_kind"] in table
    assert "| section | what | framework |" in table
    assert table.count("\n| ") == len(rows) + 1  # a header, then one line per row
    for r in rows:
        assert r["name"] in table


def test_torch_twins_have_the_flax_parameter_counts():
    pytest.importorskip("torch")
    from synjax.models.deepem3d import DeepEM3DNet, DeepEM3DSettings
    from synjax.models.pruning import DEFAULT_POOLS, PruningCNN

    def count(tree):
        return int(sum(np.prod(p.shape) for p in jax.tree.leaves(tree)))

    key = jax.random.key(0)
    features, window = (2, 3, 4, 5, 6), (4, 16, 16)
    x = jnp.zeros((1, *window, 4))
    # Shapes only: eval_shape traces the initialisation without compiling it.
    params = jax.eval_shape(PruningCNN(features=features, dense_features=7).init, key, x)
    twin = torch_nets.build_torch_pruning(window, 4, features, DEFAULT_POOLS, 7)
    assert torch_nets.count_parameters(twin) == count(params["params"])

    settings = DeepEM3DSettings(slices=5, width=1 / 32, side_features=4)
    x = jnp.zeros((1, 5, 32, 32, 1))
    variables = jax.eval_shape(DeepEM3DNet(settings).init, key, x)
    twin = torch_nets.build_torch_deepem3d(settings)
    assert torch_nets.count_parameters(twin) == count(variables["params"])

    import torch

    with torch.inference_mode():
        y = twin.eval()(torch.zeros(1, 1, 5, 32, 32))
    assert tuple(y.shape) == (1, settings.num_classes, 32, 32)


def test_network_timing_counts_the_forward_and_a_larger_train_step():
    """`time_jax_network` on a one-matmul "network": its forward FLOPs by hand."""
    batch, k, n = 4, 16, 8
    x = jnp.ones((batch, k))
    params = {"w": jnp.full((k, n), 0.5)}

    def infer(p, v):
        return v @ p["w"]

    def loss(p, v):
        return jnp.mean(infer(p, v) ** 2)

    res = common.time_jax_network(infer, loss, params, x, repeats=1)
    assert res["infer_flops"] == 2 * batch * k * n
    # Forward again, the weight gradient (another 2 * batch * k * n), loss and Adam on top.
    assert res["train_flops"] > 2 * res["infer_flops"]
    assert len(res["infer"].times) == len(res["train"].times) == 1
    np.testing.assert_allclose(np.asarray(res["output"]), np.full((batch, n), 0.5 * k))
    # The caller's parameters survive the donated train steps.
    np.testing.assert_array_equal(np.asarray(params["w"]), 0.5)
