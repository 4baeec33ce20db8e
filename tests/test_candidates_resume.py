"""Block-wise candidates killed part-way and started again: finished work is not redone.

`generate_candidates_blockwise` with a state folder keeps what each pass
finished (`blockwise_pass_state`). A run interrupted in any pass (the pre or
post labelling, its joins, its in-place relabelling, the overlaps, the
adjacency or the closest points of a batch of site pairs), by an exception
from a test hook or by SIGKILL in a subprocess, and then started again must
find exactly the candidates of an uninterrupted run, write exactly its site
labels, and compute again only the blocks (or batches) that were not
finished.
"""

import dataclasses
import os
import sys

import ml_collections
import numpy as np
import pytest

from synjax.inference.block_grid import BlockGrid
from synjax.io import create_volume, open_volume
from synjax.pipelines import partner_data, partner_volume
from synjax.postprocess import blockwise_candidates, blockwise_components
from synjax.postprocess.blockwise_candidates import generate_candidates_blockwise
from synjax.postprocess.candidates import DEFAULT_MAX_GAP_NM
from tests.conftest import REPO_ROOT
from tests.interrupt_hooks import Hook, Interrupted, kill_when_hanging
from tests.test_partner_volume_synapses import _small_config

BLOCK = (6, 48, 48)
PAIR_BATCH = 2  # several batches of site pairs on this small volume
TAU, OMEGA = 0.3, 20
MADE_FROM = {"proximity": "test", "segmentation": "test"}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """On-disk proximity (target plus noise) and neurons of a synthetic volume."""
    config = _small_config()
    volume = partner_data.load_volume(config, "test")
    target = partner_data.proximity_targets(volume, config)["target"]
    noise = np.random.default_rng(0).normal(0.0, 0.05, target.shape)
    where = tmp_path_factory.mktemp("inputs")
    prox = create_volume(str(where / "prox.zarr"), target.shape, np.float32)
    prox[...] = (target + noise).astype(np.float32)
    seg = create_volume(str(where / "seg.zarr"), target.shape, np.uint64)
    seg[...] = volume.neuron_ids.astype(np.uint64)
    return where, volume.resolution


def _sites(where, shape):
    # Chunks of one block: the relabelling's units are the blocks.
    return [
        create_volume(str(where / name), shape, np.uint64, chunks=BLOCK, overwrite=True)
        for name in ("pre.zarr", "post.zarr")
    ]


def _find(inputs, sites, state=None, tau=TAU):
    where, resolution = inputs
    prox, seg = open_volume(str(where / "prox.zarr")), open_volume(str(where / "seg.zarr"))
    return generate_candidates_blockwise(
        prox,
        seg,
        resolution,
        *sites,
        BLOCK,
        tau=tau,
        omega=OMEGA,
        state=state,
        provenance=MADE_FROM,
    )


def _assert_same(got, expected, sites, expected_sites):
    for field in dataclasses.fields(expected):
        np.testing.assert_array_equal(
            getattr(got, field.name), getattr(expected, field.name), err_msg=field.name
        )
    for labels, expected_labels in zip(sites, expected_sites, strict=True):
        np.testing.assert_array_equal(np.asarray(labels[...]), expected_labels)


@pytest.fixture(autouse=True)
def _small_pair_batches(monkeypatch):
    monkeypatch.setattr(blockwise_candidates, "PAIR_BATCH", PAIR_BATCH)


@pytest.fixture(scope="module")
def reference(volumes, tmp_path_factory):
    """An uninterrupted run without state: candidates, site labels and site pairs looked at."""
    real, pairs = blockwise_candidates.near_site_pairs, []

    def counted(*args, **kwargs):
        found = real(*args, **kwargs)
        pairs.append(len(found[0]))
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blockwise_candidates, "PAIR_BATCH", PAIR_BATCH)
        patch.setattr(blockwise_candidates, "near_site_pairs", counted)
        shape = open_volume(str(volumes[0] / "prox.zarr")).shape
        sites = _sites(tmp_path_factory.mktemp("reference"), shape)
        found = _find(volumes, sites)
    assert len(found) >= 3  # there are rows to compare
    return found, [np.asarray(labels[...]) for labels in sites], pairs[0]


