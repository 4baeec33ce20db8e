"""Block-wise prediction resumes only blocks made by the same model and input (provenance)."""

import json

import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.inference.block_grid import BlockGrid
from synjax.inference.blockwise import BlockManifest, manifest_differences, predict_blockwise
from tests.test_blockwise import (
    BLOCK,
    CONTEXT,
    VOLUME,
    FailAfter,
    RecordingVolume,
    _crop_affine,
    _manifest_ids,
    _volume,
)

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
