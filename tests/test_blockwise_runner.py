"""Tests of the block-wise runner: done-array, prefetch threads, retries, SIGKILL, Dask workers."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.inference import blockwise
from synjax.inference.block_grid import BlockGrid
from synjax.inference.blockwise import BlockError, LazyPredictor, predict_blockwise
from synjax.inference.done_blocks import DoneBlocks, done_state_differences, remove_done_state
from synjax.io import create_volume, open_volume
from tests.conftest import REPO_ROOT

VOLUME = (9, 10, 11)
BLOCK = (4, 4, 4)
CONTEXT = (1, 2, 3)
PROVENANCE = {"model": {"step": 1}, "input": {"path": "/a.zarr"}}


def _volume(shape=VOLUME, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _crop_affine(batch):
    """A valid-padding 'network' for CONTEXT: crops the context, then 2 x + 1."""
    cz, cy, cx = CONTEXT
    z, y, x = batch.shape[1:4]
    return batch[:, cz : z - cz, cy : y - cy, cx : x - cx] * 2 + 1


def _done_array(path):
    return open_volume(str(path / "done.zarr")).read()


# ---------------------------------------------------------------- done-array


def test_done_array_records_blocks_at_their_grid_positions(tmp_path):
    grid = BlockGrid(VOLUME, BLOCK)  # grid (3, 3, 3)
    state = DoneBlocks(tmp_path / "d.blocks", grid, PROVENANCE)
    state.record([0, 1, 2, 4, 26])
    done = _done_array(tmp_path / "d.blocks")
    assert done.shape == (3, 3, 3) and done.dtype == np.uint8
    expected = np.zeros((3, 3, 3), np.uint8)
    expected[0, 0, :] = 1  # ids 0, 1, 2
    expected[0, 1, 1] = 1  # id 4
    expected[2, 2, 2] = 1  # id 26
    np.testing.assert_array_equal(done, expected)
    header = json.loads((tmp_path / "d.blocks" / "header.json").read_text())
    assert header["provenance"] == PROVENANCE and header["grid"]["block_shape"] == [4, 4, 4]
    # Reopened with the same grid and provenance, the record is kept.
    again = DoneBlocks(tmp_path / "d.blocks", grid, PROVENANCE)
    assert again.todo().tolist() == [i for i in range(27) if i not in (0, 1, 2, 4, 26)]
    assert done_state_differences(tmp_path / "d.blocks", grid, PROVENANCE) == []


def test_done_array_other_provenance_restarts_or_refuses(tmp_path):
    grid = BlockGrid(VOLUME, BLOCK)
    path = tmp_path / "d.blocks"
    DoneBlocks(path, grid, PROVENANCE).record([3])
    other = {"model": {"step": 2}, "input": {"path": "/a.zarr"}}
    assert done_state_differences(path, grid, other) == ["model.step: 1 -> 2"]
    with pytest.raises(DataError, match=r"model.step: 1 -> 2"):
        DoneBlocks(path, grid, other, resume="strict")
    assert _done_array(path)[0, 1, 0] == 1  # strict changed nothing
    assert len(DoneBlocks(path, grid, other).todo()) == 27  # auto: afresh
    assert _done_array(path).sum() == 0
    with pytest.raises(ConfigError, match="grid"):
        DoneBlocks(path, BlockGrid(VOLUME, (3, 3, 3)), other)
    remove_done_state(path)
    assert not path.exists() and done_state_differences(path, grid) is None


def test_kill_between_header_and_array_counts_nothing_done(tmp_path):
    grid = BlockGrid(VOLUME, BLOCK)
    path = tmp_path / "d.blocks"
    DoneBlocks(path, grid).record([0, 1])
    # As if killed while the array was being created: a folder without metadata.
    for item in (path / "done.zarr").iterdir():
        item.unlink()
    assert len(DoneBlocks(path, grid).todo()) == grid.num_blocks


# ----------------------------------------------------------- prefetch threads


class _GatedSource:
    """A source whose reads of block ``gate_block``'s input box set an event."""

    def __init__(self, array, box):
        self.array, self.box, self.read_ahead = array, box, threading.Event()

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)

    def __getitem__(self, key):
        if tuple((s.start, s.stop) for s in key) == self.box:
            self.read_ahead.set()
        return self.array[key]


