"""Atomic, durable writes (synjax.io.atomic) and the result writers that use them.

Durability is checked by watching the system calls: the temporary file must be
fsync'ed before it is renamed over the target, and the folder after.
"""

import os
import pathlib
import types

import numpy as np
import pytest

from synjax.io import CremiVolume, SynapseTable, read_cremi, write_cremi
from synjax.io.atomic import atomic_open, atomic_path, write_bytes_atomic, write_text_atomic
from synjax.report import files, slices


def _spy(monkeypatch) -> list[tuple]:
    """Records ("fsync", path) and ("replace", src, dst) in call order, then calls through."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _assert_durable_replace(events: list[tuple], target: pathlib.Path) -> str:
    """The temporary file of `target` was fsync'ed, renamed over it, then its folder fsync'ed."""
    target = os.path.abspath(target)
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == target]
    assert len(renames) == 1, events
    at = renames[0]
    temporary = events[at][1]
    assert os.path.dirname(temporary) == os.path.dirname(target)
    name = os.path.basename(target)
    assert os.path.basename(temporary).startswith(f".{name}.")
    assert temporary.endswith(".tmp") and temporary != os.path.join(
        os.path.dirname(target), f".{name}.tmp"
    ), "a fixed temporary name is shared by concurrent writers"
    assert ("fsync", temporary) in events[:at], "renamed before its data was fsync'ed"
    assert ("fsync", os.path.dirname(target)) in events[at + 1 :], "folder not fsync'ed"
    return temporary


def _leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_path_unique_names_fsync_then_rename(tmp_path, monkeypatch):
    events = _spy(monkeypatch)
    target = tmp_path / "sub" / "out.bin"
    # Two writers of the same file at once get two temporary files.
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        assert first.parent == second.parent == target.parent  # folder created
        first.write_bytes(b"first")
        second.write_bytes(b"second")
        assert not target.exists()  # nothing is visible before the commit
    # The inner context commits first, the outer one last.
    assert target.read_bytes() == b"first"
    renames = [e for e in events if e[0] == "replace"]
    assert [e[1] for e in renames] == [str(second), str(first)]
    assert ("fsync", str(second)) in events[: events.index(renames[0])]
    assert ("fsync", str(first)) in events[: events.index(renames[1])]
    assert _leftovers(target.parent) == []


def test_failure_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(target, "w") as stream:
            stream.write("half of the new")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_failed_rename_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "t.txt"
    target.write_text("old")

    def refuse(src, dst, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="read-only"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_permissions_follow_the_umask(tmp_path):
    # mkstemp makes owner-only files; results must be as readable as open() makes them.
    mask = os.umask(0o022)
    try:
        path = write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    finally:
        os.umask(mask)
    assert path.read_bytes() == b"\x00\x01"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~mask)


def _table() -> SynapseTable:
    return SynapseTable.build(
        np.array([1, 2], np.uint64),
        np.array([3, 4], np.uint64),
        np.array([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]),
        pre_location=np.array([[9.0, 20.0, 30.0], [39.0, 50.0, 60.0]]),
        post_location=np.array([[11.0, 20.0, 30.0], [41.0, 50.0, 60.0]]),
        score=np.array([0.25, 0.75]),
        size=np.array([5, 6]),
        kind="partner",
    )


def _write_json(path):
    files.write_json(path, {"a": np.float32(0.5)})


def _write_csv(path):
    _table().to_csv(path)


def _write_cremi(path):
    write_cremi(
        path,
        CremiVolume(raw=np.zeros((2, 3, 4), np.uint8), resolution=(40.0, 4.0, 4.0)),
        overwrite=True,
    )


def _write_slices(path):
    raw = np.random.default_rng(0).integers(0, 255, (3, 16, 16), dtype=np.uint8)
    slices.plot_slices(raw, {"labels": (raw > 128).astype(np.uint32)}, path, [1])


def _write_precision_recall(path):
    from synjax.evaluation import partners
    from synjax.report.precision_recall import plot_precision_recall

    def at(threshold):
        return types.SimpleNamespace(tp=1, fp=0, fn=1)

    curve = partners.precision_recall_curve(np.array([0.2, 0.8]), at, np.array([0.2, 0.8]))
    plot_precision_recall(curve, path)


WRITERS = {
    "metrics.json": _write_json,
    "synapses.csv": _write_csv,
    "synapses.h5": _write_cremi,
    "example_slices.png": _write_slices,
    "precision_recall.png": _write_precision_recall,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_result_writers_are_atomic_and_durable(tmp_path, monkeypatch, name):
    target = tmp_path / name
    # The name a fixed-name writer would use, held by some other writer.
    foreign = tmp_path / f".{name}.tmp"
    foreign.write_bytes(b"another writer's data")
    events = _spy(monkeypatch)
    WRITERS[name](target)
    _assert_durable_replace(events, target)
    assert target.stat().st_size > 0
    assert foreign.read_bytes() == b"another writer's data"
    assert _leftovers(tmp_path) == [foreign.name]


def test_written_results_read_back(tmp_path):
    # The writers still write what their readers expect.
    _write_csv(tmp_path / "s.csv")
    back = SynapseTable.from_csv(tmp_path / "s.csv")
    np.testing.assert_array_equal(back.score, [0.25, 0.75])
    _write_cremi(tmp_path / "c.h5")
    assert read_cremi(tmp_path / "c.h5").raw.shape == (2, 3, 4)
    _write_json(tmp_path / "m.json")
    assert files.read_json(tmp_path / "m.json") == {"a": 0.5}
