"""The EM instance pipeline on a user's volume (`synjax.pipelines.instance_volume`).

A smoke network trained for a few steps (at score threshold 0 its untrained
detections are kept, so there are instances) predicts a synthetic EM volume
written to zarr; the stored, resumable, block-wise path must give exactly
the labels and scores of the in-memory path (`detect_blocks` +
`fuse_detections` on the whole read-grid image) and the table of
`instance_rows` on them.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from synjax import pipelines
from synjax.data.intensity import normalize_intensity
from synjax.data.synthetic import make_em_volume
from synjax.errors import DataError
from synjax.inference.instance_blocks import detect_blocks, fuse_detections
from synjax.io import create_volume, open_volume
from synjax.io.instance_table import instance_rows
from synjax.pipelines.instance_data import downsample
from synjax.pipelines.instances import chosen_painting, drop_small
from synjax.stages import instance_unet
from tests.conftest import smoke_config

RESOLUTION = (40.0, 8.0, 8.0)


def _config():
    return smoke_config("vnc")


@pytest.fixture(autouse=True)
def _fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="module")
def trained(vnc_smoke_workdir):
    """A workdir with the smoke network and baseline trained and their settings chosen."""
    return vnc_smoke_workdir


def _user_volume(path, shape, seed=7):
    raw = make_em_volume(shape=shape, resolution=RESOLUTION, seed=seed, n_synapses=3).raw
    volume = create_volume(str(path), raw.shape, raw.dtype, resolution=RESOLUTION)
    volume[...] = raw
    return str(path), raw


def _in_memory(config, workdir, raw):
    """Labels and scores of the in-memory path on the whole read-grid image."""
    factors = tuple(config.data.downsample)
    cut = tuple(n - n % f for n, f in zip(raw.shape, factors, strict=True))
    image, _ = downsample(raw[: cut[0], : cut[1], : cut[2]], np.zeros(cut, np.uint8), factors)
    network = instance_unet.load_instance_unet(config, workdir)
    image = normalize_intensity(image, network.intensity, "test")
    found = detect_blocks(
        instance_unet.block_detector(config, network.params),
        image,
        tuple(config.predict.block),
        tuple(config.predict.overlap),
        int(config.predict.batch_size),
    )
    chosen = json.loads((workdir / "chosen.json").read_text())["instance_unet"]
    return fuse_detections(found, chosen_painting(chosen), float(config.predict.fusion_iou))


def test_user_volume_equals_the_in_memory_path_and_resumes(trained, tmp_path, caplog):
    config = _config()
    # y and x not multiples of the (1, 2, 2) cells or of the blocks: the last
    # native row and column are left out, the last blocks shifted back.
    path, raw = _user_volume(tmp_path / "user.zarr", (9, 75, 41))
    config.mode = "predict"
    config.predict.input = path
    config.predict.output = str(tmp_path / "out")
    pipelines.run(config, trained)

    labels = open_volume(str(tmp_path / "out" / "instances.zarr"))
    expected, scores = _in_memory(config, trained, raw)
    assert labels.shape == expected.shape == (9, 37, 20)
    assert expected.max() > 0
    np.testing.assert_array_equal(labels.read(), expected)
    # The network's grid: the input's voxel size times the (1, 2, 2) cells.
    assert labels.resolution == (40.0, 16.0, 16.0)
    rows = (tmp_path / "out" / "instances.csv").read_text().splitlines()
    want = instance_rows(expected, scores, (40.0, 16.0, 16.0))
    assert len(rows) == len(want) + 1
    for line, row in zip(rows[1:], want, strict=True):
        values = [float(v) for v in line.split(",")]
        np.testing.assert_allclose(
            values, [row[c] for c in ("id", "z_nm", "y_nm", "x_nm", "voxels", "score")], rtol=1e-5
        )

    # A second run reuses every painted block and writes the same labels.
    caplog.set_level("INFO")
    pipelines.run(config, trained)
    assert "were painted before: reused" in caplog.text
    np.testing.assert_array_equal(
        open_volume(str(tmp_path / "out" / "instances.zarr")).read(), expected
    )


def test_user_volume_region_offset_and_missing_training(trained, tmp_path):
    config = _config()
    path, raw = _user_volume(tmp_path / "user.zarr", (8, 64, 48))
    config.mode = "predict"
    config.predict.input = path
    config.predict.output = str(tmp_path / "out")
    config.predict.roi = "2:8,16:64,:"
    pipelines.run(config, trained)
    labels = open_volume(str(tmp_path / "out" / "instances.zarr"))
    expected, _ = _in_memory(config, trained, raw[2:8, 16:64, :])
    np.testing.assert_array_equal(labels.read(), expected)
    # The region's corner, in nm of the input.
    assert labels.offset == (80.0, 128.0, 0.0)

    with pytest.raises(DataError, match=r"chosen.json is missing: train in this workdir first"):
        pipelines.run(config, tmp_path / "empty_run")


def test_user_volume_drops_instances_under_the_chosen_size(trained, tmp_path):
    config = _config()
    path, raw = _user_volume(tmp_path / "user.zarr", (8, 64, 48))
    expected, scores = _in_memory(config, trained, raw)
    sizes = np.bincount(expected.ravel())[1:]
    assert sizes.size >= 2 and sizes.min() < sizes.max()
    min_size = int(np.median(sizes)) + 1
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    chosen = json.loads((run / "chosen.json").read_text())
    chosen["instance_unet"]["min_size"] = min_size
    (run / "chosen.json").write_text(json.dumps(chosen))
    config.mode = "predict"
    config.predict.input = path
    config.predict.output = str(tmp_path / "out")
    pipelines.run(config, run)
    kept, kept_scores = drop_small(expected, scores, min_size)
    assert 0 < kept.max() < expected.max()
    np.testing.assert_array_equal(
        open_volume(str(tmp_path / "out" / "instances.zarr")).read(), kept
    )
    rows = (tmp_path / "out" / "instances.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, int(kept.max()) + 1))
    np.testing.assert_allclose([float(r.split(",")[-1]) for r in rows], kept_scores, rtol=1e-5)
    assert min(int(r.split(",")[4]) for r in rows) >= min_size