def test_next_block_is_read_while_this_one_computes():
    vol = _volume()
    grid = BlockGrid(VOLUME, BLOCK)  # no context: input box == output box
    box = tuple((s.start, s.stop) for s in grid.output_box(1))
    source = _GatedSource(vol, box)
    waited = []

    def predict(batch):
        if not waited:
            # Block 0 computes only once block 1 has been read: without a
            # reading thread this would wait for ever (here: 30 s, then fail).
            waited.append(source.read_ahead.wait(timeout=30))
        return batch * 2 + 1

    dest = np.zeros(VOLUME, np.float32)
    predict_blockwise(predict, source, dest, grid, progress=False)
    assert waited == [True]
    np.testing.assert_array_equal(dest, vol * 2 + 1)


# ------------------------------------------------------------------- retries


class _FlakyOn:
    """Fails the first ``failures`` computations of the block whose output holds ``marker``."""

    def __init__(self, marker, failures):
        self.marker, self.failures, self.attempts = marker, failures, 0

    def __call__(self, batch):
        if np.any(_crop_affine(batch) == self.marker * 2 + 1):
            self.attempts += 1
            if self.attempts <= self.failures:
                raise RuntimeError(f"flaky attempt {self.attempts}")
        return _crop_affine(batch)


def _marked_volume(block_id, grid):
    vol = _volume()
    vol[tuple(s.start for s in grid.output_box(block_id))] = 50.0
    return vol


def test_a_failing_block_is_retried_then_succeeds(tmp_path):
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    vol = _marked_volume(5, grid)
    flaky = _FlakyOn(50.0, failures=2)
    dest = np.zeros(VOLUME, np.float32)
    summary = predict_blockwise(
        flaky, vol, dest, grid, manifest_path=tmp_path / "p.blocks", retries=2, progress=False
    )
    assert flaky.attempts == 3
    assert summary.computed == grid.num_blocks
    np.testing.assert_array_equal(dest, vol * 2 + 1)


def test_a_block_failing_every_retry_is_named_and_nothing_written_is_lost(tmp_path):
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    bad = 5  # index (0, 1, 2): voxels z 0:4, y 4:8, x 8:11 (cropped)
    vol = _marked_volume(bad, grid)
    flaky = _FlakyOn(50.0, failures=10)
    dest = create_volume(str(tmp_path / "p.zarr"), VOLUME, np.float32, chunks=BLOCK)
    with pytest.raises(BlockError) as error:
        predict_blockwise(
            flaky, vol, dest, grid, manifest_path=tmp_path / "p.blocks", retries=1, progress=False
        )
    message = str(error.value)
    assert message == (
        "computing of block 5 (index (0, 1, 2), voxels [0:4, 4:8, 8:11]) failed 2 time(s): "
        "RuntimeError: flaky attempt 2"
    )
    assert flaky.attempts == 2
    done = _done_array(tmp_path / "p.blocks").reshape(-1)
    # Blocks 0-4 were written before, and recorded; nothing after block 5 was.
    assert done.tolist() == [1] * bad + [0] * (grid.num_blocks - bad)
    written = dest.read()
    expected = vol * 2 + 1
    for block_id in range(bad):
        box = grid.output_box(block_id)
        np.testing.assert_array_equal(written[box], expected[box])
    # A rerun computes the rest only.
    summary = predict_blockwise(
        _crop_affine, vol, dest, grid, manifest_path=tmp_path / "p.blocks", progress=False
    )
    assert (summary.skipped, summary.computed) == (bad, grid.num_blocks - bad)
    np.testing.assert_array_equal(dest.read(), expected)


