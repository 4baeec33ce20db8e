"""configs/snemi.py: the paper's final ensemble, SNEMI3D's TIFF stacks as distributed, and
the smoke variant end to end through the command line on tiny TIFF stacks."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tifffile

from synjax.errors import ConfigError, DataError
from synjax.io import open_volume
from synjax.pipelines import neuron_data, neurons
from synjax.stages import boundary_models
from tests.conftest import REPO_ROOT

SNEMI = REPO_ROOT / "configs" / "snemi.py"
# Tiny stacks in SNEMI3D's layout: 12 training slices (smoke: 8 train, 4 tune), 6 test slices.
TRAIN_SHAPE, TEST_SHAPE = (12, 32, 32), (6, 32, 32)


def _load_config(variant=None):
    spec = importlib.util.spec_from_file_location("config_snemi", SNEMI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _stack(shape, seed):
    """uint8 EM-like raw and uint16 labels: 8 x 8 cells in yx, shifted every 4 slices."""
    z, y, x = np.indices(shape)
    labels = (1 + ((y + 2 * (z // 4)) // 8) * 8 + (x // 8)).astype(np.uint16)
    edge = np.zeros(shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    noise = np.random.default_rng(seed).integers(0, 30, shape)
    raw = np.where(edge, 40, 200) + noise
    return raw.astype(np.uint8), labels


def _write_snemi(folder: pathlib.Path) -> dict:
    """train-input.tif, train-labels.tif, test-input.tif (+ test labels, not distributed)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_raw, train_labels = _stack(TRAIN_SHAPE, 0)
    test_raw, test_labels = _stack(TEST_SHAPE, 1)
    paths = {}
    for name, array in (
        ("train-input", train_raw),
        ("train-labels", train_labels),
        ("test-input", test_raw),
        ("test-labels", test_labels),
    ):
        paths[name] = folder / f"{name}.tif"
        tifffile.imwrite(paths[name], array)
    return paths


@pytest.fixture(scope="module")
def snemi_files(tmp_path_factory) -> dict:
    return _write_snemi(tmp_path_factory.mktemp("snemi3d"))


def _tiff_config(paths, variant="smoke"):
    config = _load_config(variant)
    config.data.train_path = str(paths["train-input"])
    config.data.train_labels_path = str(paths["train-labels"])
    config.data.test_path = str(paths["test-input"])
    return config


def test_config_holds_the_papers_final_ensemble():
    config = _load_config()
    roles = {(m["name"], m["slices"], m["kernel"], m["only_slices"]) for m in config.models}
    assert roles == {
        ("s1_l3", 1, "l3", None),
        ("s1_c3", 1, "c3", None),
        ("s1_c5", 1, "c5", None),
        ("s5_c3", 5, "c3", ()),
    }
    # No agglomeration: the paper's watershed alone.
    assert tuple(config.watershed.thresholds) == ()
    assert tuple(config.data.resolution) == (30.0, 6.0, 6.0)
    assert config.data.train_path.endswith("train-input.tif")
    assert config.data.train_labels_path.endswith("train-labels.tif")
    assert config.data.test_path.endswith("test-input.tif")
    assert config.data.test_labels_path is None
    # The misaligned-slice list reaches the 3D net, also when set after loading (as the CLI does).
    config.lock()
    config.data.misaligned_slices = (30, 31)
    assert config.models[3]["only_slices"] == (30, 31)
    assert [m["only_slices"] for m in config.models[:3]] == [None, None, None]


def test_docstring_shows_the_run_command_with_the_three_tiffs():
    text = SNEMI.read_text()
    docstring = text.split('"""')[1]
    for piece in (
        "python -m synjax.main --config=configs/snemi.py --workdir=",
        "--config.data.train_path=/data/snemi3d/train-input.tif",
        "--config.data.train_labels_path=/data/snemi3d/train-labels.tif",
        "--config.data.test_path=/data/snemi3d/test-input.tif",
    ):
        assert piece in docstring, piece


