"""Tests of the block grid and block-wise prediction (local and Dask executors)."""

import json
import pickle

import numpy as np
import pytest
import scipy.ndimage

from synjax.errors import ConfigError, DataError
from synjax.geometry import Box, read_padded
from synjax.inference.block_grid import BlockGrid
from synjax.inference.blockwise import (
    BlockError,
    BlockManifest,
    LazyPredictor,
    blockwise_map,
    manifest_differences,
    predict_blockwise,
)

# Volume and block shapes that do not divide, so the last blocks are cropped.
VOLUME = (9, 10, 11)
BLOCK = (4, 4, 4)
CONTEXT = (1, 2, 3)
NUMPY_PAD = {"reflect": "reflect", "edge": "edge", "zero": "constant"}
SCIPY_MODE = {"reflect": "mirror", "edge": "nearest", "zero": "constant"}


def _volume(shape=VOLUME, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _crop_affine(context):
    """A valid-padding 'network': crops the context, then 2 x + 1."""
    cz, cy, cx = context

    def fn(batch):
        z, y, x = batch.shape[1:4]
        return batch[:, cz : z - cz, cy : y - cy, cx : x - cx] * 2 + 1

    return fn


def _mean3(batch):
    """3x3x3 valid mean over [b, z, y, x]: the output is 2 smaller per axis."""
    windows = np.lib.stride_tricks.sliding_window_view(batch, (3, 3, 3), axis=(1, 2, 3))
    return windows.mean(axis=(-3, -2, -1))


class RecordingVolume:
    """Numpy-backed volume that logs every read and write box."""

    def __init__(self, array, chunks=None, on_write=None):
        self.array = array
        self.chunks = chunks
        self.on_write = on_write
        self.reads = []
        self.writes = []

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)

    def __getitem__(self, box):
        self.reads.append(box)
        return self.array[box]

    def __setitem__(self, box, value):
        if self.on_write is not None:
            self.on_write(box)
        self.array[box] = value
        self.writes.append(tuple((s.start, s.stop) for s in box))


def _manifest_ids(path):
    lines = path.read_text().splitlines()[1:]
    return [i for line in lines for i in json.loads(line)["blocks"]]


# ---------------------------------------------------------------- block grid


def test_grid_covers_every_voxel_once_with_cropped_last_blocks():
    grid = BlockGrid((5, 7, 4), (2, 3, 4))
    assert grid.grid_shape == (3, 3, 1)
    assert grid.num_blocks == 9
    assert grid.output_box(1) == (slice(0, 2), slice(3, 6), slice(0, 4))
    # Last block: index (2, 2, 0), cropped to the volume end.
    assert grid.block_index(8) == (2, 2, 0)
    assert grid.output_box(8) == (slice(4, 5), slice(6, 7), slice(0, 4))
    assert grid.output_crop(8) == (slice(0, 1), slice(0, 1), slice(0, 4))
    count = np.zeros(grid.volume_shape, np.int32)
    for i in grid.block_ids():
        count[grid.output_box(i)] += 1
    np.testing.assert_array_equal(count, 1)


def test_input_boxes_by_hand():
    grid = BlockGrid((5, 7, 4), (2, 3, 4), context=(1, 2, 0))
    assert grid.input_shape == (4, 7, 4)
    start, stop = grid.input_box(4)  # index (1, 1, 0): output start (2, 3, 0)
    np.testing.assert_array_equal(start, (1, 1, 0))
    np.testing.assert_array_equal(stop, (5, 8, 4))
    start, stop = grid.input_box(0)
    np.testing.assert_array_equal(start, (-1, -2, 0))
    np.testing.assert_array_equal(stop, (3, 5, 4))


def test_from_io_shapes_and_bad_settings():
    grid = BlockGrid.from_io_shapes((20, 30, 30), (10, 12, 12), (8, 8, 8))
    assert grid.context == (1, 2, 2)
    assert grid.block_shape == (8, 8, 8)
    with pytest.raises(ConfigError, match="even"):
        BlockGrid.from_io_shapes((20, 30, 30), (10, 12, 11), (8, 8, 8))
    with pytest.raises(ConfigError, match="pad_mode"):
        BlockGrid((4, 4, 4), 2, pad_mode="wrap")
    with pytest.raises(ConfigError, match="block_shape"):
        BlockGrid((4, 4, 4), (2, 0, 2))
    with pytest.raises(ConfigError, match="block id"):
        BlockGrid((4, 4, 4), 2).output_box(8)


