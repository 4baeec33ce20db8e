"""The fluorescence pipeline on a user's volume (`synjax.pipelines.fluorescence_volume`).

A smoke Mask R-CNN trained for a few steps (at the smoke's score threshold 0
its untrained detections are kept, many of them copies across the
overlapping patches) predicts a synthetic puncta volume written to zarr. The
stored, resumable, block-wise path must give exactly the labels of the
in-memory path (`detect_volume` + `merge_detections` on the whole region) and
the table of `instance_rows` on them, at block sizes that divide the volume
and that do not (smaller than a patch, too), on a region, and after a run that
stopped part-way.
"""

import csv

import jax
import numpy as np
import pytest

from synjax import pipelines
from synjax.errors import ConfigError, DataError, SynjaxError
from synjax.inference.instances import merge_detections
from synjax.io import create_volume, open_volume
from synjax.io.instance_table import instance_rows
from synjax.pipelines import config_checks, fluorescence, fluorescence_volume
from synjax.stages import mask_rcnn
from tests.conftest import smoke_config

# The user's volume: 12 patches of the smoke's (16, 64, 64) at overlap (8, 34, 34):
# starts 0, 30, 60, 64 in y and 0, 30, 32 in x.
SHAPE = (16, 128, 96)
OFFSET = (3000.0, 960.0, 0.0)


def _config():
    return smoke_config("fluorescence")


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def trained(fluorescence_smoke_workdir):
    """A workdir with the smoke Mask R-CNN (and baseline) trained and the threshold chosen."""
    return fluorescence_smoke_workdir


@pytest.fixture(scope="module")
def user_volume(tmp_path_factory):
    """(zarr path, raw image) of a synthetic puncta volume from another seed than training's."""
    config = _config()
    config.data.test_shape = SHAPE
    config.data.test_seed = 5
    image, _ = fluorescence.synthetic_volume(config, "test")
    path = tmp_path_factory.mktemp("user") / "puncta.zarr"
    resolution = tuple(config.data.resolution)
    volume = create_volume(
        str(path), image.shape, image.dtype, resolution=resolution, offset=OFFSET
    )
    volume[...] = image
    return str(path), image


def _in_memory(config, workdir, image):
    """(labels, scores, detections) of the in-memory path on `image`."""
    network = mask_rcnn.load_mask_rcnn(config, workdir)
    detections = mask_rcnn.detect_volume(config, network, image)
    threshold = 0.0  # the smoke's only candidate (config.predict.score_thresholds)
    merged = merge_detections(detections, threshold, int(config.predict.min_overlap))
    return merged.labels, merged.scores, detections


@pytest.fixture(scope="module")
def expected(trained, user_volume):
    return _in_memory(_config(), trained, user_volume[1])


def _predict(config, workdir, path, out, block, roi=""):
    config.mode = "predict"
    config.predict.input = path
    config.predict.output = str(out)
    config.predict.block = block
    config.predict.roi = roi
    pipelines.run(config, workdir)
    return open_volume(str(out / "instances.zarr"))


def _table(path):
    with open(path) as stream:
        return list(csv.DictReader(stream))


def test_the_in_memory_prediction_merges_copies(expected):
    labels, scores, detections = expected
    # The test means something only where there are instances and copies to merge.
    assert labels.max() >= 2
    assert detections.scores.size > labels.max()
    assert scores.shape == (labels.max(),)


@pytest.mark.parametrize(
    "block",
    [
        (16, 64, 48),  # divides the volume
        (8, 40, 40),  # does not, and is smaller than a patch
    ],
)
def test_user_volume_equals_the_in_memory_prediction(
    trained, user_volume, expected, tmp_path, block
):
    path, image = user_volume
    labels, scores, _ = expected
    config = _config()
    out = tmp_path / "out"
    predicted = _predict(config, trained, path, out, block)
    np.testing.assert_array_equal(predicted.read(), labels)
    assert predicted.resolution == tuple(config.data.resolution)
    assert predicted.offset == OFFSET
    rows = _table(out / "instances.csv")
    want = instance_rows(labels, scores, tuple(config.data.resolution), OFFSET, image=image)
    assert [int(r["id"]) for r in rows] == [w["id"] for w in want]
    for row, w in zip(rows, want, strict=True):
        for column in fluorescence.TABLE_COLUMNS:
            assert float(row[column]) == pytest.approx(w[column], rel=1e-5), column


