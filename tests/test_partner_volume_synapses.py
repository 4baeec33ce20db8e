"""A user's volume through the partner pipeline to a synapse table, block by block.

`postprocess.blockwise_candidates` against the whole-volume
`candidates.generate_candidates` (same rows, reads no larger than a block),
and `pipelines.partner_volume` against the whole-volume functions applied to
the proximity it wrote: candidates, pruner scores, duplicate suppression and
the tuned threshold, at two candidate block sizes.
"""

import importlib.util
import json

import jax
import numpy as np
import pytest
import scipy.ndimage as ndi

from synjax import pipelines
from synjax.errors import DataError
from synjax.geometry import Box
from synjax.io import SynapseTable, create_volume, open_volume
from synjax.pipelines import neuron_volume, partner_data, partners
from synjax.postprocess.blockwise_candidates import (
    generate_candidates_blockwise,
    site_surface_near,
)
from synjax.postprocess.candidates import generate_candidates
from synjax.postprocess.partner_nms import suppress_duplicates
from synjax.stages import proximity, pruner
from synjax.stages.proximity import ProximityStage
from synjax.stages.pruner import PrunerStage
from tests.conftest import REPO_ROOT

CANDIDATE_FIELDS = (
    "pre_component",
    "pre_segment",
    "post_component",
    "post_segment",
    "pre_overlap",
    "post_overlap",
    "pre_point",
    "post_point",
    "gap_nm",
    "location",
)


def _demo_smoke():
    path = REPO_ROOT / "configs" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke")


def _small_config():
    config = _demo_smoke()
    config.data.shape = (12, 96, 96)
    config.data.n_synapses = 3
    return config


# ------------------------------------------------------------ library level


