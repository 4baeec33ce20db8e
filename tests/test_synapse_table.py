"""Tests of `SynapseTable`: construction, filtering, CSV and CREMI annotations."""

import os

import numpy as np
import pytest

from synjax.errors import DataError
from synjax.io.cremi_volume import Annotations
from synjax.io.synapse_table import CSV_HEADER, SynapseTable

MAX_ID = 2**64 - 1


def _table():
    return SynapseTable(
        pre_segment=np.array([1, MAX_ID, 7], np.uint64),
        post_segment=np.array([2, 3, 2**63 + 1], np.uint64),
        location=np.array([[0.1, 1.0, 2.0], [10.0, 11.5, 12.0], [1e-9, -4.0, 1e12]]),
        pre_location=np.array([[0.0, 1.0, 2.0], [9.0, 11.0, 12.0], [0.0, -4.0, 1e12]]),
        post_location=np.array([[0.2, 1.0, 2.0], [11.0, 12.0, 12.0], [2e-9, -4.0, 1e12]]),
        score=np.array([0.9, 0.25, 1 / 3]),
        size=np.array([0, 120, 7]),
        kind=np.array(["partner", "instance", 'odd, "quoted" kind'], dtype=object),
    )


def _assert_tables_equal(a, b):
    assert len(a) == len(b)
    for name in CSV_HEADER:
        if name in ("pre_segment", "post_segment", "score", "size", "kind"):
            assert getattr(a, name).dtype == getattr(b, name).dtype
            assert getattr(a, name).tolist() == getattr(b, name).tolist()
    for name in ("location", "pre_location", "post_location"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_csv_round_trip_is_exact(tmp_path):
    table = _table()
    table.to_csv(tmp_path / "s.csv")
    back = SynapseTable.from_csv(tmp_path / "s.csv")
    _assert_tables_equal(back, table)
    assert back.pre_segment[1] == np.uint64(MAX_ID)
    assert back.score[2] == 1 / 3
    assert os.listdir(tmp_path) == ["s.csv"]


def test_empty_csv_round_trip(tmp_path):
    SynapseTable.empty().to_csv(tmp_path / "e.csv")
    back = SynapseTable.from_csv(tmp_path / "e.csv")
    assert len(back) == 0 and back.location.shape == (0, 3)


def test_csv_write_is_atomic(tmp_path):
    _table().to_csv(tmp_path / "s.csv")
    before = (tmp_path / "s.csv").read_bytes()

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot format kind")

    broken = _table()
    broken.kind[2] = Unprintable()
    with pytest.raises(RuntimeError, match="cannot format kind"):
        broken.to_csv(tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_bytes() == before
    assert os.listdir(tmp_path) == ["s.csv"]


def test_from_csv_errors(tmp_path):
    with pytest.raises(DataError, match=r"synapse table not found: .*none\.csv"):
        SynapseTable.from_csv(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("pre_segment,post_segment\n1,2\n")
    with pytest.raises(DataError, match=r"bad\.csv: not a synapse table CSV .*'kind'"):
        SynapseTable.from_csv(tmp_path / "bad.csv")
    _table().to_csv(tmp_path / "s.csv")
    text = (tmp_path / "s.csv").read_text().replace("0.25", "abc")
    (tmp_path / "s.csv").write_text(text)
    with pytest.raises(DataError, match=r"s\.csv: bad value"):
        SynapseTable.from_csv(tmp_path / "s.csv")


def test_filter_select_concatenate():
    table = _table()
    kept = table.filter_by_score(0.3)
    assert kept.pre_segment.tolist() == [1, 7]
    assert kept.kind.tolist() == ["partner", 'odd, "quoted" kind']
    assert len(table.filter_by_score(0.95)) == 0
    both = SynapseTable.concatenate([table.select(np.array([2])), kept])
    assert both.size.tolist() == [7, 0, 7]
    np.testing.assert_array_equal(both.location[1], [0.1, 1.0, 2.0])


def test_build_defaults_and_checks():
    table = SynapseTable.build([4, 5], [6, 7], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], score=0.5)
    np.testing.assert_array_equal(table.pre_location, table.location)
    assert table.score.tolist() == [0.5, 0.5] and table.size.tolist() == [0, 0]
    assert table.kind.tolist() == ["partner", "partner"]
    with pytest.raises(DataError, match=r"column post_segment has 1 rows, pre_segment has 2"):
        SynapseTable.build([4, 5], [6], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    with pytest.raises(DataError, match=r"column location must be \[2, 3\]"):
        SynapseTable(
            [1, 2],
            [3, 4],
            np.zeros((2, 2)),
            np.zeros((2, 3)),
            np.zeros((2, 3)),
            [0, 0],
            [0, 0],
            ["a", "b"],
        )


def test_annotations_round_trip():
    table = _table()
    annotations = table.to_annotations(first_id=100)
    assert annotations.ids.tolist() == [100, 101, 102, 103, 104, 105]
    assert annotations.types.tolist() == ["presynaptic_site", "postsynaptic_site"] * 3
    assert annotations.partners.tolist() == [[100, 101], [102, 103], [104, 105]]
    np.testing.assert_array_equal(annotations.locations[3], table.post_location[1])
    back = SynapseTable.from_annotations(annotations)
    np.testing.assert_array_equal(back.pre_location, table.pre_location)
    np.testing.assert_array_equal(back.post_location, table.post_location)
    np.testing.assert_array_equal(back.location, (table.pre_location + table.post_location) / 2)
    assert back.pre_segment.tolist() == [0, 0, 0]


def test_from_annotations_looks_up_segments():
    annotations = Annotations(
        ids=np.array([5, 6], np.uint64),
        # In voxels of (40, 4, 4) nm after the (100, 0, 0) offset: (1, 2, 3) and (0, 1, 1).
        locations=np.array([[140.0, 8.0, 12.0], [100.0, 4.0, 4.0]]),
        types=np.array(["presynaptic_site", "postsynaptic_site"], dtype=object),
        partners=np.array([[5, 6]], np.uint64),
    )
    segmentation = np.arange(2 * 3 * 4, dtype=np.uint64).reshape(2, 3, 4)
    table = SynapseTable.from_annotations(
        annotations, segmentation, resolution=(40, 4, 4), offset=(100, 0, 0)
    )
    assert table.pre_segment.tolist() == [1 * 12 + 2 * 4 + 3]
    assert table.post_segment.tolist() == [0 * 12 + 1 * 4 + 1]
    np.testing.assert_array_equal(table.location, [[120.0, 6.0, 8.0]])