def test_read_padded_one_axis_by_hand():
    vol = np.arange(4, dtype=np.int16).reshape(4, 1, 1)
    expected = {
        "reflect": [2, 1, 0, 1, 2, 3, 2, 1],
        "edge": [0, 0, 0, 1, 2, 3, 3, 3],
        "zero": [0, 0, 0, 1, 2, 3, 0, 0],
    }
    for mode, values in expected.items():
        got = read_padded(vol, Box((-2, 0, 0), (6, 1, 1)), mode)
        assert got.dtype == np.int16
        np.testing.assert_array_equal(got[:, 0, 0], values, err_msg=mode)
    # A pad wider than the volume keeps mirroring: [0 1 2] -> ... 1 0 1 2 1 0 ...
    small = np.arange(3).reshape(3, 1, 1)
    got = read_padded(small, Box((-5, 0, 0), (5, 1, 1)), "reflect")[:, 0, 0]
    np.testing.assert_array_equal(got, [1, 0, 1, 2, 1, 0, 1, 2, 1, 0])


@pytest.mark.parametrize("mode", ["reflect", "edge", "zero"])
def test_read_padded_matches_numpy_pad(mode):
    vol = _volume((6, 7, 8))[..., None].repeat(2, axis=-1)  # with a channel axis
    pad = 3
    padded = np.pad(vol, [(pad, pad)] * 3 + [(0, 0)], mode=NUMPY_PAD[mode])
    for start, stop in [
        ((-3, -1, 2), (4, 5, 11)),
        ((2, 2, 2), (5, 6, 7)),
        ((-3, -3, -3), (9, 10, 11)),
    ]:
        window = tuple(slice(a + pad, b + pad) for a, b in zip(start, stop, strict=True))
        np.testing.assert_array_equal(read_padded(vol, Box(start, stop), mode), padded[window])


def test_reads_only_block_input_regions():
    source = RecordingVolume(_volume((16, 16, 16)))
    dest = np.zeros((16, 16, 16), np.float32)
    grid = BlockGrid((16, 16, 16), (4, 4, 4), context=(1, 1, 1))
    predict_blockwise(_crop_affine((1, 1, 1)), source, dest, grid, progress=False)
    assert len(source.reads) == grid.num_blocks
    limit = np.prod(grid.input_shape)
    for box in source.reads:
        assert np.prod([s.stop - s.start for s in box]) <= limit


# ------------------------------------------------------------- local executor


@pytest.mark.parametrize("batch_size", [1, 3])
def test_crop_affine_reproduces_volume_exactly(batch_size):
    vol = _volume()
    dest = np.full(VOLUME, -1, np.float32)
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    summary = predict_blockwise(_crop_affine(CONTEXT), vol, dest, grid, batch_size, progress=False)
    np.testing.assert_array_equal(dest, vol * 2 + 1)
    assert (summary.total, summary.skipped, summary.computed) == (
        grid.num_blocks,
        0,
        grid.num_blocks,
    )


def test_jitted_predict_fn_and_channel_selection():
    import jax

    jax.config.update("jax_disable_most_optimizations", True)
    vol = np.stack([_volume(seed=1), _volume(seed=2)], axis=-1)  # [z, y, x, 2]
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    cz, cy, cx = CONTEXT
    calls = []

    @jax.jit
    def net(batch):  # [b, z, y, x, 2] -> [b, oz, oy, ox, 3]
        core = batch[:, cz:-cz, cy:-cy, cx:-cx]
        return jax.numpy.concatenate([core[..., ::-1], core.sum(-1, keepdims=True)], axis=-1)

    def predict(batch):
        calls.append(batch.shape)
        return net(batch)

    dest = np.zeros(VOLUME + (2,), np.float32)
    predict_blockwise(predict, vol, dest, grid, batch_size=4, channels=[1, 2], progress=False)
    np.testing.assert_array_equal(dest[..., 0], vol[..., 0])
    np.testing.assert_allclose(dest[..., 1], vol.sum(-1), rtol=1e-6)
    # The last, partial batch is padded so every call has the same shape.
    assert set(calls) == {(4,) + grid.input_shape + (2,)}

    dest3 = np.zeros(VOLUME, np.float32)
    predict_blockwise(predict, vol, dest3, grid, batch_size=4, channels=0, progress=False)
    np.testing.assert_array_equal(dest3, vol[..., 1])
    with pytest.raises(DataError, match="channels"):
        predict_blockwise(predict, vol, dest3, grid, progress=False)


