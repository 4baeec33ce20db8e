"""The EM instances pipeline: config checks, the VNC volume on both grids, the CLI smoke run."""

import csv
import json
import pathlib

import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.io import open_volume
from synjax.pipelines import config_checks
from tests.conftest import REPO_ROOT, load_config, run_main

CONFIG = REPO_ROOT / "configs" / "vnc.py"


def _config(variant=None):
    return load_config(CONFIG, variant)


_run = run_main


@pytest.mark.parametrize("variant", ["synthetic", "smoke"])
def test_synthetic_variants_pass_the_config_checks(variant):
    config = _config(variant)
    config_checks.check_config(config)
    config_checks.check_input_files(config)  # synthetic: nothing to open


def test_default_variant_passes_the_checks_on_the_real_volume(shared_data, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the config names ../shared/data relative to the repo
    config = _config()
    config_checks.check_config(config)
    config_checks.check_input_files(config)
    config.data.path = str(shared_data / "missing.h5")
    with pytest.raises(DataError, match="config.data.path"):
        config_checks.check_input_files(config)


def test_config_checks_name_bad_instance_keys():
    config = _config("smoke")
    config.model.rpn_level = 2
    with pytest.raises(ConfigError, match=r"config.model.rpn_level=2"):
        config_checks.check_config(config)
    config = _config("smoke")
    config.train.patch = (4, 30, 32)
    with pytest.raises(ConfigError, match=r"config.train.patch=\(4, 30, 32\): expected multiples"):
        config_checks.check_config(config)
    config = _config()
    config.data.splits.test = (700, 1024)
    with pytest.raises(ConfigError, match=r"config.data.splits.test"):
        config_checks.check_config(config)
    config = _config("smoke")
    config.predict.overlap = (4, 8, 8)
    with pytest.raises(ConfigError, match=r"config.predict.overlap"):
        config_checks.check_config(config)
    config = _config("smoke")
    config.baseline.unknown = 1
    with pytest.raises(ConfigError, match=r"config.baseline: unknown key 'unknown'"):
        config_checks.check_config(config)
    # The semantic grids read a head that semantic_weight 0 does not build.
    config = _config("smoke")
    config.model.semantic_weight = 0.0
    with pytest.raises(ConfigError, match=r"config.predict.semantic_mixes=\(0.0, 0.5\)"):
        config_checks.check_config(config)
    config.predict.semantic_mixes = (0.0,)
    config.predict.semantic_rescoring = (False,)
    config_checks.check_config(config)
    config.predict.semantic_mixes = (1.5,)
    with pytest.raises(ConfigError, match=r"config.predict.semantic_mixes"):
        config_checks.check_config(config)


def test_vnc_volume_reads_33_synapses_on_both_grids(shared_data, monkeypatch):
    from synjax.pipelines.instance_data import load_volume, split_rows

    monkeypatch.chdir(REPO_ROOT)
    config = _config()
    volume = load_volume(config)
    assert volume.raw.shape == volume.labels.shape == (20, 1024, 512)
    assert volume.resolution == (50.0, 4.6, 4.6)
    # CREMI's background 0xFFFFFFFFFFFFFFFF became 0; the 33 clefts keep ids 1..33.
    ids = np.unique(volume.labels)
    np.testing.assert_array_equal(ids, np.arange(34))
    assert volume.image.shape == volume.read_labels.shape == (20, 512, 256)
    # Every cleft survives the (1, 2, 2) maximum.
    np.testing.assert_array_equal(np.unique(volume.read_labels), np.arange(34))
    assert split_rows(config, volume, "test") == (768, 1024)


def test_smoke_variant_runs_end_to_end_through_the_cli(tmp_path: pathlib.Path):
    workdir = tmp_path / "vnc"
    result = _run(f"--config={CONFIG}:smoke", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for name in ("metrics.json", "chosen.json", "instances.csv"):
        assert (workdir / name).is_file(), name
    assert (workdir / "example_slices.png").stat().st_size > 0
    attention = sorted((workdir / "attention").glob("*.png"))
    assert 1 <= len(attention) <= 2 and all(p.stat().st_size > 0 for p in attention)
    for name in ("instance_unet", "cleft_segmenter"):
        assert (workdir / "checkpoints" / name / "intensity.json").is_file()
    metrics = json.loads((workdir / "metrics.json").read_text())
    config = _config("smoke")
    rows = tuple(config.data.splits.test)
    assert metrics["test_rows"] == list(rows)
    shape = [config.data.synthetic.shape[0], rows[1] - rows[0], config.data.synthetic.shape[2]]
    assert metrics["test_shape"] == shape
    chosen = metrics["chosen_on_validation_slab"]
    assert chosen["instance_unet"]["score_threshold"] == 0.0
    assert chosen["baseline"]["threshold"] == 0.5
    ours = open_volume(str(workdir / "predictions" / "instances.zarr")).read()
    baseline = open_volume(str(workdir / "predictions" / "baseline.zarr")).read()
    assert list(ours.shape) == list(baseline.shape) == shape
    with open(workdir / "instances.csv") as stream:
        table = list(csv.DictReader(stream))
    # One row per instance, ids 1..k (an untrained network at score threshold 0
    # keeps its detections, so there are some).
    assert len(table) == int(ours.max()) > 0
    assert [int(r["id"]) for r in table] == list(range(1, len(table) + 1))
    y_nm = [float(r["y_nm"]) for r in table]
    # Centroids in the whole volume's nm: inside the test slab's rows.
    resolution_y = config.data.synthetic.resolution[1]
    assert min(y_nm) >= rows[0] * resolution_y and max(y_nm) <= rows[1] * resolution_y
    for name, labels in (("instance_unet", ours), ("baseline", baseline)):
        scores = metrics[name]
        assert 0.0 <= scores["detection_f1"] <= 1.0
        assert 0.0 <= scores["instance_f1_50"] <= 1.0
        assert scores["instances"] == np.unique(labels[labels > 0]).size
        assert scores["predicted_voxels"] == np.count_nonzero(labels)
        assert scores["cremi_score"] >= 0.0
