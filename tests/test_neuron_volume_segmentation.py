"""The neuron pipeline on a user's volume, all the way to a segmentation, block by block.

A DeepEM3D net of the FIB-25 smoke config is trained for two steps (its
values do not matter) and its watershed parameters are written as a tuning
run would; predict mode on a zarr of random EM then writes the boundary map
and its block-wise segmentation. The segmentation is compared with the
whole-volume watershed and agglomeration (`watershed.segment`,
`agglomeration.agglomerate`) of the boundary map read back, with a halo that
covers the volume: the condition under which `segment_blockwise` is exact.
"""

import importlib.util
import json

import jax
import numpy as np
import pytest

from synjax import pipelines
from synjax.errors import ConfigError, DataError
from synjax.io import create_volume, layout, open_volume
from synjax.pipelines import neuron_volume, neurons, partner_volume
from synjax.postprocess.agglomeration import WEIGHT, agglomerate, region_graph
from synjax.postprocess.watershed import segment
from synjax.stages.boundary_models import BoundaryEnsembleStage
from tests.conftest import REPO_ROOT
from tests.test_segmentation_scores import _whole_array_scores

FIB25 = REPO_ROOT / "configs" / "fib25.py"
RESOLUTION = (10.0, 10.0, 10.0)
OFFSET = (100.0, 200.0, 300.0)  # nm: a multiple of the voxel size on each axis
SHAPE = (8, 32, 48)
# A halo of the volume's largest size: every block floods the whole volume.
WHOLE_HALO = max(SHAPE)
# Watershed parameters; the fixture adds the agglomeration threshold.
TUNED = {"sigma": 1.0, "h": 0.1}


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    # Module scope: set before the module's trained run, the slowest compilation here.
    jax.config.update("jax_disable_most_optimizations", True)


def _fib25_smoke():
    spec = importlib.util.spec_from_file_location("fib25_config", FIB25)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke")


def _write_tuned(config, workdir, chosen):
    """Stands for a tuning run: the parameters and the models they were tuned for."""
    (workdir / layout.WATERSHED_FILE).write_text(
        json.dumps(
            {neurons.OURS: chosen, "provenance": {"models": neurons._models(config, workdir)}}
        )
    )


@pytest.fixture(scope="module")
def neuron_run(tmp_path_factory):
    """A workdir with the smoke net trained for 2 steps, 'tuned', and a user's zarr volume."""
    workdir = tmp_path_factory.mktemp("neuron_run")
    config = _fib25_smoke()
    # One of the tests' 8 CPU devices: the smallest program to compile.
    config.train.update(batch_size=2, num_devices=1)
    config.predict.update(tta=False, orientations=("z",), slab_depth=4, progress=False)
    rng = np.random.default_rng(11)
    raw = rng.integers(0, 256, (8, 64, 64), dtype=np.uint8)
    labels = np.repeat(np.arange(4, dtype=np.uint32), 16)[None, None, :] * np.ones(
        (8, 64, 1), np.uint32
    )
    ensemble = BoundaryEnsembleStage.from_config(config)
    ensemble.train(raw, labels, workdir)
    user_raw = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    user = tmp_path_factory.mktemp("user") / "user.zarr"
    volume = create_volume(str(user), SHAPE, np.uint8, resolution=RESOLUTION, offset=OFFSET)
    volume[...] = user_raw
    # Thresholds between the weights of the watershed's contacts on this volume, so
    # that the agglomeration merges some segments and not all: the untrained net's
    # map is nearly flat (about 0.50 to 0.52), a grid like (0.3, 0.5) would merge none.
    boundary = ensemble.predict(workdir, user_raw, slice_lists=False)
    over = segment(boundary, TUNED["sigma"], TUNED["h"], smoothing=config.watershed.smoothing)
    weights = np.sort([w for *_, w in region_graph(over, boundary).edges(data=WEIGHT)])
    chosen = {**TUNED, "threshold": _between(weights, 0.5)}
    retuned = {**TUNED, "threshold": _between(weights, 0.25)}
    _write_tuned(config, workdir, chosen)
    config.mode = "predict"
    config.predict.update(input=str(user), roi="")
    return config, workdir, chosen, retuned