@pytest.mark.parametrize("mode", ["reflect", "edge", "zero"])
def test_valid_mean_matches_scipy_with_documented_borders(mode):
    vol = _volume()
    dest = np.zeros(VOLUME, np.float32)
    grid = BlockGrid(VOLUME, BLOCK, context=1, pad_mode=mode)
    predict_blockwise(_mean3, vol, dest, grid, batch_size=2, progress=False)
    expected = scipy.ndimage.uniform_filter(vol.astype(np.float64), 3, mode=SCIPY_MODE[mode])
    np.testing.assert_allclose(dest, expected, rtol=1e-5, atol=1e-6)


def test_shape_errors():
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    with pytest.raises(DataError, match="volume_shape"):
        predict_blockwise(_crop_affine(CONTEXT), vol, np.zeros((9, 10, 12)), grid, progress=False)
    with pytest.raises(DataError, match="block_shape"):
        predict_blockwise(lambda b: b, vol, np.zeros(VOLUME), grid, progress=False)
    with pytest.raises(ConfigError, match="executor"):
        predict_blockwise(lambda b: b, vol, np.zeros(VOLUME), grid, executor="ray", progress=False)


# ------------------------------------------------------------------ resuming


class FailAfter:
    """Counts calls; raises on call number ``fail_at`` (1-based) if set."""

    def __init__(self, fn, fail_at=None):
        self.fn, self.fail_at, self.calls = fn, fail_at, 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.fn(batch)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_killed_run_resumes_without_losing_or_repeating_blocks(tmp_path, batch_size):
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    expected = np.zeros(VOLUME, np.float32)
    predict_blockwise(_crop_affine(CONTEXT), vol, expected, grid, progress=False)

    manifest = tmp_path / "pred.blocks.jsonl"
    dest = RecordingVolume(np.zeros(VOLUME, np.float32))
    first = FailAfter(_crop_affine(CONTEXT), fail_at=3)
    with pytest.raises(RuntimeError, match="simulated"):
        predict_blockwise(first, vol, dest, grid, batch_size, manifest, progress=False)
    finished = 2 * batch_size
    assert sorted(_manifest_ids(manifest)) == list(range(finished))

    second = FailAfter(_crop_affine(CONTEXT))
    summary = predict_blockwise(second, vol, dest, grid, batch_size, manifest, progress=False)
    assert summary.skipped == finished
    assert summary.computed == grid.num_blocks - finished
    # Every block computed and written exactly once over both runs.
    remaining = grid.num_blocks - finished
    assert (first.calls - 1) * batch_size == finished
    assert second.calls == -(-remaining // batch_size)
    assert len(dest.writes) == len(set(dest.writes)) == grid.num_blocks
    assert sorted(_manifest_ids(manifest)) == list(grid.block_ids())
    np.testing.assert_array_equal(dest.array, expected)
    # A third run has nothing left to do.
    third = FailAfter(_crop_affine(CONTEXT), fail_at=1)
    assert (
        predict_blockwise(third, vol, dest, grid, manifest_path=manifest, progress=False).computed
        == 0
    )


def test_manifest_is_written_only_after_data(tmp_path):
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    manifest = tmp_path / "m.jsonl"
    fail_block = 5
    written = []

    def on_write(box):
        block = next(i for i in grid.block_ids() if grid.output_box(i) == box)
        recorded = set(_manifest_ids(manifest))
        assert block not in recorded, "manifest names a block before its data is written"
        assert recorded == set(written), "a written block is missing from the manifest"
        if block == fail_block:
            raise OSError("disk full")
        written.append(block)

    dest = RecordingVolume(np.zeros(VOLUME, np.float32), on_write=on_write)
    # The failure is named with its block (a BlockError, one line for the CLI).
    with pytest.raises(BlockError, match="block 5 .*OSError: disk full"):
        predict_blockwise(
            _crop_affine(CONTEXT), vol, dest, grid, manifest_path=manifest, progress=False
        )
    assert _manifest_ids(manifest) == list(range(fail_block))


def test_manifest_rejects_other_grid_and_survives_partial_line(tmp_path):
    path = tmp_path / "m.jsonl"
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    BlockManifest(path, grid).record([0, 1])
    with open(path, "a") as f:
        f.write('{"blocks": [2, ')  # a kill in the middle of an append
    manifest = BlockManifest(path, grid)
    assert manifest.done == {0, 1}
    manifest.record([2])
    assert BlockManifest(path, grid).done == {0, 1, 2}
    with pytest.raises(ConfigError, match="grid"):
        BlockManifest(path, BlockGrid(VOLUME, BLOCK, context=0))


# --------------------------------------------------------- dask and helpers


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def _make_mean3(scale):
    return lambda batch: _mean3(batch) * scale


def test_dask_executor_matches_local_and_resumes(tmp_path, dask_client):
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK, context=1)
    local = np.zeros(VOLUME, np.float32)
    predict_blockwise(_make_mean3(3.0), vol, local, grid, batch_size=2, progress=False)

    manifest = tmp_path / "dask.jsonl"
    BlockManifest(manifest, grid).record([0, 4])  # pretend a killed run did these
    # Dask pickles the job even in-process (numpy buffers are shared, wrappers
    # copied), so skipped blocks are told apart by a sentinel, not by a log.
    sentinel = -7.0
    dest = RecordingVolume(np.zeros(VOLUME, np.float32), chunks=(2, 2, 4))
    dest.array[grid.output_box(0)] = sentinel
    dest.array[grid.output_box(4)] = sentinel
    summary = predict_blockwise(
        LazyPredictor(_make_mean3, 3.0),
        vol,
        dest,
        grid,
        batch_size=2,
        manifest_path=manifest,
        executor="dask",
        client=dask_client,
        blocks_per_task=3,
        progress=False,
    )
    assert (summary.skipped, summary.computed) == (2, grid.num_blocks - 2)
    expected = local.copy()
    expected[grid.output_box(0)] = sentinel
    expected[grid.output_box(4)] = sentinel
    np.testing.assert_array_equal(dest.array, expected)
    assert sorted(_manifest_ids(manifest)) == list(grid.block_ids())


