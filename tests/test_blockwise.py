"""Tests of block-wise prediction (local and Dask executors, resuming, durability)."""

import json
import pickle

import numpy as np
import pytest
import scipy.ndimage

from synjax.errors import ConfigError, DataError
from synjax.inference.block_grid import BlockGrid
from synjax.inference.blockwise import (
    BlockError,
    BlockManifest,
    LazyPredictor,
    blockwise_map,
    predict_blockwise,
)

# Volume and block shapes that do not divide, so the last blocks are cropped.
VOLUME = (9, 10, 11)
BLOCK = (4, 4, 4)
CONTEXT = (1, 2, 3)
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


# ------------------------------------------------------------- block reads


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