def _between(sorted_weights: np.ndarray, fraction: float) -> float:
    """Half-way between two neighbouring weights near the `fraction` quantile."""
    k = int(fraction * (len(sorted_weights) - 1))
    return float(sorted_weights[k] + sorted_weights[k + 1]) / 2


def _whole_volume_segmentation(boundary: np.ndarray, chosen: dict, smoothing: str) -> np.ndarray:
    over = segment(boundary, chosen["sigma"], chosen["h"], smoothing=smoothing)
    return over, agglomerate(over, boundary, chosen["threshold"])


def _same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """One-to-one label correspondence (0 stays 0)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def _predict(config, workdir, output, block, halo=WHOLE_HALO):
    config.predict.update(output=str(output), segment_block=block, segment_halo=halo)
    pipelines.run(config, workdir)
    return output / layout.VOLUME_SEGMENTATION


def test_segmentation_equals_the_whole_volume_watershed_for_two_block_sizes(neuron_run, tmp_path):
    config, workdir, chosen, _ = neuron_run
    output = tmp_path / "out"
    for block in ((4, 16, 16), (3, 20, 20)):  # the second divides no axis of (8, 32, 48)
        path = _predict(config, workdir, output, block)
        boundary = open_volume(str(output / layout.VOLUME_BOUNDARIES)).read()
        over, expected = _whole_volume_segmentation(boundary, chosen, config.watershed.smoothing)
        # The parameters make the check bite: several segments, and merges by the agglomeration.
        assert 1 < len(np.unique(expected)) < len(np.unique(over))
        got = open_volume(str(path))
        assert got.dtype == np.uint64
        assert tuple(got.resolution) == RESOLUTION and tuple(got.offset) == OFFSET
        assert _same_up_to_renumbering(got.read(), expected), block
        # One chunk per block: the blocks are written chunk-aligned.
        assert json.loads((path / ".zarray").read_text())["chunks"] == list(block)
        # No config.predict.groundtruth: nothing is scored.
        assert not (output / layout.METRICS_FILE).exists()


def test_a_finished_segmentation_is_reused_and_a_stale_one_made_afresh(
    neuron_run, tmp_path, monkeypatch
):
    config, workdir, chosen, retuned = neuron_run
    output = tmp_path / "out"
    calls = []
    real = neuron_volume.segment_blockwise

    def counting(*args, **kwargs):
        calls.append(kwargs["threshold"])
        return real(*args, **kwargs)

    monkeypatch.setattr(neuron_volume, "segment_blockwise", counting)
    first_threshold, second_threshold = chosen["threshold"], retuned["threshold"]
    path = _predict(config, workdir, output, (4, 16, 16))
    first = open_volume(str(path)).read()
    assert calls == [first_threshold]
    # Same boundary map, parameters and blocks: reused as it is.
    _predict(config, workdir, output, (4, 16, 16))
    assert calls == [first_threshold]
    # Another halo: made afresh (same labels here, the halo covering the volume either way).
    _predict(config, workdir, output, (4, 16, 16), halo=WHOLE_HALO + 1)
    assert calls == [first_threshold] * 2
    np.testing.assert_array_equal(open_volume(str(path)).read(), first)
    # Another tuned threshold: made afresh, and equal to the whole volume's with it.
    _write_tuned(config, workdir, retuned)
    try:
        _predict(config, workdir, output, (4, 16, 16), halo=WHOLE_HALO + 1)
    finally:
        _write_tuned(config, workdir, chosen)
    assert calls == [first_threshold] * 2 + [second_threshold]
    boundary = open_volume(str(output / layout.VOLUME_BOUNDARIES)).read()
    _, expected = _whole_volume_segmentation(boundary, retuned, config.watershed.smoothing)
    assert _same_up_to_renumbering(open_volume(str(path)).read(), expected)
    assert not _same_up_to_renumbering(first, expected)
    # A kill before the done-state was recorded: nothing counts as finished.
    (layout.blocks_manifest(path) / "header.json").unlink()
    _predict(config, workdir, output, (4, 16, 16), halo=WHOLE_HALO + 1)
    assert calls == [first_threshold] * 2 + [second_threshold, first_threshold]
    # Tuned without agglomeration: the watershed alone.
    _write_tuned(config, workdir, {**TUNED, "threshold": None})
    try:
        _predict(config, workdir, output, (4, 16, 16), halo=WHOLE_HALO + 1)
    finally:
        _write_tuned(config, workdir, chosen)
    assert calls[-1] is None
    over = segment(boundary, TUNED["sigma"], TUNED["h"], smoothing=config.watershed.smoothing)
    assert _same_up_to_renumbering(open_volume(str(path)).read(), over)


def test_the_state_shows_the_input_where_it_lies_and_the_segmentation(neuron_run, tmp_path):
    config, workdir, *_ = neuron_run
    output = tmp_path / "region"
    config.predict.roi = "2:8,0:32,16:48"
    try:
        _predict(config, workdir, output, (4, 16, 16))
    finally:
        config.predict.roi = ""
    state = json.loads((output / layout.NEUROGLANCER_STATE_FILE).read_text())
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert list(layers) == ["raw", "boundaries", "segmentation"]
    user = config.predict.input
    assert layers["raw"]["source"]["url"] == "zarr://file://" + user
    assert layers["segmentation"]["type"] == "segmentation"
    assert layers["segmentation"]["source"]["url"] == "zarr://file://" + str(
        output / layout.VOLUME_SEGMENTATION
    )
    # The input sits at its offset (100, 200, 300) nm = (10, 20, 30) voxels; the
    # region's outputs at that plus the region's start (2, 0, 16).
    translations = {
        name: [row[-1] for row in layer["source"]["transform"]["matrix"]]
        for name, layer in layers.items()
    }
    assert translations == {
        "raw": [10.0, 20.0, 30.0],
        "boundaries": [12.0, 20.0, 46.0],
        "segmentation": [12.0, 20.0, 46.0],
    }
    # The view starts at the region's centre, x-y-z: 46 + 32/2, 20 + 32/2, 12 + 6/2.
    assert state["position"] == [62.0, 36.0, 15.0]
    # Nothing was copied: no raw next to the outputs, none in the workdir.
    assert sorted(p.name for p in output.iterdir() if "raw" in p.name) == []
    assert not (workdir / layout.VIEW_RAW).exists()
    neuroglancer = pytest.importorskip("neuroglancer")
    parsed = neuroglancer.ViewerState(state)
    assert [layer.name for layer in parsed.layers] == ["raw", "boundaries", "segmentation"]


def _write_labels(path, labels, resolution=RESOLUTION, offset=OFFSET, dtype=np.uint32):
    volume = create_volume(str(path), labels.shape, dtype, resolution=resolution, offset=offset)
    volume[...] = labels.astype(dtype)
    return str(path)


def _predict_scored(config, workdir, output, groundtruth, roi=""):
    config.predict.update(groundtruth=groundtruth, roi=roi)
    try:
        return _predict(config, workdir, output, (4, 16, 16))
    finally:
        config.predict.update(groundtruth=None, roi="")


def test_groundtruth_scores_the_segmentation_block_by_block(neuron_run, tmp_path):
    config, workdir, *_ = neuron_run
    rng = np.random.default_rng(3)
    # Coarse bodies (8-voxel cubes, so pairs agree and disagree), 0 ignored on a corner.
    labels = rng.integers(1, 6, (1, 4, 6)).repeat(8, 0).repeat(8, 1).repeat(8, 2)[:, :32, :48]
    labels[:2, :8, :8] = 0
    output = tmp_path / "whole"
    path = _predict_scored(config, workdir, output, _write_labels(tmp_path / "gt.zarr", labels))
    metrics = json.loads((output / layout.METRICS_FILE).read_text())
    seg = open_volume(str(path)).read()
    expected = _whole_array_scores(seg, labels)
    assert 0.05 < expected["adapted_rand_error"] < 0.95
    assert metrics[neurons.OURS].keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[neurons.OURS][key] == pytest.approx(value, abs=1e-12, rel=0), key
    assert metrics["groundtruth"] == str(tmp_path / "gt.zarr")
    assert metrics["shape"] == list(SHAPE)

    # A region of the input, scored against labels of the whole input (cut to the region)
    # and against labels of the region alone: the same figures, those of the region's crop.
    roi, crop = "2:8,0:32,16:48", (slice(2, 8), slice(0, 32), slice(16, 48))
    region_offset = (120.0, 200.0, 460.0)  # OFFSET + (2, 0, 16) voxels of 10 nm
    sources = {
        "input's frame": _write_labels(tmp_path / "gt_input.zarr", labels),
        "region's frame": _write_labels(
            tmp_path / "gt_region.zarr", labels[crop], offset=region_offset
        ),
    }
    for frame, source in sources.items():
        output = tmp_path / frame.replace(" ", "_").replace("'", "")
        path = _predict_scored(config, workdir, output, source, roi=roi)
        metrics = json.loads((output / layout.METRICS_FILE).read_text())
        expected = _whole_array_scores(open_volume(str(path)).read(), labels[crop])
        for key, value in expected.items():
            assert metrics[neurons.OURS][key] == pytest.approx(value, abs=1e-12, rel=0), frame


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda d: str(d / "absent.zarr"), "config.predict.groundtruth="),
        (
            lambda d: _write_labels(d / "small.zarr", np.ones((8, 32, 40))),
            "has shape (8, 32, 40): expected the predicted region's (8, 32, 48)",
        ),
        (
            lambda d: _write_labels(d / "float.zarr", np.ones(SHAPE), dtype=np.float32),
            "dtype float32, expected integer labels",
        ),
        (
            lambda d: _write_labels(d / "coarse.zarr", np.ones(SHAPE), resolution=(20, 20, 20)),
            "voxel size (20.0, 20.0, 20.0) nm, expected the input's (10.0, 10.0, 10.0)",
        ),
        (
            lambda d: _write_labels(d / "moved.zarr", np.ones(SHAPE), offset=(0, 0, 10)),
            "offset (0.0, 0.0, 10.0) nm, expected (100.0, 200.0, 300.0)",
        ),
    ],
    ids=["absent", "shape", "dtype", "resolution", "offset"],
)
def test_bad_groundtruth_is_a_one_line_error_before_prediction(
    neuron_run, tmp_path, make, expected
):
    config, workdir, *_ = neuron_run
    output = tmp_path / "out"
    with pytest.raises(DataError) as error:
        _predict_scored(config, workdir, output, make(tmp_path))
    message = str(error.value)
    assert expected in message and "config.predict.groundtruth=" in message
    assert "\n" not in message
    # Nothing was predicted: the error comes before the network runs.
    assert not (output / layout.VOLUME_BOUNDARIES).exists()


def test_groundtruth_without_an_input_is_a_config_error():
    from synjax.pipelines import config_checks

    config = _fib25_smoke()
    config.mode = "predict"
    config.predict.groundtruth = "/data/labels.zarr"
    with pytest.raises(
        ConfigError, match="config.predict.groundtruth=.* without config.predict.input"
    ):
        config_checks.check_config(config)


def test_the_own_volume_output_names_agree():
    assert neuron_volume.BOUNDARIES_OUTPUT == layout.VOLUME_BOUNDARIES
    assert neuron_volume.SEGMENTATION_OUTPUT == layout.VOLUME_SEGMENTATION
    assert partner_volume.PROXIMITY_OUTPUT == layout.VOLUME_PROXIMITY


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("segment_halo", 0, "config.predict.segment_halo=0: expected"),
        ("segment_block", (4, 4), "config.predict.segment_block=(4, 4): expected 3 integers"),
        ("segment_block", (4, 0, 4), "expected 3 integers >= 1"),
    ],
)
def test_config_checks_of_the_segmentation_keys(key, value, expected):
    from synjax.pipelines import config_checks

    config = _fib25_smoke()
    config.mode = "predict"
    config.predict[key] = value
    with pytest.raises(ConfigError) as error:
        config_checks.check_config(config)
    assert expected in str(error.value)