def test_dask_rejects_chunks_shared_by_blocks(dask_client):
    grid = BlockGrid(VOLUME, BLOCK)
    dest = RecordingVolume(np.zeros(VOLUME, np.float32), chunks=(3, 4, 4))
    with pytest.raises(ConfigError, match="multiple of the dest chunks"):
        predict_blockwise(
            lambda b: b, _volume(), dest, grid, executor="dask", client=dask_client, progress=False
        )


_BUILT = []


def _offset_factory(offset):
    _BUILT.append(offset)
    return lambda batch: batch + offset


def test_lazy_predictor_builds_once_per_process():
    lazy = LazyPredictor(_offset_factory, 5)
    np.testing.assert_array_equal(lazy(np.zeros(2)), [5, 5])
    # A pickled copy (what a worker receives) reuses the process's instance.
    copy = pickle.loads(pickle.dumps(lazy))
    np.testing.assert_array_equal(copy(np.ones(2)), [6, 6])
    assert _BUILT == [5]
    np.testing.assert_array_equal(LazyPredictor(_offset_factory, 1)(np.zeros(1)), [1])
    assert _BUILT == [5, 1]


def test_blockwise_map_threshold_in_source_dtype(tmp_path):
    vol = (np.random.default_rng(3).random(VOLUME) * 1000).astype(np.uint16)
    dest = np.zeros(VOLUME, np.uint8)
    dtypes = set()

    def threshold(block):  # [bz + 2, by + 2, bx + 2] -> [bz, by, bx]
        dtypes.add(block.dtype)
        return block[1:-1, 1:-1, 1:-1] > 500

    manifest = tmp_path / "t.jsonl"
    summary = blockwise_map(
        threshold, vol, dest, BLOCK, context=1, manifest_path=manifest, progress=False
    )
    np.testing.assert_array_equal(dest, vol > 500)
    assert dtypes == {np.dtype(np.uint16)}
    assert summary.computed == 27
    assert (
        blockwise_map(
            threshold, vol, dest, BLOCK, 1, manifest_path=manifest, progress=False
        ).skipped
        == 27
    )


