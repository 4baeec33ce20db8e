"""Tests of the CREMI reader/writer, `cleft_instances` and `partner_table`."""

import os

import h5py
import numpy as np
import pytest

from synjax.errors import DataError
from synjax.io import cremi, open_volume
from synjax.io.cremi import (
    cleft_instance_ids,
    cleft_instances,
    partner_table,
    read_cremi,
    write_cremi,
)
from synjax.io.cremi_volume import CREMI_BACKGROUND, Annotations, CremiVolume

RESOLUTION = (40.0, 4.0, 4.0)
OFFSET = (400.0, 40.0, 80.0)
SHAPE = (3, 4, 5)


def _annotations():
    return Annotations(
        ids=np.array([10, 11, 12, 20], np.uint64),
        locations=np.array(
            [[440.0, 48.0, 88.0], [440.0, 52.0, 92.0], [480.0, 44.0, 84.0], [400.0, 40.0, 80.0]]
        ),
        types=np.array(
            ["presynaptic_site", "postsynaptic_site", "postsynaptic_site", "presynaptic_site"],
            dtype=object,
        ),
        partners=np.array([[10, 11], [10, 12], [20, 11]], np.uint64),
    )


def _volume():
    rng = np.random.default_rng(0)
    clefts = np.full(SHAPE, CREMI_BACKGROUND, np.uint64)
    clefts[1, 1:3, 2] = 5
    return CremiVolume(
        raw=rng.integers(0, 256, SHAPE, dtype=np.uint8),
        resolution=RESOLUTION,
        offset=OFFSET,
        neuron_ids=np.arange(np.prod(SHAPE), dtype=np.uint64).reshape(SHAPE) + np.uint64(2**63),
        clefts=clefts,
        annotations=_annotations(),
        labels={"mitochondria": np.ones(SHAPE, np.uint32)},
    )


def test_round_trip_keeps_every_value(tmp_path):
    volume = _volume()
    write_cremi(tmp_path / "c.hdf", volume)
    back = read_cremi(tmp_path / "c.hdf")
    assert back.resolution == RESOLUTION and back.offset == OFFSET
    np.testing.assert_array_equal(back.raw, volume.raw)
    np.testing.assert_array_equal(back.neuron_ids, volume.neuron_ids)
    np.testing.assert_array_equal(back.clefts, volume.clefts)
    assert back.clefts.dtype == np.uint64 and back.clefts[0, 0, 0] == CREMI_BACKGROUND
    assert list(back.labels) == ["mitochondria"]
    assert back.labels["mitochondria"].dtype == np.uint32
    for field in ("ids", "locations", "partners"):
        np.testing.assert_array_equal(
            getattr(back.annotations, field), getattr(volume.annotations, field)
        )
    assert back.annotations.types.tolist() == volume.annotations.types.tolist()


def test_written_layout_matches_cremi_python(tmp_path):
    write_cremi(tmp_path / "c.h5", _volume())
    with h5py.File(tmp_path / "c.h5", "r") as file:
        assert file.attrs["file_format"] == "0.2"
        for key in ("volumes/raw", "volumes/labels/neuron_ids", "volumes/labels/clefts"):
            np.testing.assert_array_equal(file[key].attrs["resolution"], RESOLUTION)
            np.testing.assert_array_equal(file[key].attrs["offset"], OFFSET)
        assert file["volumes/raw"].dtype == np.uint8
        assert file["volumes/labels/neuron_ids"].dtype == np.uint64
        assert h5py.check_string_dtype(file["annotations/types"].dtype).encoding == "utf-8"
        # Locations are stored relative to the annotations group's offset.
        np.testing.assert_array_equal(file["annotations"].attrs["offset"], OFFSET)
        np.testing.assert_array_equal(file["annotations/locations"][0], [40.0, 8.0, 8.0])
        assert file["annotations/presynaptic_site/partners"].shape == (3, 2)
        assert file["annotations/presynaptic_site/partners"].dtype == np.uint64


def test_reads_annotations_as_cremi_writes_them(tmp_path):
    # cremi_python: offset attribute only when non-zero; types vlen strings.
    with h5py.File(tmp_path / "c.hdf", "w") as file:
        file["volumes/raw"] = np.zeros(SHAPE, np.uint8)
        file["volumes/raw"].attrs["resolution"] = RESOLUTION
        file["annotations/ids"] = np.array([1, 2], np.uint64)
        file.create_dataset(
            "annotations/types",
            data=["presynaptic_site", "postsynaptic_site"],
            dtype=h5py.string_dtype(),
        )
        file["annotations/locations"] = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        file["annotations"].attrs["offset"] = (10.0, 20.0, 30.0)
        file["annotations/presynaptic_site/partners"] = np.array([[1, 2]], np.uint64)
    volume = read_cremi(tmp_path / "c.hdf")
    assert volume.offset == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(volume.annotations.locations, [[11, 22, 33], [14, 25, 36]])
    assert volume.annotations.types.tolist() == ["presynaptic_site", "postsynaptic_site"]
    np.testing.assert_array_equal(volume.annotations.partners, [[1, 2]])
    assert volume.neuron_ids is None and volume.clefts is None and volume.labels == {}


