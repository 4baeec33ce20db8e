"""A block-wise segmentation killed part-way and started again: finished blocks are not redone.

`segment_blockwise` with a state folder keeps what each pass finished
(`blockwise_pass_state`); the own-volume path (`neuron_volume.segment_volume`)
keeps it inside the segmentation's done-state. A run interrupted in the
watershed pass, between passes, or in the in-place relabelling (by an
exception from a test hook, or by SIGKILL in a subprocess) and then started
again must write exactly the labels of an uninterrupted run and compute each
block of the interrupted pass once more only if it was not finished.
"""

import os
import sys

import numpy as np
import pytest

from synjax.inference.block_grid import BlockGrid
from synjax.io import create_volume, layout, open_volume
from synjax.pipelines import neuron_volume
from synjax.postprocess import blockwise_passes
from synjax.postprocess.blockwise_watershed import segment_blockwise
from tests.conftest import REPO_ROOT
from tests.interrupt_hooks import Hook, Interrupted, kill_when_hanging
from tests.test_blockwise_post import _cells

SHAPE = (12, 32, 40)
BLOCK = (6, 16, 20)  # 2 x 2 x 2 blocks
NUM_BLOCKS = 8
CHOSEN = {"sigma": 0.8, "h": 0.08, "threshold": 0.78}
MADE_FROM = {"model": "test", "step": 1}


def _Hook(monkeypatch, name: str, fail_at: int | None = None) -> Hook:
    """A `Hook` on a per-block function of `blockwise_passes`."""
    return Hook(monkeypatch, blockwise_passes, name, fail_at)


@pytest.fixture
def boundary_path(tmp_path):
    path = tmp_path / "boundaries.zarr"
    volume = create_volume(str(path), SHAPE, np.float32, resolution=(8.0, 4.0, 4.0))
    volume[...] = _cells(SHAPE).astype(np.float32)
    return path


def _segment(boundary_path, path, chosen=CHOSEN):
    neuron_volume.segment_volume(
        boundary_path,
        path,
        chosen,
        "2d",
        boundary_provenance=MADE_FROM,
        block_shape=BLOCK,
        halo=4,
    )
    return open_volume(str(path)).read()


def _passes(path):
    return layout.blocks_manifest(path) / neuron_volume.PASSES_STATE


def test_killed_in_the_watershed_pass_goes_on_from_the_blocks_done(
    boundary_path, tmp_path, monkeypatch
):
    reference = _segment(boundary_path, tmp_path / "reference.zarr")
    # The check bites: the agglomeration merges some segments and leaves several.
    assert len(np.unique(reference)) > 5
    fragments = _Hook(monkeypatch, "_fragment_block", fail_at=5)
    path = tmp_path / "seg.zarr"
    with pytest.raises(Interrupted):
        _segment(boundary_path, path)
    assert fragments.calls == 5 and _passes(path).is_dir()
    fragments.reset()
    np.testing.assert_array_equal(_segment(boundary_path, path), reference)
    # Blocks 0-3 were done; block 4 (interrupted) and 5-7 are computed, once each.
    assert fragments.calls == NUM_BLOCKS - 4
    # Finished: the state is gone, the segmentation recorded as done and reused as it is.
    assert not _passes(path).exists()
    fragments.reset()
    np.testing.assert_array_equal(_segment(boundary_path, path), reference)
    assert fragments.calls == 0


# The per-block functions of the passes, in the order they run.
PASSES = ("_range_block", "_fragment_block", "stitch", "_contact_block", "_relabel_block")
CALLS_PER_RUN = {"_range_block": 8, "_fragment_block": 8, "stitch": 1, "_contact_block": 8}


@pytest.mark.parametrize(
    "hook,fail_at",
    [
        ("_range_block", 3),
        ("stitch", 1),
        ("_contact_block", 5),
        ("_relabel_block", 4),
    ],
)
def test_killed_in_any_pass_goes_on_from_there(boundary_path, tmp_path, monkeypatch, hook, fail_at):
    reference = _segment(boundary_path, tmp_path / "reference.zarr")
    hooks = {name: _Hook(monkeypatch, name) for name in PASSES}
    hooks[hook].reset(fail_at=fail_at)
    path = tmp_path / "seg.zarr"
    with pytest.raises(Interrupted):
        _segment(boundary_path, path)
    for name in PASSES:
        hooks[name].reset()
    # Relabelling in place twice would map final ids again: equality shows it did not happen.
    np.testing.assert_array_equal(_segment(boundary_path, path), reference)
    # The passes before the interrupted one are not run again; in it, only the blocks
    # from the interrupted one on (a pass over the whole volume, the stitching, runs again).
    done_before = fail_at - 1 if hook != "stitch" else 0
    interrupted = PASSES.index(hook)
    for position, name in enumerate(PASSES):
        total = CALLS_PER_RUN.get(name, NUM_BLOCKS)
        expected = 0 if position < interrupted else total
        if name == hook:
            expected = total - done_before
        assert hooks[name].calls == expected, name