def test_success_is_never_reported_with_blocks_missing(monkeypatch, tmp_path):
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    real = blockwise.run_prefetched

    def loses_last_batch(job, batches, on_written):
        real(job, list(batches)[:-1], on_written)

    monkeypatch.setattr(blockwise, "run_prefetched", loses_last_batch)
    with pytest.raises(BlockError, match=r"^1 of 27 blocks are not recorded .*block 26 "):
        predict_blockwise(
            _crop_affine, _volume(), np.zeros(VOLUME, np.float32), grid, progress=False
        )
    with pytest.raises(ConfigError, match="retries"):
        predict_blockwise(_crop_affine, _volume(), np.zeros(VOLUME), grid, retries=-1)


def test_region_of_interest_reads_context_from_around_it():
    vol = _volume((12, 14, 16))
    start, shape = (2, 3, 4), (7, 9, 10)
    grid = BlockGrid(shape, BLOCK, CONTEXT)
    dest = np.zeros(shape, np.float32)
    predict_blockwise(_crop_affine, vol, dest, grid, origin=start, progress=False)
    region = tuple(slice(a, a + n) for a, n in zip(start, shape, strict=True))
    np.testing.assert_array_equal(dest, vol[region] * 2 + 1)
    with pytest.raises(DataError, match="leaves the source"):
        predict_blockwise(_crop_affine, vol, dest, grid, origin=(6, 0, 0), progress=False)


# ------------------------------------------------------ SIGKILL and restart

_KILLED_JOB = """
import json, pathlib, sys, time
import numpy as np
from synjax.inference.block_grid import BlockGrid
from synjax.inference.blockwise import predict_blockwise
from synjax.io import create_volume, open_volume

work, hang_at = pathlib.Path(sys.argv[1]), int(sys.argv[2])
raw = np.load(work / "raw.npy")
target = work / "pred.zarr"
done = work / "pred.zarr.blocks"
if target.exists():
    dest = open_volume(str(target), mode="r+")
else:
    dest = create_volume(str(target), raw.shape, np.float32, chunks=(4, 4, 4))
calls = 0

def predict(batch):
    global calls
    calls += 1
    if calls == hang_at:
        # The previous block is written and recorded while this one computes.
        for _ in range(600):
            if (done / "done.zarr").exists():
                marked = open_volume(str(done / "done.zarr")).read().sum()
                if marked == hang_at - 1:
                    break
            time.sleep(0.1)
        (work / "hanging").touch()
        time.sleep(600)  # killed here
    return batch[:, 1:-1, 2:-2, 3:-3] * 2 + 1

summary = predict_blockwise(
    predict, raw, dest, BlockGrid(raw.shape, (4, 4, 4), (1, 2, 3)),
    manifest_path=done, progress=False,
)
print(json.dumps([summary.skipped, summary.computed, calls]))
"""


def test_sigkilled_zarr_prediction_resumes_each_block_computed_once(tmp_path):
    vol = _volume((12, 16, 16))
    np.save(tmp_path / "raw.npy", vol)
    grid = BlockGrid(vol.shape, BLOCK, CONTEXT)
    script = tmp_path / "job.py"
    script.write_text(_KILLED_JOB)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    hang_at = 7
    job = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(hang_at)], env=env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "hanging").exists():
            assert job.poll() is None, job.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the job never reached the block it hangs in"
            time.sleep(0.05)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == -signal.SIGKILL
    done = _done_array(tmp_path / "pred.zarr.blocks").reshape(-1)
    assert np.flatnonzero(done).tolist() == list(range(hang_at - 1))

    resumed = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    skipped, computed, calls = json.loads(resumed.stdout.splitlines()[-1])
    remaining = grid.num_blocks - (hang_at - 1)
    # Each block left is computed exactly once (batch_size 1: one call per block).
    assert (skipped, computed, calls) == (hang_at - 1, remaining, remaining)
    uninterrupted = np.zeros(vol.shape, np.float32)
    predict_blockwise(_crop_affine, vol, uninterrupted, grid, progress=False)
    np.testing.assert_array_equal(open_volume(str(tmp_path / "pred.zarr")).read(), uninterrupted)
    assert _done_array(tmp_path / "pred.zarr.blocks").all()


# ---------------------------------------------------------- Dask, 2 workers