def test_user_volume_region(trained, user_volume, tmp_path):
    path, image = user_volume
    config = _config()
    # 14 planes: fewer than the patch's 16, so the patches are padded at the end.
    predicted = _predict(config, trained, path, tmp_path / "out", (16, 64, 48), roi="2:16,20:,:90")
    labels, scores, _ = _in_memory(config, trained, image[2:16, 20:, :90])
    assert labels.max() >= 1
    np.testing.assert_array_equal(predicted.read(), labels)
    resolution = tuple(config.data.resolution)
    # The region's corner, in nm of the input.
    corner = (OFFSET[0] + 2 * resolution[0], OFFSET[1] + 20 * resolution[1], OFFSET[2])
    assert predicted.offset == pytest.approx(corner)
    rows = _table(tmp_path / "out" / "instances.csv")
    want = instance_rows(labels, scores, resolution, corner)
    assert [float(r["z_nm"]) for r in rows] == pytest.approx([w["z_nm"] for w in want], rel=1e-5)


def test_resume_after_a_failing_block_computes_only_the_missing_ones(
    trained, user_volume, expected, tmp_path, monkeypatch, caplog
):
    path, _ = user_volume
    detect = fluorescence_volume.detect_block
    calls: list[int] = []

    def failing(detector, source, intensity, plan, block_id, threshold, batch):
        calls.append(block_id)
        if block_id == 2:
            raise RuntimeError("disk on fire")
        return detect(detector, source, intensity, plan, block_id, threshold, batch)

    monkeypatch.setattr(fluorescence_volume, "detect_block", failing)
    config = _config()
    out = tmp_path / "out"
    # Grid 1 x 2 x 2: blocks 0 and 1 are stored before block 2 fails all three tries.
    with pytest.raises(DataError, match=r"Mask R-CNN block 2 .* failed after 3 tries: .*fire"):
        _predict(config, trained, path, out, (16, 64, 48))
    assert calls == [0, 1, 2, 2, 2]

    calls.clear()
    monkeypatch.setattr(
        fluorescence_volume,
        "detect_block",
        lambda *args: calls.append(args[4]) or detect(*args),
    )
    predicted = _predict(_config(), trained, path, out, (16, 64, 48))
    assert calls == [2, 3]
    np.testing.assert_array_equal(predicted.read(), expected[0])

    # Everything done: a third run detects nothing and writes the same labels.
    calls.clear()
    caplog.set_level("INFO")
    predicted = _predict(_config(), trained, path, out, (16, 64, 48))
    assert calls == []
    assert "were detected before: reused" in caplog.text
    np.testing.assert_array_equal(predicted.read(), expected[0])

    # A stored block lost behind the done-state's back: one line naming it, no silent gap.
    (out / "mask_rcnn_detections" / "block_1.npz").unlink()
    with pytest.raises(DataError, match=r"block_1.npz: a block recorded as done cannot be read"):
        _predict(_config(), trained, path, out, (16, 64, 48))


def test_a_changed_threshold_detects_every_block_again(
    trained, user_volume, expected, tmp_path, monkeypatch
):
    path, _ = user_volume
    out = tmp_path / "out"
    _predict(_config(), trained, path, out, (16, 64, 48))
    detect = fluorescence_volume.detect_block
    calls: list[int] = []
    monkeypatch.setattr(
        fluorescence_volume,
        "detect_block",
        lambda *args: calls.append(args[4]) or detect(*args),
    )
    # As if the training run had chosen another threshold: the stored blocks are stale.
    scores = expected[2].scores
    threshold = float(np.median(scores))
    monkeypatch.setattr(fluorescence_volume, "_chosen_threshold", lambda workdir: threshold)
    predicted = _predict(_config(), trained, path, out, (16, 64, 48))
    assert calls == [0, 1, 2, 3]
    want = merge_detections(expected[2], threshold, int(_config().predict.min_overlap)).labels
    assert 0 < want.max() < expected[0].max()
    np.testing.assert_array_equal(predicted.read(), want)