@pytest.mark.parametrize("name", ["fib-medulla-250.h5", "vnc-larva-left.h5", "isbi2012-train.h5"])
def test_real_files_equal_h5py(shared_data, name):
    volume = read_cremi(shared_data / name)
    with h5py.File(shared_data / name, "r") as file:
        raw = file["volumes/raw"]
        np.testing.assert_array_equal(volume.raw, raw[()])
        assert volume.raw.dtype == raw.dtype
        np.testing.assert_array_equal(volume.resolution, raw.attrs["resolution"])
        np.testing.assert_array_equal(volume.offset, raw.attrs["offset"])
        stored = {**volume.labels, "neuron_ids": volume.neuron_ids, "clefts": volume.clefts}
        names = set(file["volumes/labels"])
        assert {k for k, v in stored.items() if v is not None} == names
        for label in names:
            expected = file[f"volumes/labels/{label}"][()]
            assert stored[label].dtype == expected.dtype
            np.testing.assert_array_equal(stored[label], expected)
    assert volume.annotations is None


def test_real_clefts_to_instances(shared_data):
    clefts = open_volume(f"{shared_data / 'vnc-larva-left.h5'}:/volumes/labels/clefts").read()
    instances = cleft_instances(clefts)
    assert (instances == 0).sum() == (clefts == CREMI_BACKGROUND).sum()
    # The README's 33 synapses.
    assert len(np.unique(instances)) - 1 == 33


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    write_cremi(path, _volume())
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full while writing annotations")

    # Fails after raw and labels went into the temporary file.
    monkeypatch.setattr(cremi, "_write_annotations", fail)
    changed = _volume()
    changed.raw = np.zeros(SHAPE, np.uint8)
    with pytest.raises(OSError, match="disk full"):
        write_cremi(path, changed, overwrite=True)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.h5"]
    np.testing.assert_array_equal(read_cremi(path).raw, _volume().raw)


def test_unsupported_values_are_rejected_before_writing(tmp_path):
    path = tmp_path / "c.h5"
    write_cremi(path, _volume())
    before = path.read_bytes()
    bad = _volume()
    bad.labels = {"names": np.full(SHAPE, "a", dtype=object)}
    with pytest.raises(DataError, match="volumes/labels/names has unsupported dtype object"):
        write_cremi(path, bad, overwrite=True)
    bad = _volume()
    bad.neuron_ids = -np.ones(SHAPE, np.int64)
    with pytest.raises(DataError, match="neuron_ids must be non-negative integers"):
        write_cremi(path, bad, overwrite=True)
    bad = _volume()
    bad.annotations.types[0] = "synapse"
    with pytest.raises(DataError, match=r"annotation types \['synapse'\]"):
        write_cremi(path, bad, overwrite=True)
    assert path.read_bytes() == before
    with pytest.raises(DataError, match=r"c\.h5 already exists; pass overwrite=True"):
        write_cremi(path, _volume())


def test_read_errors(tmp_path):
    with pytest.raises(DataError, match=r"CREMI file not found: .*gone\.h5"):
        read_cremi(tmp_path / "gone.h5")
    with h5py.File(tmp_path / "c.h5", "w") as file:
        file["volumes/labels/clefts"] = np.zeros(SHAPE, np.uint64)
        file["volumes/labels/clefts"].attrs["resolution"] = RESOLUTION
    with pytest.raises(DataError, match=r"c\.h5: no dataset /volumes/raw .*/volumes/labels/clefts"):
        read_cremi(tmp_path / "c.h5")
    submission = read_cremi(tmp_path / "c.h5", require_raw=False)
    assert submission.raw is None and submission.clefts.shape == SHAPE
    with h5py.File(tmp_path / "c.h5", "a") as file:
        file["volumes/raw"] = np.zeros((3, 4, 4), np.uint8)
        file["volumes/raw"].attrs["resolution"] = RESOLUTION
    with pytest.raises(DataError, match=r"labels of shape \(3, 4, 5\) .* inside /volumes/raw"):
        read_cremi(tmp_path / "c.h5")


def test_padded_raw_is_cropped_to_the_labels(tmp_path):
    """CREMI's padded samples: a larger raw around labels at an offset."""
    raw = np.arange(5 * 8 * 9, dtype=np.uint8).reshape(5, 8, 9)
    resolution = np.array([40.0, 4.0, 4.0])
    with h5py.File(tmp_path / "padded.h5", "w") as file:
        file["volumes/raw"] = raw
        file["volumes/raw"].attrs["resolution"] = resolution
        file["volumes/raw"].attrs["offset"] = [0.0, 0.0, 0.0]
        file["volumes/labels/neuron_ids"] = np.ones((3, 4, 5), np.uint64)
        file["volumes/labels/neuron_ids"].attrs["resolution"] = resolution
        # One section and two pixels in from raw's corner.
        file["volumes/labels/neuron_ids"].attrs["offset"] = [40.0, 8.0, 8.0]
    volume = read_cremi(tmp_path / "padded.h5")
    np.testing.assert_array_equal(volume.raw, raw[1:4, 2:6, 2:7])
    assert volume.offset == (40.0, 8.0, 8.0)