def _constant(probability: float):
    """A fake DeepEM3D apply function: boundary probability `probability` everywhere."""

    def apply(x):
        n, _, y, x_size, _ = x.shape
        return jnp.broadcast_to(jnp.array([1 - probability, probability]), (n, y, x_size, 2))

    return apply


@pytest.mark.parametrize(
    ("misaligned", "s5_value", "expected"),
    [
        # The 3D net is the highest where it is used, and used only on slices 1 and 3.
        ((1, 3), 0.9, [0.4, 0.9, 0.4, 0.9, 0.4]),
        # Lower than the 2D nets: their maximum (s1_c5's 0.4) everywhere.
        ((1, 3), 0.1, [0.4] * 5),
        # No misaligned slices listed: the 3D net adds nothing.
        ((), 0.9, [0.4] * 5),
    ],
)
def test_ensemble_uses_the_3d_net_only_on_the_misaligned_slices(
    misaligned, s5_value, expected, tmp_path
):
    config = _load_config()
    config.predict.tta = False
    config.predict.progress = False
    config.data.misaligned_slices = misaligned
    # s1_l3, s1_c3, s1_c5 (every slice), s5_c3 (misaligned slices only).
    fns = [_constant(p) for p in (0.2, 0.3, 0.4, s5_value)]
    raw = np.zeros((5, 16, 16), np.uint8)
    got = boundary_models.BoundaryEnsembleStage.from_config(config).predict(tmp_path, raw, fns)
    per_slice = np.broadcast_to(np.float32(expected)[:, None, None], raw.shape)
    np.testing.assert_allclose(got, per_slice, rtol=1e-6)


def test_load_part_reads_the_tiff_stacks(snemi_files):
    config = _tiff_config(snemi_files)
    train_raw, train_labels = _stack(TRAIN_SHAPE, 0)
    test_raw, _ = _stack(TEST_SHAPE, 1)
    train = neuron_data.load_part(config, "train")
    tune = neuron_data.load_part(config, "tune")
    test = neuron_data.load_part(config, "test")
    np.testing.assert_array_equal(train.raw, train_raw[0:8])
    np.testing.assert_array_equal(train.neuron_ids, train_labels[0:8])
    assert train.neuron_ids.dtype == np.uint64
    np.testing.assert_array_equal(tune.raw, train_raw[8:12])
    np.testing.assert_array_equal(tune.neuron_ids, train_labels[8:12])
    np.testing.assert_array_equal(test.raw, test_raw)
    assert test.neuron_ids is None and test.oversegmentation is None
    assert train.resolution == test.resolution == (30.0, 6.0, 6.0)
    config.data.test_labels_path = str(snemi_files["test-labels"])
    np.testing.assert_array_equal(
        neuron_data.load_part(config, "test").neuron_ids, _stack(TEST_SHAPE, 1)[1]
    )