def test_keep_one_per_group_is_the_merge_on_its_links():
    import scipy.sparse

    from synjax.inference.merge import keep_one_per_group, mask_overlaps, mask_sizes, merge_masks

    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 40, size=60)
    rows = np.concatenate([rng.choice(300, n, replace=False) for n in sizes])
    columns = np.repeat(np.arange(sizes.size), sizes)
    masks = scipy.sparse.csc_matrix(
        (np.ones(rows.size, bool), (rows, columns)), shape=(300, sizes.size)
    )
    first, second, _ = mask_overlaps(masks, 3)
    kept = keep_one_per_group(mask_sizes(masks), first, second)
    np.testing.assert_array_equal(kept, merge_masks(masks, 3))
    # Not every mask survives, nor only one: the rounds had something to decide.
    assert 1 < kept.size < sizes.size


def test_cells_reached_by_patches_by_hand():
    from synjax.inference.block_grid import BlockGrid

    # x: patches of 8 starting every 5 (starts 0, 5, 10, 12) in cells of 4 voxels.
    plan = fluorescence_volume.PatchPlan(
        (1, 1, 20), (1, 1, 8), (0, 0, 3), BlockGrid((1, 1, 20), (1, 1, 4))
    )
    assert [list(s) for s in plan.starts] == [[0], [0], [0, 5, 10, 12]]
    # Cell 3 (voxels 12..15) holds the patch starting at 12; cell 2 (8..11) the one at 10.
    np.testing.assert_array_equal(plan.patches_of(3)[0], [3])
    np.testing.assert_array_equal(plan.patches_of(2)[1], [[0, 0, 10]])
    assert plan.patches_of(4)[0].size == 0
    # A patch starting in cell j covers up to (j + 1) * 4 - 1 + 8: cells j..j + 2 (ceil(7 / 4) = 2).
    assert plan.blocks_reaching(3) == [1, 2, 3]
    assert plan.blocks_reaching(1) == [0, 1]


def test_bad_inputs_are_one_line_errors(trained, user_volume, tmp_path):
    path, _ = user_volume
    cases = [
        (tmp_path / "empty_run", path, "", DataError, r"chosen.json is missing: train"),
        (trained, str(tmp_path / "nowhere.zarr"), "", DataError, r"config.predict.input="),
        (trained, path, "0:4,0:8", ConfigError, r"config.predict.roi='0:4,0:8': expected three"),
        (trained, path, "0:4,0:200,:", DataError, r"leaves the input volume"),
    ]
    for workdir, source, roi, error, message in cases:
        config = _config()
        with pytest.raises(error, match=message) as caught:
            _predict(config, workdir, source, tmp_path / "out", (16, 64, 64), roi=roi)
        assert "\n" not in str(caught.value)
    # Trained settings without a network: the checkpoint is named.
    run = tmp_path / "no_network"
    run.mkdir()
    (run / "chosen.json").write_text((trained / "chosen.json").read_text())
    with pytest.raises(SynjaxError, match=r"no checkpoints for model 'mask_rcnn'"):
        _predict(_config(), run, path, tmp_path / "out", (16, 64, 64))


def test_config_checks_name_the_block_and_a_missing_output():
    config = _config()
    config.predict.block = (0, 64, 64)
    with pytest.raises(ConfigError, match=r"config.predict.block"):
        config_checks.check_config(config)
    config = _config()
    config.predict.input = "x.zarr"
    with pytest.raises(ConfigError, match=r"config.predict.output is empty"):
        config_checks.check_config(config)