def test_cleft_instances_by_hand():
    background = CREMI_BACKGROUND
    clefts = np.array([[[background, 3, 3], [0, background, 7]]], np.uint64)
    # Id 0 is a real cleft in CREMI: it becomes max id + 1 = 8.
    np.testing.assert_array_equal(cleft_instances(clefts), [[[0, 3, 3], [8, 0, 7]]])
    np.testing.assert_array_equal(
        cleft_instances(np.array([[[background, 2]]], np.uint64)), [[[0, 2]]]
    )


def test_cleft_instance_ids_follow_cleft_instances():
    background = CREMI_BACKGROUND
    clefts = np.array([[[background, 3, 3], [0, background, 7]]], np.uint64)
    # Cleft 0 becomes 8 in `cleft_instances`, so a pair of cleft 0 must too.
    np.testing.assert_array_equal(cleft_instance_ids(np.array([0, 3, 7]), clefts), [8, 3, 7])
    instances = cleft_instances(clefts)
    for cremi_id in (0, 3, 7):
        (renumbered,) = cleft_instance_ids([cremi_id], clefts)
        np.testing.assert_array_equal(instances == renumbered, clefts == cremi_id)
    # Without a cleft 0 nothing changes.
    no_zero = np.where(clefts == 0, background, clefts)
    np.testing.assert_array_equal(cleft_instance_ids(np.array([3, 7]), no_zero), [3, 7])


def test_partner_table_by_hand():
    volume = _volume()
    table = partner_table(volume)
    np.testing.assert_array_equal(table["pre_id"], [10, 10, 20])
    np.testing.assert_array_equal(table["post_id"], [11, 12, 11])
    np.testing.assert_array_equal(table["pre_location"][2], [400.0, 40.0, 80.0])
    # Site 10 at (440, 48, 88): ((440-400)/40, (48-40)/4, (88-80)/4) = voxel (1, 2, 2).
    # Site 11 at (440, 52, 92): (1, 3, 3); site 12 at (480, 44, 84): (2, 1, 1).
    # Site 20 at the offset: voxel (0, 0, 0).
    base = 2**63
    np.testing.assert_array_equal(table["pre_segment"] - base, [1 * 20 + 2 * 5 + 2] * 2 + [0])
    np.testing.assert_array_equal(
        table["post_segment"] - base, [1 * 20 + 3 * 5 + 3, 2 * 20 + 1 * 5 + 1, 38]
    )
    assert table["pre_inside"].all() and table["post_inside"].all()


def test_partner_table_rounds_and_flags_outside():
    annotations = Annotations(
        ids=np.array([1, 2], np.uint64),
        # (1.9, 0.6, 2.4) voxels round to (2, 1, 2); z = -1.0 voxel is outside.
        locations=np.array([[476.0, 42.4, 89.6], [360.0, 40.0, 80.0]]),
        types=np.array(["presynaptic_site", "postsynaptic_site"], dtype=object),
        partners=np.array([[1, 2]], np.uint64),
    )
    segments = np.arange(np.prod(SHAPE), dtype=np.uint64).reshape(SHAPE)
    volume = CremiVolume(
        raw=None, resolution=RESOLUTION, offset=OFFSET, neuron_ids=segments, annotations=annotations
    )
    table = partner_table(volume)
    assert table["pre_segment"].tolist() == [2 * 20 + 1 * 5 + 2]
    assert table["post_segment"].tolist() == [0] and table["post_inside"].tolist() == [False]
    annotations.partners = np.array([[1, 99]], np.uint64)
    with pytest.raises(DataError, match="post annotation ids that are not annotated"):
        partner_table(volume)


def test_annotations_only_file_round_trips(tmp_path):
    """A CREMI submission holds annotations and no volumes."""
    annotations = Annotations(
        ids=np.array([0, 1], np.uint64),
        locations=np.array([[40.0, 8.0, 8.0], [40.0, 8.0, 24.0]]),
        types=np.array(["presynaptic_site", "postsynaptic_site"], dtype=object),
        partners=np.array([[0, 1]], np.uint64),
    )
    path = tmp_path / "submission.h5"
    write_cremi(path, CremiVolume(raw=None, resolution=(40.0, 4.0, 4.0), annotations=annotations))
    back = read_cremi(path, require_raw=False)
    assert back.raw is None
    np.testing.assert_array_equal(back.annotations.partners, [[0, 1]])
    np.testing.assert_allclose(back.annotations.locations, annotations.locations)
    with pytest.raises(DataError, match="nothing to write"):
        write_cremi(tmp_path / "empty.h5", CremiVolume(raw=None, resolution=(1.0, 1.0, 1.0)))