def _logged_model(log_path):
    """A 'model load': appends this process's id to ``log_path``, returns the network."""
    with open(log_path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return _crop_affine


def test_dask_two_worker_processes_equal_local_and_load_the_model_once_each(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    vol = _volume((12, 16, 16))
    grid = BlockGrid(vol.shape, BLOCK, CONTEXT)
    local = np.zeros(vol.shape, np.float32)
    predict_blockwise(_crop_affine, vol, local, grid, progress=False)

    source = create_volume(str(tmp_path / "raw.zarr"), vol.shape, np.float32, chunks=BLOCK)
    source[...] = vol
    dest = create_volume(str(tmp_path / "pred.zarr"), vol.shape, np.float32, chunks=BLOCK)
    log_path = tmp_path / "loads.txt"
    # Worker processes import this test module: they need the repository on their path.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        summary = predict_blockwise(
            LazyPredictor(_logged_model, str(log_path)),
            source,
            dest,
            grid,
            manifest_path=tmp_path / "pred.zarr.blocks",
            executor="dask",
            client=cluster,
            blocks_per_task=1,
            progress=False,
        )
    assert summary.computed == grid.num_blocks == 48
    np.testing.assert_array_equal(open_volume(str(tmp_path / "pred.zarr")).read(), local)
    loads = log_path.read_text().split()
    # 48 tasks, one load per worker process that ran any (not one per task).
    assert 1 <= len(loads) <= 2 and len(set(loads)) == len(loads)
    assert str(os.getpid()) not in loads


# ------------------------------------------------------------------- memory


def _peak_bytes(tmp_path, shape):
    """tracemalloc's peak while predicting an on-disk ``shape`` volume block by block."""
    import tracemalloc

    source = create_volume(str(tmp_path / f"raw{shape[0]}.zarr"), shape, np.float32, chunks=BLOCK)
    for z in range(0, shape[0], BLOCK[0]):  # written slab by slab, not held whole
        source[z : z + BLOCK[0]] = np.ones((BLOCK[0], *shape[1:]), np.float32)
    dest = create_volume(str(tmp_path / f"pred{shape[0]}.zarr"), shape, np.float32, chunks=BLOCK)
    grid = BlockGrid(shape, BLOCK, CONTEXT)
    done = tmp_path / f"pred{shape[0]}.zarr.blocks"
    tracemalloc.start()
    try:
        predict_blockwise(_crop_affine, source, dest, grid, manifest_path=done, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_volume(tmp_path):
    _peak_bytes(tmp_path, (8, 8, 8))  # first-use allocations (caches, imports) out of the way
    small = _peak_bytes(tmp_path, (16, 16, 16))  # 64 blocks
    large = _peak_bytes(tmp_path, (32, 32, 32))  # 512 blocks, 8 times the voxels
    # The large float32 volume is 128 KiB; a block with its context is 2 KiB.
    assert large < small + 32 * 1024
    assert large < 32 * 32 * 32 * 4 // 2


def test_progress_bar_counts_blocks_done_with_rate(tmp_path, capsys):
    grid = BlockGrid(VOLUME, BLOCK, CONTEXT)
    done = tmp_path / "p.blocks"
    DoneBlocks(done, grid).record(range(20))  # a resumed run: 20 of 27 already done
    dest = np.zeros(VOLUME, np.float32)
    predict_blockwise(_crop_affine, _volume(), dest, grid, manifest_path=done, progress=True)
    bar = capsys.readouterr().err.strip().splitlines()[-1]
    # tqdm's last line: blocks done of the total, elapsed<remaining, rate.
    assert "27/27" in bar and "block/s" in bar and "<" in bar, bar


def _plus(value):
    return lambda batch: batch + value


def _then_plus_one(inner):
    fn = inner.build()  # a factory that builds another lazy predictor
    return lambda batch: fn(batch) + 1


def test_a_lazy_predictor_may_build_another():
    outer = LazyPredictor(_then_plus_one, LazyPredictor(_plus, 1))
    result = []
    # In a thread, so that a deadlock fails the test instead of hanging it.
    worker = threading.Thread(target=lambda: result.append(outer(np.zeros(2))), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert len(result) == 1 and result[0].tolist() == [2.0, 2.0]