HOOKS = {
    "_label_block": blockwise_components,
    "_join_block": blockwise_components,
    "_relabel_block": blockwise_components,
    "_overlap_block": blockwise_components,
    "_adjacency_block": blockwise_components,
    "_pair_rows": blockwise_candidates,
}


def _calls_in_order(num_blocks: int, num_batches: int) -> list[tuple[str, int]]:
    """The hooks' calls of one uninterrupted run, pass by pass, in the order they run."""
    labelling = [("_label_block", num_blocks), ("_join_block", num_blocks)]
    labelling += [("_relabel_block", num_blocks)]  # units: chunks of one block
    overlaps = [("_overlap_block", num_blocks)] * 2
    return (
        labelling * 2 + overlaps + [("_adjacency_block", num_blocks), ("_pair_rows", num_batches)]
    )


def _expected_after_restart(order, hook: str, fail_at: int) -> dict[str, int]:
    """Calls of a rerun: none in passes finished, the rest of the interrupted one, all after."""
    expected = dict.fromkeys(HOOKS, 0)
    seen, interrupted = 0, None
    for position, (name, count) in enumerate(order):
        if interrupted is not None and position > interrupted:
            expected[name] += count
        elif name == hook and interrupted is None:
            if seen + count >= fail_at:
                interrupted = position
                # The blocks before the interrupted one stay done.
                expected[name] += count - (fail_at - seen - 1)
            seen += count
    assert interrupted is not None
    return expected