class _CountingReads:
    """A volume that records the number of voxels of each read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.largest = 0

    def __getitem__(self, key):
        out = self.array[key]
        self.largest = max(self.largest, out.size)
        return out

    def __setitem__(self, key, value):
        self.largest = max(self.largest, np.size(value))
        self.array[key] = value


@pytest.fixture(scope="module")
def synthetic_sites():
    """The signed-proximity target of a synthetic volume (plus noise) and its neurons."""
    config = _small_config()
    volume = partner_data.load_volume(config, "test")
    target = partner_data.proximity_targets(volume, config)["target"]
    noise = np.random.default_rng(0).normal(0.0, 0.05, target.shape)
    return (target + noise).astype(np.float32), volume.neuron_ids, volume.resolution


@pytest.mark.parametrize("block", [(4, 32, 32), (5, 37, 29)])
def test_blockwise_candidates_equal_the_whole_volume(synthetic_sites, block):
    prox, segmentation, resolution = synthetic_sites
    whole = generate_candidates(prox, segmentation, resolution, tau=0.3, omega=20)
    assert len(whole) >= 3  # the comparison has rows to compare
    volumes = [_CountingReads(a) for a in (prox, segmentation)]
    sites = [_CountingReads(np.zeros(prox.shape, np.uint64)) for _ in range(2)]
    got = generate_candidates_blockwise(
        *volumes, resolution, *sites, block, tau=0.3, omega=20, progress=False
    )
    for field in CANDIDATE_FIELDS:
        np.testing.assert_array_equal(getattr(got, field), getattr(whole, field), err_msg=field)
    np.testing.assert_allclose(got.score, whole.score, rtol=1e-9)
    # The labels written are the whole volume's components, ids included.
    assert np.array_equal(sites[0].array, ndi.label(prox > 0.3, np.ones((3, 3, 3)))[0])
    assert np.array_equal(sites[1].array, ndi.label(prox < -0.3, np.ones((3, 3, 3)))[0])
    # The proximity is read a block at a time; the labels and the segmentation
    # also a block grown by one voxel, or a component's box grown by one voxel
    # (the surroundings of a site, for its surface).
    assert volumes[0].largest == np.prod(block)
    boxes = [
        np.prod([s.stop - s.start + 2 for s in box])
        for labels in sites
        for box in ndi.find_objects(labels.array.astype(np.int64))
    ]
    bound = max(np.prod(np.asarray(block) + 1), max(boxes))
    assert max(v.largest for v in volumes + sites) <= bound < prox.size


def test_site_surface_near_by_hand():
    # A 3x3x3 site in a 5x5x5 volume, and one cut by the volume's low z edge.
    components = np.zeros((5, 5, 5), np.uint64)
    components[1:4, 1:4, 1:4] = 7
    segmentation = np.ones((5, 5, 5), np.uint64)
    cube = Box((1, 1, 1), (4, 4, 4))
    surface = site_surface_near(components, segmentation, 7, 1, cube, Box.from_shape((5, 5, 5)))
    expected = [(z, y, x) for z in (1, 2, 3) for y in (1, 2, 3) for x in (1, 2, 3)]
    expected.remove((2, 2, 2))  # the only voxel with all six neighbours inside
    assert [tuple(v) for v in surface] == expected
    # Only what lies in `near` comes back, still in raster order; (2, 2, 2) is
    # inside although `near` ends next to it (its neighbours are read anyway).
    near = Box((2, 2, 0), (3, 3, 3))
    got = site_surface_near(components, segmentation, 7, 1, cube, near)
    assert [tuple(v) for v in got] == [(2, 2, 1)]
    # Another segment cuts the site: the voxels next to it become surface.
    segmentation[2, 2, 3] = 5
    got = site_surface_near(components, segmentation, 7, 1, cube, Box.from_shape((5, 5, 5)))
    assert (2, 2, 2) in [tuple(v) for v in got] and (2, 2, 3) not in [tuple(v) for v in got]
    # The volume's edge is outside every site.
    edge = np.zeros((3, 5, 5), np.uint64)
    edge[0:3, 1:4, 1:4] = 2
    got = site_surface_near(
        edge, np.ones_like(edge), 2, 1, Box((0, 1, 1), (3, 4, 4)), Box.from_shape(edge.shape)
    )
    assert len(got) == 27 - 1 and (1, 2, 2) not in [tuple(v) for v in got]


# ------------------------------------------------------------ pipeline level


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A workdir with a U-Net and a pruner trained for 2 steps each, and a user volume.

    The raw is a pattern of bright and dark blobs, on which the barely trained
    U-Net swings both ways, so that the proximity has pre and post sites.
    """
    jax.config.update("jax_disable_most_optimizations", True)
    workdir = tmp_path_factory.mktemp("partner_run")
    config = _small_config()
    config.train.update(steps=2, warmup_steps=1, log_every=1, checkpoint_every=2, batch_size=8)
    config.unet.train_output = (4, 16, 16)
    config.unet.predict_output = (4, 32, 32)
    config.unet.predict_context = (2, 16, 16)
    config.pruner.train.update(steps=2, batch_size=8, log_every=1, checkpoint_every=2)
    config.pruner.train.num_devices = 1
    config.candidates.update(tau=0.05, omega=20)
    volume = partner_data.load_volume(config, "train")
    targets = partner_data.proximity_targets(volume, config)
    unet = ProximityStage.from_config(config).train([targets], workdir)
    found = generate_candidates(
        targets["target"], volume.neuron_ids, volume.resolution, tau=0.3, omega=20
    )
    labels = np.arange(len(found)) % 2 == 0
    trained_pruner = PrunerStage.from_config(config).train(
        volume.raw, targets["target"], volume.neuron_ids, found, labels, workdir
    )
    provenance = {
        "proximity": partners._model(workdir, proximity.MODEL_NAME, unet),
        "pruner": partners._model(workdir, pruner.MODEL_NAME, trained_pruner),
    }
    rng = np.random.default_rng(0)
    test = partner_data.load_volume(config, "test")
    raw = (ndi.gaussian_filter(rng.normal(size=test.raw.shape), (0.5, 4, 4)) > 0) * 255
    return config, workdir, provenance, raw.astype(np.uint8), test.neuron_ids, test.resolution


def _write_threshold(workdir, threshold, provenance):
    choice = {"pruner": True, "threshold": threshold, "provenance": provenance}
    (workdir / "pruner_threshold.json").write_text(json.dumps(choice))


def _expected_tables(config, workdir, out, raw, segmentation, resolution, offset, threshold):
    """Candidates, detections and kept rows: whole-volume functions on the written proximity."""
    prox = open_volume(str(out / "proximity.zarr")).read()
    c = config.candidates
    found = generate_candidates(
        prox, segmentation, resolution, tau=c.tau, omega=c.omega, max_gap_nm=c.max_gap_nm
    )
    stage = PrunerStage.from_config(config)
    scores = stage.score(stage.load(workdir), raw, prox, segmentation, found)
    res, off = np.asarray(resolution), np.asarray(offset)
    every = SynapseTable.build(
        found.pre_segment,
        found.post_segment,
        (found.pre_point + found.post_point) / 2 * res + off,
        pre_location=found.pre_point * res + off,
        post_location=found.post_point * res + off,
        score=scores,
        size=found.pre_overlap + found.post_overlap,
    )
    keep = suppress_duplicates(
        every.pre_segment, every.post_segment, every.location, every.score, c.nms_radius_nm
    )
    detections = every.select(keep)
    return every, detections, detections.select(detections.score >= threshold)