def test_a_state_made_with_other_parameters_is_not_reused(boundary_path, tmp_path, monkeypatch):
    other = {**CHOSEN, "h": 0.2}
    reference = _segment(boundary_path, tmp_path / "reference.zarr", other)
    assert not np.array_equal(reference, _segment(boundary_path, tmp_path / "first.zarr"))
    boundary = open_volume(str(boundary_path))
    dest = np.zeros(SHAPE, np.uint64)
    state = tmp_path / "state"
    fragments = _Hook(monkeypatch, "_fragment_block", fail_at=6)
    kwargs = dict(halo=4, smoothing="2d", threshold=CHOSEN["threshold"], state=state)
    with pytest.raises(Interrupted):
        segment_blockwise(boundary, dest, BLOCK, CHOSEN["sigma"], CHOSEN["h"], **kwargs)
    fragments.reset()
    segment_blockwise(boundary, dest, BLOCK, other["sigma"], other["h"], **kwargs)
    assert fragments.calls == NUM_BLOCKS  # nothing of the state for h = 0.08 was taken
    np.testing.assert_array_equal(dest, reference)


_KILLED_JOB = """
import pathlib, sys, time
import numpy as np
from synjax.io import open_volume
from synjax.postprocess import blockwise_passes, blockwise_watershed

work, hook, hang_at = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real, calls = getattr(blockwise_passes, hook), [0]

def hanging(*args, **kwargs):
    calls[0] += 1
    if calls[0] == hang_at:
        (work / "hanging").touch()
        time.sleep(600)  # killed here
    return real(*args, **kwargs)

setattr(blockwise_passes, hook, hanging)
blockwise_watershed.segment_blockwise(
    open_volume(str(work / "boundaries.zarr")), open_volume(str(work / "seg.zarr"), mode="r+"),
    (6, 16, 20), 0.8, 0.08, halo=4, smoothing="2d", threshold=0.78, state=work / "state",
)
"""


@pytest.mark.parametrize("hook", ["_fragment_block", "_relabel_block"])
def test_sigkilled_segmentation_restarted_equals_an_uninterrupted_one(
    boundary_path, tmp_path, monkeypatch, hook
):
    boundary = open_volume(str(boundary_path))
    args = (BLOCK, CHOSEN["sigma"], CHOSEN["h"])
    kwargs = dict(halo=4, smoothing="2d", threshold=CHOSEN["threshold"])
    reference = np.zeros(SHAPE, np.uint64)
    segment_blockwise(boundary, reference, *args, **kwargs)
    dest = create_volume(str(tmp_path / "seg.zarr"), SHAPE, np.uint64, chunks=BLOCK)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    kill_when_hanging([sys.executable, "-c", _KILLED_JOB, str(tmp_path), hook, "4"], tmp_path, env)
    counted = _Hook(monkeypatch, hook)
    dest = open_volume(str(tmp_path / "seg.zarr"), mode="r+")
    segment_blockwise(boundary, dest, *args, **kwargs, state=tmp_path / "state")
    np.testing.assert_array_equal(dest.read(), reference)
    # Killed in block 4 of the pass: blocks 1-3 (0-based 0-2) stay done.
    assert counted.calls == NUM_BLOCKS - 3
    assert not (tmp_path / "state").exists()


def test_relabel_units_are_the_chunks_of_the_destination(boundary_path, tmp_path, monkeypatch):
    """Relabelling is in place, so a unit is rewritten whole: chunks finer than blocks are units."""
    boundary = open_volume(str(boundary_path))
    reference = np.zeros(SHAPE, np.uint64)
    kwargs = dict(halo=4, smoothing="2d", threshold=CHOSEN["threshold"])
    segment_blockwise(boundary, reference, BLOCK, CHOSEN["sigma"], CHOSEN["h"], **kwargs)
    chunks = (6, 8, 20)
    dest = create_volume(str(tmp_path / "seg.zarr"), SHAPE, np.uint64, chunks=chunks)
    relabelled = _Hook(monkeypatch, "_relabel_block", fail_at=7)
    state = tmp_path / "state"
    with pytest.raises(Interrupted):
        segment_blockwise(
            boundary, dest, BLOCK, CHOSEN["sigma"], CHOSEN["h"], **kwargs, state=state
        )
    relabelled.reset()
    segment_blockwise(boundary, dest, BLOCK, CHOSEN["sigma"], CHOSEN["h"], **kwargs, state=state)
    units = BlockGrid(SHAPE, chunks).num_blocks
    assert units == 2 * NUM_BLOCKS and relabelled.calls == units - 6
    np.testing.assert_array_equal(dest.read(), reference)
