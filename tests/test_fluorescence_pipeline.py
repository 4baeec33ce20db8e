"""The fluorescence pipeline: the smoke variant through the CLI, its config checks, its table."""

import csv
import json
import pathlib

import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.io import open_volume
from synjax.io.instance_table import instance_rows
from synjax.pipelines import config_checks
from tests.conftest import REPO_ROOT, load_config, run_main

CONFIG = REPO_ROOT / "configs" / "fluorescence.py"


def _config(variant=None):
    return load_config(CONFIG, variant)


_run = run_main


@pytest.mark.parametrize("variant", [None, "smoke", "paper"])
def test_every_variant_passes_the_config_checks(variant):
    config = _config(variant)
    config_checks.check_config(config)
    config_checks.check_input_files(config)  # synthetic: nothing to open


def test_config_check_depths_mirror_the_resnet_architectures():
    from synjax.models.resnet3d import ARCHITECTURES

    assert set(config_checks.fluorescence.FLUORESCENCE_DEPTHS) == set(ARCHITECTURES)


def test_config_checks_name_bad_fluorescence_keys():
    config = _config("smoke")
    config.model.depth = 19
    with pytest.raises(ConfigError, match=r"config.model.depth=19"):
        config_checks.check_config(config)
    config = _config("smoke")
    config.predict.overlap = (16, 8, 8)
    with pytest.raises(ConfigError, match=r"config.predict.overlap"):
        config_checks.check_config(config)
    config = _config("smoke")
    config.model.levels = ("P3", "P2")
    with pytest.raises(ConfigError, match=r"config.model.levels"):
        config_checks.check_config(config)


def test_instance_table_by_hand():
    labels = np.zeros((2, 4, 4), np.uint32)
    labels[0, 0, 0:2] = 1  # centres (0.5, 0.5, 1.0) voxels
    labels[1, 2:4, 3] = 2  # centres (1.5, 3.0, 3.5)
    image = np.zeros(labels.shape, np.float32)
    image[0, 0, 0], image[0, 0, 1] = 2.0, 4.0
    image[1, 2:4, 3] = 10.0
    rows = instance_rows(labels, np.asarray([0.9, 0.5]), (1000.0, 100.0, 10.0), image=image)
    assert [r["id"] for r in rows] == [1, 2]
    assert rows[0]["z_nm"] == pytest.approx(500.0)
    assert rows[0]["y_nm"] == pytest.approx(50.0)
    assert rows[0]["x_nm"] == pytest.approx(10.0)
    assert rows[1]["y_nm"] == pytest.approx(300.0) and rows[1]["x_nm"] == pytest.approx(35.0)
    assert rows[0]["voxels"] == 2 and rows[0]["volume_um3"] == pytest.approx(2 * 1e6 / 1e9)
    assert rows[0]["mean_intensity"] == pytest.approx(3.0)
    assert rows[1]["mean_intensity"] == pytest.approx(10.0) and rows[1]["score"] == 0.5
    with pytest.raises(DataError, match="3 scores for 2 instances"):
        instance_rows(labels, np.zeros(3), (1.0, 1.0, 1.0), image=image)


def test_smoke_variant_runs_end_to_end_through_the_cli(tmp_path: pathlib.Path):
    workdir = tmp_path / "fluo"
    result = _run(f"--config={CONFIG}:smoke", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for name in ("metrics.json", "chosen.json", "instances.csv"):
        assert (workdir / name).is_file(), name
    for name in ("volume_histogram.png", "example_slices.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert any((workdir / "checkpoints" / "mask_rcnn").iterdir())
    assert (workdir / "checkpoints" / "mask_rcnn" / "intensity.json").is_file()
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["truth_instances"] > 0
    chosen = metrics["chosen_on_training_volume"]
    assert chosen["mask_rcnn"]["score_threshold"] == 0.0
    assert chosen["baseline"]["threshold"] == 0.5
    ours = open_volume(str(workdir / "predictions" / "mask_rcnn.zarr")).read()
    baseline = open_volume(str(workdir / "predictions" / "baseline.zarr")).read()
    assert ours.shape == baseline.shape == tuple(metrics["test_shape"])
    with open(workdir / "instances.csv") as stream:
        rows = list(csv.DictReader(stream))
    # One row per Mask R-CNN instance, ids 1..k; an untrained model at score
    # threshold 0 keeps some detections, so the table is not empty.
    assert len(rows) == int(ours.max()) > 0
    assert [int(r["id"]) for r in rows] == list(range(1, len(rows) + 1))
    for name, labels in (("mask_rcnn", ours), ("baseline", baseline)):
        scores = metrics[name]
        assert 0.0 <= scores["f1_50"] <= 1.0
        assert scores["instances"] == np.unique(labels[labels > 0]).size
        assert scores["merges"] >= 0 and scores["splits"] >= 0