def _assert_same_table(got: SynapseTable, expected: SynapseTable):
    assert len(got) == len(expected)
    np.testing.assert_array_equal(got.pre_segment, expected.pre_segment)
    np.testing.assert_array_equal(got.post_segment, expected.post_segment)
    np.testing.assert_array_equal(got.size, expected.size)
    for column in ("location", "pre_location", "post_location"):
        np.testing.assert_allclose(getattr(got, column), getattr(expected, column), rtol=1e-12)
    np.testing.assert_allclose(got.score, expected.score, rtol=1e-5, atol=1e-6)


def test_user_volume_synapse_table_equals_the_whole_volume_functions(trained_run, tmp_path):
    config, workdir, provenance, raw, segmentation, resolution = trained_run
    input_offset = (400.0, 40.0, 80.0)
    source = create_volume(
        str(tmp_path / "user.zarr"), raw.shape, raw.dtype, resolution, input_offset
    )
    source[...] = raw
    seg_path = tmp_path / "neurons.zarr"
    create_volume(str(seg_path), segmentation.shape, np.uint64, resolution)[...] = segmentation
    roi = (slice(2, 12), slice(8, 96), slice(0, 90))
    # Voxel (0, 0, 0) of the region lies at the input's offset plus 2 z and 8 y voxels.
    region_offset = (400.0 + 2 * 40.0, 40.0 + 8 * 4.0, 80.0)
    config.mode = "predict"
    config.predict.update(
        input=str(tmp_path / "user.zarr"),
        output=str(tmp_path / "out"),
        roi="2:12,8:96,0:90",
        segmentation=str(seg_path),
    )
    out = tmp_path / "out"
    # (4, 32, 32) does not divide the region (10, 88, 90); (5, 44, 45) does.
    thresholds = {}
    for block in [(4, 32, 32), (5, 44, 45)]:
        config.predict.candidate_block = block
        threshold = thresholds.get("median", 0.0)
        _write_threshold(workdir, threshold, provenance)
        pipelines.run(config, workdir)
        expected = _expected_tables(
            config, workdir, out, raw[roi], segmentation[roi], resolution, region_offset, threshold
        )
        every, detections, kept = expected
        assert len(detections) >= 3 and len(every) > len(detections)  # NMS removed some
        for name, table in zip(("candidates", "detections", "synapses"), expected, strict=True):
            _assert_same_table(SynapseTable.from_csv(out / f"{name}.csv"), table)
        # The second run keeps about half: the threshold is not vacuous there.
        thresholds["median"] = float(np.median(detections.score))
    assert 0 < len(kept) < len(detections)
    # The run's neuroglancer state: the input and the segmentation where they
    # lie, both placed at the input's offset of (400, 40, 80) nm over (40, 4, 4)
    # nm voxels; the outputs at the region's; the synapse table's rows.
    state = json.loads((out / "neuroglancer_state.json").read_text())
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert list(layers) == [
        "raw",
        "proximity",
        "segmentation",
        "pre sites",
        "post sites",
        "synapses",
    ]
    assert layers["segmentation"]["source"]["url"] == f"zarr://file://{seg_path}"
    assert layers["segmentation"]["source"]["transform"]["matrix"] == [
        [1, 0, 0, 10],
        [0, 1, 0, 10],
        [0, 0, 1, 20],
    ]
    assert layers["pre sites"]["source"]["url"] == f"zarr://file://{out / 'pre_sites.zarr'}"
    _assert_annotations_are_the_table(layers, out, resolution, {"segmentation": segmentation})


def _translation_nm(layer, resolution):
    """A zarr layer's offset in nm (z-y-x): its transform's last column times the voxel size."""
    matrix = layer["source"]["transform"].get("matrix")
    if matrix is None:
        return np.zeros(3)
    return np.array([row[-1] for row in matrix]) * np.asarray(resolution)


def _label_at(layer, array, resolution, point_xyz):
    """The label of `array` (shown by `layer`) at the neuroglancer point `point_xyz` (nm)."""
    zyx = np.asarray(point_xyz[::-1]) - _translation_nm(layer, resolution)
    return array[tuple(np.floor(zyx / np.asarray(resolution)).astype(int))]