def test_h5py_volume_on_disk(tmp_path):
    h5py = pytest.importorskip("h5py")
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        src = f.create_dataset("raw", data=vol, chunks=(3, 5, 11))
        dst = f.create_dataset("pred", shape=VOLUME, dtype=np.float32, chunks=(2, 2, 4))
        predict_blockwise(_crop_affine(CONTEXT), src, dst, grid, batch_size=2, progress=False)
        np.testing.assert_array_equal(dst[...], vol * 2 + 1)


class _RaiseOnMarker:
    """Picklable predict_fn that fails on any batch holding ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __call__(self, batch):
        if self.marker is not None and np.any(batch == self.marker):
            raise RuntimeError("worker failed")
        return batch * 2 + 1


def test_dask_failed_task_is_not_recorded_and_reruns(tmp_path, dask_client):
    marker, bad_block = 100.0, 10
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK)
    vol[tuple(s.start for s in grid.output_box(bad_block))] = marker
    manifest = tmp_path / "fail.jsonl"
    dest = np.zeros(VOLUME, np.float32)
    kwargs = dict(manifest_path=manifest, executor="dask", client=dask_client, progress=False)
    with pytest.raises(RuntimeError, match="worker failed"):
        predict_blockwise(_RaiseOnMarker(marker), vol, dest, grid, blocks_per_task=4, **kwargs)
    assert bad_block not in _manifest_ids(manifest)
    summary = predict_blockwise(_RaiseOnMarker(None), vol, dest, grid, blocks_per_task=4, **kwargs)
    assert summary.skipped + summary.computed == grid.num_blocks
    assert sorted(_manifest_ids(manifest)) == list(grid.block_ids())
    np.testing.assert_array_equal(dest, vol * 2 + 1)


def _create_zarr(path, shape, dtype, chunks):
    """A new on-disk zarr volume from ``synjax.io`` (skips until that API exists)."""
    create_volume = getattr(pytest.importorskip("synjax.io"), "create_volume", None)
    if create_volume is None:
        pytest.skip("synjax.io.create_volume is not available")
    return create_volume(str(path), shape=shape, dtype=dtype, chunks=chunks)


def test_zarr_volumes_local_and_dask(tmp_path, dask_client):
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK, context=1)
    expected = np.zeros(VOLUME, np.float32)
    predict_blockwise(_mean3, vol, expected, grid, progress=False)

    source = _create_zarr(tmp_path / "raw.zarr", VOLUME, np.float32, (3, 5, 11))
    source[...] = vol
    for executor in ("local", "dask"):
        dest = _create_zarr(tmp_path / f"{executor}.zarr", VOLUME, np.float32, (2, 2, 4))
        summary = predict_blockwise(
            _mean3,
            source,
            dest,
            grid,
            batch_size=2,
            manifest_path=tmp_path / f"{executor}.zarr.blocks.jsonl",
            executor=executor,
            client=dask_client,
            progress=False,
        )
        assert summary.computed == grid.num_blocks
        np.testing.assert_array_equal(dest[...], expected, err_msg=executor)


# --------------------------------------------------------------- provenance

MODEL_A = {"model": {"name": "net", "step": 8, "params_hash": "aa"}, "input": {"path": "/x.h5"}}
MODEL_B = {"model": {"name": "net", "step": 16, "params_hash": "bb"}, "input": {"path": "/x.h5"}}


def _header(path):
    return json.loads(path.read_text().splitlines()[0])


def test_same_provenance_resumes_other_provenance_starts_afresh(tmp_path, caplog):
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    manifest = tmp_path / "p.blocks.jsonl"
    dest = RecordingVolume(np.zeros(VOLUME, np.float32))
    kwargs = dict(manifest_path=manifest, progress=False)
    first = predict_blockwise(_crop_affine(CONTEXT), vol, dest, grid, provenance=MODEL_A, **kwargs)
    assert first.computed == grid.num_blocks
    assert _header(manifest)["provenance"] == MODEL_A
    # The same model and input: every block is skipped, nothing is written.
    writes = len(dest.writes)
    again = predict_blockwise(_crop_affine(CONTEXT), vol, dest, grid, provenance=MODEL_A, **kwargs)
    assert (again.skipped, again.computed) == (grid.num_blocks, 0)
    assert len(dest.writes) == writes

    # Another model ("trained further"): a new function whose blocks must all replace the old.
    def retrained(batch):
        return _crop_affine(CONTEXT)(batch) * 10

    with caplog.at_level("WARNING"):
        redo = predict_blockwise(retrained, vol, dest, grid, provenance=MODEL_B, **kwargs)
    assert (redo.skipped, redo.computed) == (0, grid.num_blocks)
    np.testing.assert_allclose(dest.array, (vol * 2 + 1) * 10, rtol=1e-6)
    assert _header(manifest)["provenance"] == MODEL_B
    assert sorted(_manifest_ids(manifest)) == list(grid.block_ids())
    logged = caplog.text
    assert "model.step: 8 -> 16" in logged and "model.params_hash: 'aa' -> 'bb'" in logged


def test_strict_resume_names_what_differs(tmp_path):
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    manifest = tmp_path / "s.blocks.jsonl"
    dest = np.zeros(VOLUME, np.float32)
    kwargs = dict(manifest_path=manifest, progress=False)
    predict_blockwise(_crop_affine(CONTEXT), vol, dest, grid, provenance=MODEL_A, **kwargs)
    before = manifest.read_text()
    other_input = {"model": MODEL_A["model"], "input": {"path": "/y.h5"}}
    with pytest.raises(DataError) as error:
        predict_blockwise(
            lambda b: b, vol, dest, grid, provenance=other_input, resume="strict", **kwargs
        )
    message = str(error.value)
    assert "input.path: '/x.h5' -> '/y.h5'" in message and "\n" not in message
    assert "model" not in message.split("(", 1)[1].split(")")[0]  # only what differs
    assert manifest.read_text() == before  # nothing reset
    np.testing.assert_array_equal(dest, vol * 2 + 1)
    with pytest.raises(ConfigError, match="resume"):
        predict_blockwise(lambda b: b, vol, dest, grid, resume="sometimes", **kwargs)


def test_reset_then_killed_then_resumed(tmp_path):
    # A reset rewrites the header first: blocks recorded after it belong to the
    # new provenance and are kept by the next run, the old ones never are.
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    manifest = tmp_path / "r.blocks.jsonl"
    dest = RecordingVolume(np.zeros(VOLUME, np.float32))
    kwargs = dict(manifest_path=manifest, progress=False)
    old = _crop_affine(CONTEXT)
    predict_blockwise(lambda b: old(b) * 0, vol, dest, grid, provenance=MODEL_A, **kwargs)
    crashing = FailAfter(_crop_affine(CONTEXT), fail_at=4)
    with pytest.raises(RuntimeError, match="simulated"):
        predict_blockwise(crashing, vol, dest, grid, provenance=MODEL_B, **kwargs)
    assert _header(manifest)["provenance"] == MODEL_B
    assert sorted(_manifest_ids(manifest)) == [0, 1, 2]
    dest.writes.clear()
    rest = FailAfter(_crop_affine(CONTEXT))
    summary = predict_blockwise(rest, vol, dest, grid, provenance=MODEL_B, **kwargs)
    assert (summary.skipped, summary.computed) == (3, grid.num_blocks - 3)
    assert len(dest.writes) == grid.num_blocks - 3
    np.testing.assert_array_equal(dest.array, vol * 2 + 1)


def test_version_1_manifests_and_manifest_differences(tmp_path):
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    path = tmp_path / "v1.jsonl"
    path.write_text(
        json.dumps({"format": "synjax-block-manifest-v1", "grid": grid.to_dict()})
        + '\n{"blocks": [0, 1]}\n'
    )
    assert manifest_differences(tmp_path / "absent.jsonl", grid) is None
    assert manifest_differences(path, grid) == []
    assert manifest_differences(path, grid, MODEL_A) == [
        "provenance: not recorded (synjax-block-manifest-v1 header)"
    ]
    other = BlockGrid(VOLUME, BLOCK, context=0)
    assert manifest_differences(path, other)[0].startswith("grid: ")
    # Without a provenance to check, an old manifest resumes as before.
    assert BlockManifest(path, grid).done == {0, 1}
    with pytest.raises(DataError, match="not recorded"):
        BlockManifest(path, grid, MODEL_A, resume="strict")
    assert BlockManifest(path, grid, MODEL_A).done == set()
    assert _header(path) == {
        "format": "synjax-block-manifest-v2",
        "grid": json.loads(json.dumps(grid.to_dict())),
        "provenance": MODEL_A,
    }
    path.write_text('{"format": "something else"}\n')
    with pytest.raises(DataError, match="format"):
        manifest_differences(path, grid)


# ------------------------------------------------- durability under SIGKILL

_KILLED_JOB = """
import json, pathlib, sys, time
import numpy as np
from synjax.inference.block_grid import BlockGrid
from synjax.inference.blockwise import predict_blockwise
from synjax.io import create_volume, open_volume