def test_load_part_errors_name_the_config_key(snemi_files, tmp_path):
    config = _tiff_config(snemi_files)
    config.data.train_labels_path = None
    with pytest.raises(DataError, match=r"no labels for the train part: config\.data\."):
        neuron_data.load_part(config, "train")

    config = _tiff_config(snemi_files)
    config.data.train_labels_path = str(snemi_files["test-input"])  # 6 slices, not 12
    with pytest.raises(DataError, match=r"train_labels_path.*\(6, 32, 32\).*\(12, 32, 32\)"):
        neuron_data.load_part(config, "train")

    config = _tiff_config(snemi_files)
    config.data.train_labels_path = str(tmp_path / "absent.tif")
    with pytest.raises(DataError, match=r"config\.data\.train_labels_path.*SNEMI3D not found"):
        neuron_data.load_part(config, "train")

    config = _tiff_config(snemi_files)
    config.data.misaligned_slices = (2, 6)  # the smoke test part has 6 slices: 0..5
    with pytest.raises(ConfigError, match=r"misaligned_slices=\(2, 6\).*\[0, 6\)"):
        neuron_data.load_part(config, "test")

    config = _tiff_config(snemi_files)
    config.data.resolution = (30.0, 6.0)
    with pytest.raises(ConfigError, match="config.data.resolution"):
        neuron_data.load_part(config, "train")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device, as on a user's laptop
    env["JAX_PLATFORMS"] = "cpu"
    # Compilation dominates these tiny nets; the numbers only need to exist.
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "synjax.main", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_smoke_variant_end_to_end_on_tiff_stacks(snemi_files, tmp_path):
    workdir = tmp_path / "snemi_smoke"
    paths = [
        f"--config.data.train_path={snemi_files['train-input']}",
        f"--config.data.train_labels_path={snemi_files['train-labels']}",
        f"--config.data.test_path={snemi_files['test-input']}",
    ]
    result = _run_cli(
        f"--config={SNEMI}:smoke",
        f"--workdir={workdir}",
        *paths,
        "--config.data.misaligned_slices=(1, 2)",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    boundary = open_volume(str(workdir / neurons.BOUNDARIES))
    seg = open_volume(str(workdir / neurons.SEGMENTATION)).read()
    assert boundary.shape == seg.shape == TEST_SHAPE
    assert boundary.resolution == (30.0, 6.0, 6.0)
    assert seg.dtype == np.uint64 and seg.min() >= 1
    # The smoke ensemble: one 2D net on every slice, the 3D net on the misaligned ones.
    assert [(m["name"], m["only_slices"]) for m in _load_config("smoke").models] == [
        ("s1_c3", None),
        ("s5_c3", ()),
    ]
    for model in ("s1_c3", "s5_c3"):
        assert any((workdir / "checkpoints" / model).iterdir()), model
    chosen = json.loads((workdir / neurons.WATERSHED_FILE).read_text())[neurons.OURS]
    assert chosen["threshold"] is None  # no agglomeration
    # Without test labels: one line says why, and nothing is scored.
    skipped = [line for line in result.stderr.splitlines() if "scoring skipped" in line]
    assert len(skipped) == 1 and "config.data.test_labels_path is not set" in skipped[0]
    assert not (workdir / "metrics.json").exists()

    # With the test labels given, evaluate alone scores the saved segmentation.
    result = _run_cli(
        f"--config={SNEMI}:smoke",
        f"--workdir={workdir}",
        *paths,
        "--config.mode=evaluate",
        f"--config.data.test_labels_path={snemi_files['test-labels']}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert 0.0 <= metrics[neurons.OURS]["adapted_rand_error"] <= 1.0
    assert metrics["models"] == ["s1_c3", "s5_c3"]


def test_cli_misaligned_slice_outside_the_test_part_is_one_line(snemi_files, tmp_path):
    result = _run_cli(
        f"--config={SNEMI}:smoke",
        f"--workdir={tmp_path / 'w'}",
        "--config.mode=predict",
        f"--config.data.test_path={snemi_files['test-input']}",
        "--config.data.misaligned_slices=(7,)",
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("synjax: error: config.data.misaligned_slices=(7,)")
    assert "[0, 6)" in lines[-1]


def test_slice_lists_are_left_out_on_other_volumes(tmp_path):
    """A tuning part is not the test stack: its z indices are not the listed ones."""
    config = _load_config()
    config.predict.tta = False
    config.predict.progress = False
    # Index 30 lies past this 5-slice volume: with slice lists applied it
    # would not fit; on another volume the listed model is simply left out.
    config.data.misaligned_slices = (1, 30)
    fns = [_constant(p) for p in (0.2, 0.3, 0.4, 0.9)]
    raw = np.zeros((5, 16, 16), np.uint8)
    got = boundary_models.BoundaryEnsembleStage.from_config(config).predict(
        tmp_path, raw, fns, slice_lists=False
    )
    np.testing.assert_allclose(got, np.full(raw.shape, 0.4, np.float32), rtol=1e-6)