def _assert_annotations_are_the_table(layers, out, resolution, arrays):
    """The annotation layer holds synapses.csv's rows, pre and post on the layers' labels.

    Each row's pre point lies in a voxel of a pre site and of its pre segment,
    the post point likewise, when looked up through the volume layers' own
    transforms (a wrong half-voxel shift, axis order or offset would miss).
    `arrays` holds the segmentation's voxels, as the layer of that name shows them.
    """
    table = SynapseTable.from_csv(out / "synapses.csv")
    annotations = layers["synapses"]["annotations"]
    assert len(annotations) == len(table) > 0
    sites = {n: open_volume(str(out / f"{n}_sites.zarr")).read() for n in ("pre", "post")}
    half = np.asarray(resolution) / 2
    for row, annotation in enumerate(annotations):
        assert annotation["type"] == "line"
        np.testing.assert_allclose(annotation["pointA"], (table.pre_location[row] + half)[::-1])
        np.testing.assert_allclose(annotation["pointB"], (table.post_location[row] + half)[::-1])
        for point, side, segment in (
            (annotation["pointA"], "pre", table.pre_segment[row]),
            (annotation["pointB"], "post", table.post_segment[row]),
        ):
            label = layers["segmentation"], arrays["segmentation"], resolution, point
            assert _label_at(*label) == segment
            assert _label_at(layers[f"{side} sites"], sites[side], resolution, point) != 0


def _neuron_boundaries(neurons):
    """1 where a voxel's next neighbour along an axis is another neuron, else 0 (float32)."""
    boundary = np.zeros(neurons.shape, np.float32)
    for axis in range(3):
        differs = np.diff(neurons, axis=axis) != 0
        low = [slice(None)] * 3
        low[axis] = slice(0, -1)
        boundary[tuple(low)] = np.maximum(boundary[tuple(low)], differs)
    return boundary


def test_the_neuron_pipelines_segmentation_of_a_region_chains_into_the_partner_run(
    trained_run, tmp_path
):
    """The two commands of the README: the neuron pipeline's own-volume outputs, then partners.

    The neuron pipeline's `segmentation.zarr` of a region is written by its own
    writer (`neuron_volume.segment_volume`: a boundary map of the region at the
    region's offset, segmented block by block), into the folder the partner run
    then predicts into with `config.predict.segmentation` naming it.
    """
    config, workdir, provenance, raw, neurons, resolution = trained_run
    _write_threshold(workdir, 0.0, provenance)
    source = create_volume(
        str(tmp_path / "user.zarr"), raw.shape, raw.dtype, resolution, (400.0, 40.0, 80.0)
    )
    source[...] = raw
    roi = (slice(2, 12), slice(8, 96), slice(0, 90))
    region_offset = (400.0 + 2 * 40.0, 40.0 + 8 * 4.0, 80.0)
    out = tmp_path / "out"
    boundaries = create_volume(
        str(out / "boundaries.zarr"), (10, 88, 90), np.float32, resolution, region_offset
    )
    boundaries[...] = _neuron_boundaries(neurons[roi])
    seg_path = neuron_volume.segment_volume(
        out / "boundaries.zarr",
        out / "segmentation.zarr",
        {"sigma": 0.5, "h": 0.1, "threshold": None},
        "3d",
        boundary_provenance={"made_by": "this test"},
        block_shape=(5, 44, 45),
        halo=4,
    )
    written = open_volume(str(seg_path))
    assert (written.offset, written.resolution) == (region_offset, resolution)
    segmentation = written.read()
    assert len(np.unique(segmentation)) > 3  # neurons, not one segment
    config.mode = "predict"
    config.predict.update(
        input=str(tmp_path / "user.zarr"),
        output=str(out),
        roi="2:12,8:96,0:90",
        segmentation=str(seg_path),
        candidate_block=(5, 44, 45),
    )
    pipelines.run(config, workdir)
    *_, kept = _expected_tables(
        config, workdir, out, raw[roi], segmentation, resolution, region_offset, 0.0
    )
    assert len(kept) >= 1
    _assert_same_table(SynapseTable.from_csv(out / "synapses.csv"), kept)
    # The state shows the folder's segmentation once (at its stored offset, the
    # region's: (480, 72, 80) nm = (12, 18, 20) voxels), beside the boundaries.
    state = json.loads((out / "neuroglancer_state.json").read_text())
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert [layer["name"] for layer in state["layers"]] == [
        "raw",
        "proximity",
        "boundaries",
        "segmentation",
        "pre sites",
        "post sites",
        "synapses",
    ]
    assert layers["segmentation"]["source"]["transform"]["matrix"] == [
        [1, 0, 0, 12],
        [0, 1, 0, 18],
        [0, 0, 1, 20],
    ]
    _assert_annotations_are_the_table(layers, out, resolution, {"segmentation": segmentation})
    # The same segmentation given for another region of its shape is refused
    # before anything is predicted: it records where it lies.
    config.predict.update(roi="0:10,8:96,0:90", output=str(tmp_path / "other"))
    with pytest.raises(DataError) as error:
        pipelines.run(config, workdir)
    assert str(error.value) == (
        f"config.predict.segmentation={str(seg_path)!r}: offset (480.0, 72.0, 80.0) nm; "
        "expected the config.predict.roi region's (400.0, 72.0, 80.0) nm (a segmentation of "
        "another region?)"
    )
    assert not (tmp_path / "other" / "proximity.zarr").exists()