work, hang_at = pathlib.Path(sys.argv[1]), int(sys.argv[2])
raw = np.load(work / "raw.npy")
target = f"{work / 'pred.h5'}:/pred"
if (work / "pred.h5").exists():
    dest = open_volume(target, mode="r+")
else:
    dest = create_volume(target, raw.shape, np.float32, chunks=BLOCK)
calls = 0

def predict(batch):
    global calls
    calls += 1
    if calls == hang_at:
        # Writes overlap compute: the previous block is recorded while this one runs.
        for _ in range(600):
            if (work / "pred.blocks.jsonl").read_text().count(chr(10)) == hang_at:
                break
            time.sleep(0.1)
        (work / "hanging").touch()
        time.sleep(600)  # killed here, between two blocks
    return batch[:, 1:-1, 2:-2, 3:-3] * 2 + 1

summary = predict_blockwise(
    predict, raw, dest, BlockGrid(raw.shape, BLOCK, (1, 2, 3)),
    manifest_path=work / "pred.blocks.jsonl", progress=False,
)
print(json.dumps([summary.skipped, summary.computed]))
"""


def test_sigkilled_hdf5_prediction_resumes_to_the_uninterrupted_result(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from synjax.io import open_volume
    from tests.conftest import REPO_ROOT

    vol = _volume((12, 16, 16))
    np.save(tmp_path / "raw.npy", vol)
    grid = BlockGrid(vol.shape, BLOCK, CONTEXT)
    expected = np.zeros(vol.shape, np.float32)
    predict_blockwise(_crop_affine(CONTEXT), vol, expected, grid, progress=False)

    script = tmp_path / "job.py"
    script.write_text(f"BLOCK = {BLOCK}\n" + _KILLED_JOB)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    hang_at = 10
    job = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(hang_at)],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "hanging").exists():
            assert job.poll() is None, job.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the job never reached its last block"
            time.sleep(0.05)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == -signal.SIGKILL
    recorded = sorted(_manifest_ids(tmp_path / "pred.blocks.jsonl"))
    assert recorded == list(range(hang_at - 1))

    resumed = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    skipped, computed = json.loads(resumed.stdout.splitlines()[-1])
    assert (skipped, computed) == (hang_at - 1, grid.num_blocks - hang_at + 1)
    # The recorded blocks were not computed again: their data survived the kill.
    np.testing.assert_array_equal(open_volume(f"{tmp_path / 'pred.h5'}:/pred").read(), expected)