@pytest.mark.parametrize(
    "hook,fail_at",
    [
        ("_label_block", 3),  # pre labelling, block 2
        ("_label_block", 8 + 5),  # post labelling, block 4
        ("_join_block", 6),
        ("_relabel_block", 4),
        ("_relabel_block", 8 + 7),
        ("_overlap_block", 8 + 2),
        ("_adjacency_block", 5),
        ("_pair_rows", 2),
    ],
)
def test_killed_in_any_pass_goes_on_from_there(
    volumes, reference, tmp_path, monkeypatch, hook, fail_at
):
    expected, expected_sites, num_pairs = reference
    shape = open_volume(str(volumes[0] / "prox.zarr")).shape
    num_blocks = BlockGrid(shape, BLOCK).num_blocks
    assert num_blocks == 8
    num_batches = -(-num_pairs // PAIR_BATCH)
    assert num_batches >= 2  # the pair pass stops part-way
    hooks = {name: Hook(monkeypatch, module, name) for name, module in HOOKS.items()}
    hooks[hook].reset(fail_at=fail_at)
    sites = _sites(tmp_path, shape)
    state = tmp_path / "state"
    with pytest.raises(Interrupted):
        _find(volumes, sites, state)
    assert state.is_dir()
    for counted in hooks.values():
        counted.reset()
    # Relabelling a block twice would map its ids again: equal labels show it did not happen.
    _assert_same(_find(volumes, sites, state), expected, sites, expected_sites)
    wanted = _expected_after_restart(_calls_in_order(num_blocks, num_batches), hook, fail_at)
    assert {name: counted.calls for name, counted in hooks.items()} == wanted
    assert not state.exists()  # finished: removed


def test_a_state_made_with_other_parameters_is_not_reused(volumes, tmp_path, monkeypatch):
    shape = open_volume(str(volumes[0] / "prox.zarr")).shape
    other_tau = 0.4
    other_sites = _sites(tmp_path / "other", shape)
    other = _find(volumes, other_sites, tau=other_tau)
    first = _find(volumes, _sites(tmp_path / "first", shape))
    assert len(other) != len(first) or np.any(other.score != first.score)  # tau matters
    labels = Hook(monkeypatch, blockwise_components, "_label_block", fail_at=8 + 6)
    overlaps = Hook(monkeypatch, blockwise_components, "_overlap_block")
    sites, state = _sites(tmp_path, shape), tmp_path / "state"
    with pytest.raises(Interrupted):
        _find(volumes, sites, state)
    labels.reset()
    _assert_same(
        _find(volumes, sites, state, tau=other_tau),
        other,
        sites,
        [np.asarray(v[...]) for v in other_sites],
    )
    # Nothing of the state for tau = 0.3 was taken: every block labelled for pre and post.
    assert labels.calls == 2 * 8 and overlaps.calls == 2 * 8


_KILLED_JOB = f"""
import pathlib, sys, time
from synjax.io import open_volume
from synjax.postprocess import blockwise_candidates, blockwise_components

work, inputs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
hook, hang_at = sys.argv[3], int(sys.argv[4])
module = blockwise_candidates if hook == "_pair_rows" else blockwise_components
real, calls = getattr(module, hook), [0]

def hanging(*args, **kwargs):
    calls[0] += 1
    if calls[0] == hang_at:
        (work / "hanging").touch()
        time.sleep(600)  # killed here
    return real(*args, **kwargs)

setattr(module, hook, hanging)
blockwise_candidates.PAIR_BATCH = {PAIR_BATCH}
resolution = [float(r) for r in sys.argv[5:8]]
blockwise_candidates.generate_candidates_blockwise(
    open_volume(str(inputs / "prox.zarr")), open_volume(str(inputs / "seg.zarr")), resolution,
    open_volume(str(work / "pre.zarr"), mode="r+"), open_volume(str(work / "post.zarr"), mode="r+"),
    {BLOCK!r}, tau={TAU!r}, omega={OMEGA!r}, state=work / "state", provenance={MADE_FROM!r},
)
"""


@pytest.mark.parametrize("hook,hang_at,expected_calls", [("_relabel_block", 4, 8 - 3)])
def test_sigkilled_candidates_restarted_equal_an_uninterrupted_run(
    volumes, reference, tmp_path, monkeypatch, hook, hang_at, expected_calls
):
    expected, expected_sites, _ = reference
    inputs, resolution = volumes
    sites = _sites(tmp_path, open_volume(str(inputs / "prox.zarr")).shape)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", _KILLED_JOB, str(tmp_path), str(inputs), hook, str(hang_at)]
    kill_when_hanging(command + [str(float(r)) for r in resolution], tmp_path, env)
    module = blockwise_candidates if hook == "_pair_rows" else blockwise_components
    counted = Hook(monkeypatch, module, hook)
    _assert_same(_find(volumes, sites, tmp_path / "state"), expected, sites, expected_sites)
    # Killed in the pre labels' relabelling at unit 4: units 1-3 stay done; the post
    # labels' relabelling runs whole.
    assert counted.calls == expected_calls + 8
    assert not (tmp_path / "state").exists()


# ------------------------------------------------- the own-volume partner pipeline's steps


def _partner_config():
    return ml_collections.ConfigDict(
        {
            "candidates": {"tau": TAU, "omega": OMEGA, "max_gap_nm": DEFAULT_MAX_GAP_NM},
            "predict": {"input": "in.zarr", "segmentation": ""},
        }
    )


def test_partner_volume_candidates_resume_beside_the_outputs(
    volumes, reference, tmp_path, monkeypatch
):
    expected, expected_sites, _ = reference
    where, resolution = volumes
    prox = create_volume(
        str(tmp_path / "proximity.zarr"),
        open_volume(str(where / "prox.zarr")).shape,
        np.float32,
        resolution=resolution,
    )
    prox[...] = open_volume(str(where / "prox.zarr"))[...]
    prox = open_volume(str(tmp_path / "proximity.zarr"))
    seg = open_volume(str(where / "seg.zarr"))
    config = _partner_config()
    made_from = partner_volume.candidates_provenance(config, tmp_path / "proximity.zarr", prox, seg)
    overlaps = Hook(monkeypatch, blockwise_components, "_overlap_block", fail_at=8 + 3)
    labels = Hook(monkeypatch, blockwise_components, "_label_block")
    with pytest.raises(Interrupted):
        partner_volume.find_candidates(config, BLOCK, prox, seg, tmp_path, made_from)
    state = tmp_path / partner_volume.CANDIDATES_STATE
    assert state.is_dir()
    overlaps.reset()
    labels.reset()
    found = partner_volume.find_candidates(config, BLOCK, prox, seg, tmp_path, made_from)
    sites = [
        open_volume(str(tmp_path / name))
        for name in (partner_volume.PRE_SITES_OUTPUT, partner_volume.POST_SITES_OUTPUT)
    ]
    _assert_same(found, expected, sites, expected_sites)
    # The site volumes were reused, not made afresh: no block labelled again.
    assert labels.calls == 0 and overlaps.calls == 8 - 2
    # Kept for the pruner's scoring (a kill there does not redo the candidates).
    assert state.is_dir()
    again = partner_volume.find_candidates(config, BLOCK, prox, seg, tmp_path, made_from)
    assert overlaps.calls == 8 - 2 and len(again) == len(expected)
    # Another segmentation (its fingerprint differs): nothing of the state is reused.
    other = np.asarray(seg[...]).copy()
    other[other == other.max()] = 0
    other_made_from = partner_volume.candidates_provenance(config, tmp_path, prox, other)
    assert other_made_from["segmentation"] != made_from["segmentation"]
    overlaps.reset()
    partner_volume.find_candidates(config, BLOCK, prox, other, tmp_path, other_made_from)
    assert overlaps.calls == 2 * 8


class _FakePruner:
    """Stands for `PrunerStage`: a score per candidate from its ids, calls and rows counted."""

    def __init__(self, batch_size: int, fail_at: int | None = None):
        self.settings = ml_collections.ConfigDict({"train": {"batch_size": batch_size}})
        self.calls, self.rows, self.fail_at = 0, [], fail_at

    def score(self, trained, raw, proximity, segmentation, candidates, name="raw"):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupted("score")
        self.rows.append(len(candidates))
        return (candidates.pre_component * 1000 + candidates.post_component) / 7.0


def test_pruner_scores_resume_in_parts_of_whole_batches(reference, tmp_path, monkeypatch):
    expected, _, _ = reference
    monkeypatch.setattr(partner_volume, "SCORE_BATCHES", 1)
    n = len(expected)
    batch = 2
    assert n > 2 * batch  # at least three parts
    wanted = (expected.pre_component * 1000 + expected.post_component) / 7.0
    state = tmp_path / partner_volume.SCORES_STATE
    args = (None, None, None, None, expected, "in.zarr", state, MADE_FROM)
    pruner = _FakePruner(batch, fail_at=3)
    with pytest.raises(Interrupted):
        partner_volume.score_candidates(pruner, *args)
    assert pruner.rows == [batch, batch]  # whole batches, as one call over all would make them
    pruner = _FakePruner(batch)
    np.testing.assert_array_equal(partner_volume.score_candidates(pruner, *args), wanted)
    # The two parts scored before are read back; the others are scored once.
    assert pruner.calls == -(-n // batch) - 2
    # Candidates of another run (as many, other ids): none of the kept parts is taken.
    other = dataclasses.replace(expected, post_component=expected.post_component + 1)
    pruner = _FakePruner(batch)
    scores = partner_volume.score_candidates(pruner, *args[:4], other, *args[5:])
    assert pruner.calls == -(-n // batch)
    np.testing.assert_array_equal(scores, (other.pre_component * 1000 + other.post_component) / 7.0)