def test_a_segmentation_of_another_shape_is_named(trained_run, tmp_path):
    config, workdir, provenance, raw, segmentation, resolution = trained_run
    _write_threshold(workdir, 0.0, provenance)
    create_volume(str(tmp_path / "user.zarr"), raw.shape, raw.dtype, resolution)[...] = raw
    seg_path = tmp_path / "neurons.zarr"
    create_volume(str(seg_path), (12, 96, 95), np.uint64, resolution)
    config.mode = "predict"
    config.predict.update(
        input=str(tmp_path / "user.zarr"),
        output=str(tmp_path / "out"),
        roi="",
        segmentation=str(seg_path),
    )
    with pytest.raises(DataError) as error:
        pipelines.run(config, workdir)
    assert str(error.value) == (
        f"config.predict.segmentation={str(seg_path)!r}: shape (12, 96, 95); expected the "
        "input's (12, 96, 96) or the config.predict.roi region's (12, 96, 96)"
    )
    # Checked before the proximity is predicted.
    assert not (tmp_path / "out" / "proximity.zarr").exists()
    # A missing one and one of floats are named too.
    config.predict.segmentation = str(tmp_path / "missing.zarr")
    with pytest.raises(DataError, match=r"^config.predict.segmentation='.*/missing.zarr': "):
        pipelines.run(config, workdir)
    create_volume(str(tmp_path / "floats.zarr"), raw.shape, np.float32, resolution)
    config.predict.segmentation = str(tmp_path / "floats.zarr")
    with pytest.raises(DataError, match="dtype float32; expected integer neuron labels"):
        pipelines.run(config, workdir)
    # One of the input's shape that records another voxel size.
    create_volume(str(tmp_path / "coarse.zarr"), raw.shape, np.uint64, (40.0, 8.0, 8.0))
    config.predict.segmentation = str(tmp_path / "coarse.zarr")
    with pytest.raises(DataError, match=r"voxel size \(40.0, 8.0, 8.0\) nm; expected the "):
        pipelines.run(config, workdir)
    assert not (tmp_path / "out" / "proximity.zarr").exists()


def test_a_region_from_voxel_zero_without_segmentation_stops_at_the_proximity(
    trained_run, tmp_path
):
    config, workdir, _, raw, _, resolution = trained_run
    stage = ProximityStage.from_config(config)
    whole = stage.predict(stage.load(workdir), raw, tmp_path / "whole.zarr", resolution)
    create_volume(str(tmp_path / "user.zarr"), raw.shape, raw.dtype, resolution)[...] = raw
    config.mode = "predict"
    config.predict.update(
        input=str(tmp_path / "user.zarr"), output=str(tmp_path / "out"), segmentation=""
    )
    # The region is the first (4, 32, 32) block of the whole volume's grid,
    # read with its real context: the whole volume's values there.
    config.predict.roi = "0:4,0:32,0:32"
    pipelines.run(config, workdir)
    got = open_volume(str(tmp_path / "out" / "proximity.zarr"))
    np.testing.assert_allclose(got.read(), whole[:4, :32, :32], rtol=1e-5, atol=1e-6)
    # The proximity, its done-state and the run's neuroglancer state: no tables.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "neuroglancer_state.json",
        "proximity.zarr",
        "proximity.zarr.blocks",
    ]
