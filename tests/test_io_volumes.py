"""Tests of `synjax.io.open_volume` / `create_volume` over every format."""

import json
import os
import pickle

import h5py
import numpy as np
import pytest
import tensorstore as ts
import tifffile

from synjax.errors import DataError
from synjax.io import create_volume, open_volume
from synjax.io.file_volumes import TiffVolume

SHAPE = (5, 6, 7)
RESOLUTION = (40.0, 4.0, 4.0)
OFFSET = (80.0, 8.0, 12.0)
CHUNKS = (2, 3, 4)
# Regions of SHAPE, with negative bounds and int axes, read against numpy.
REGIONS = [
    (slice(None), slice(None), slice(None)),
    (slice(1, 3), slice(2, 6), slice(0, 4)),
    (slice(-2, None), slice(None, -1), 3),
    (4, slice(1, 2), slice(-7, -3)),
    (Ellipsis, 6),
    (slice(2, 2), slice(None), slice(None)),
]
CREATE_FORMATS = ["a.zarr", "a.n5", "precomputed://p", "a.h5:/volumes/raw"]


def _ramp(shape=SHAPE, dtype=np.uint8):
    return (np.arange(np.prod(shape)) % 251).astype(dtype).reshape(shape)


def _dest(tmp_path, name):
    if name.startswith("precomputed://"):
        return "precomputed://" + str(tmp_path / name[len("precomputed://") :])
    return str(tmp_path / name)


@pytest.mark.parametrize("name", CREATE_FORMATS)
def test_create_write_reopen_round_trip(tmp_path, name):
    data = _ramp()
    dest = _dest(tmp_path, name)
    volume = create_volume(dest, SHAPE, np.uint8, RESOLUTION, OFFSET, chunks=CHUNKS)
    # Written in two blocks, as block-wise prediction does.
    volume[0:3] = data[0:3]
    volume[3:5, :, :] = data[3:5]
    volume.close()
    reopened = open_volume(dest)
    assert reopened.shape == SHAPE and reopened.ndim == 3
    assert reopened.dtype == np.uint8
    assert reopened.resolution == RESOLUTION
    assert reopened.offset == OFFSET
    assert reopened.chunks == CHUNKS
    np.testing.assert_array_equal(reopened.read(), data)
    for region in REGIONS:
        np.testing.assert_array_equal(reopened[region], data[region])


@pytest.mark.parametrize("name", CREATE_FORMATS)
def test_resume_with_mode_r_plus(tmp_path, name):
    dest = _dest(tmp_path, name)
    data = _ramp(dtype=np.uint64) * np.uint64(2**40)
    create_volume(dest, SHAPE, np.uint64, chunks=CHUNKS)[0:2] = data[0:2]
    resumed = open_volume(dest, mode="r+")
    resumed[2:] = data[2:]
    np.testing.assert_array_equal(open_volume(dest).read(), data)


def test_zarr_writes_only_the_chunks_assigned(tmp_path):
    volume = create_volume(tmp_path / "a.zarr", SHAPE, np.uint16, chunks=CHUNKS, fill_value=7)
    volume[0:2, 0:3, 0:4] = 1
    chunk_files = [f for f in os.listdir(tmp_path / "a.zarr") if not f.startswith(".")]
    assert chunk_files == ["0.0.0"]
    read = open_volume(tmp_path / "a.zarr").read()
    assert (read[0:2, 0:3, 0:4] == 1).all()
    assert (read[2:] == 7).all()


def test_n5_stores_java_axis_order(tmp_path):
    create_volume(tmp_path / "a.n5", SHAPE, np.uint8, RESOLUTION, OFFSET, chunks=CHUNKS)
    attrs = json.loads((tmp_path / "a.n5" / "attributes.json").read_text())
    assert attrs["dimensions"] == [7, 6, 5]
    assert attrs["blockSize"] == [4, 3, 2]
    assert attrs["resolution"] == [4.0, 4.0, 40.0]
    assert attrs["offset"] == [12.0, 8.0, 80.0]
    assert attrs["pixelResolution"] == {"dimensions": [4.0, 4.0, 40.0], "unit": "nm"}


def test_precomputed_info_in_xyz_voxels(tmp_path):
    create_volume(f"precomputed://{tmp_path / 'p'}", SHAPE, np.uint64, RESOLUTION, OFFSET)
    scale = json.loads((tmp_path / "p" / "info").read_text())["scales"][0]
    assert scale["size"] == [7, 6, 5]
    assert scale["resolution"] == [4.0, 4.0, 40.0]
    # offset / resolution: (12 / 4, 8 / 4, 80 / 40) voxels.
    assert scale["voxel_offset"] == [3, 2, 2]
    assert scale["encoding"] == "compressed_segmentation"


def test_zarr_v3_with_attributes(tmp_path):
    data = _ramp(dtype=np.float32)
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(tmp_path / "v3.zarr")},
        "metadata": {
            "shape": list(SHAPE),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(CHUNKS)}},
            "data_type": "float32",
            "attributes": {"resolution": list(RESOLUTION), "offset": list(OFFSET)},
        },
        "create": True,
    }
    ts.open(spec).result().write(data).result()
    volume = open_volume(tmp_path / "v3.zarr")
    assert volume.resolution == RESOLUTION and volume.offset == OFFSET
    assert volume.dtype == np.float32
    for region in REGIONS:
        np.testing.assert_array_equal(volume[region], data[region])


def test_in_memory_spec_round_trip():
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "memory"},
        "metadata": {"shape": list(SHAPE), "chunks": list(CHUNKS), "dtype": "<u2"},
        "create": True,
    }
    volume = open_volume(spec)
    assert volume.writable and volume.resolution == (1.0, 1.0, 1.0)
    data = _ramp(dtype=np.uint16)
    volume[...] = data
    volume[1, 2:4, -1] = [500, 501]
    data[1, 2:4, -1] = [500, 501]
    for region in REGIONS:
        np.testing.assert_array_equal(volume[region], data[region])


def test_precomputed_spec_units_give_resolution():
    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": {"driver": "memory"},
        "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
        "scale_metadata": {"size": [7, 6, 5], "resolution": [4, 5, 40], "voxel_offset": [1, 2, 3]},
        "create": True,
    }
    volume = open_volume(spec)
    assert volume.shape == SHAPE
    assert volume.resolution == (40.0, 5.0, 4.0)
    # voxel_offset (x 1, y 2, z 3) times resolution, in z-y-x.
    assert volume.offset == (120.0, 10.0, 4.0)


def test_hdf5_written_by_h5py(tmp_path):
    data = _ramp(dtype=np.int64) - 100
    with h5py.File(tmp_path / "f.hdf", "w") as file:
        file.create_dataset("volumes/labels/x", data=data, chunks=CHUNKS)
        file["volumes/labels/x"].attrs["resolution"] = RESOLUTION
    volume = open_volume(f"{tmp_path / 'f.hdf'}:/volumes/labels/x")
    assert volume.resolution == RESOLUTION and volume.offset == (0.0, 0.0, 0.0)
    for region in REGIONS:
        np.testing.assert_array_equal(volume[region], data[region])
    with pytest.raises(DataError, match="read-only"):
        volume[0] = 1


def test_tiff_stack_reads_only_needed_pages(tmp_path, monkeypatch):
    data = _ramp(dtype=np.uint16)
    # ImageJ stores pixels per unit: 0.25 px/nm is 4 nm; spacing is the z step.
    tifffile.imwrite(
        tmp_path / "s.tif",
        data,
        imagej=True,
        resolution=(0.25, 0.25),
        metadata={"spacing": 40, "unit": "nm", "axes": "ZYX"},
    )
    volume = open_volume(tmp_path / "s.tif")
    assert volume.shape == SHAPE
    assert volume.resolution == (40.0, 4.0, 4.0)
    decoded = []
    original = tifffile.TiffPage.asarray
    monkeypatch.setattr(
        tifffile.TiffPage, "asarray", lambda page, *a, **k: decoded.append(1) or original(page)
    )
    np.testing.assert_array_equal(volume[1:3, 2:5, -2:], data[1:3, 2:5, -2:])
    assert len(decoded) == 2
    for region in REGIONS:
        np.testing.assert_array_equal(volume[region], data[region])
    with pytest.raises(DataError, match="read only"):
        open_volume(tmp_path / "s.tif", mode="r+")


def test_tiff_micron_unit(tmp_path):
    tifffile.imwrite(
        tmp_path / "m.tiff",
        _ramp(),
        imagej=True,
        resolution=(100.0, 200.0),
        metadata={"spacing": 0.05, "unit": "micron"},
    )
    # 1/100 um = 10 nm in x, 1/200 um = 5 nm in y, 0.05 um = 50 nm in z.
    np.testing.assert_allclose(open_volume(tmp_path / "m.tiff").resolution, (50.0, 5.0, 10.0))


@pytest.mark.parametrize("name", CREATE_FORMATS + ["s.tif"])
def test_pickled_volume_reads_the_same(tmp_path, name):
    data = _ramp()
    if name == "s.tif":
        tifffile.imwrite(tmp_path / name, data)
        volume = TiffVolume(str(tmp_path / name))
    else:
        volume = create_volume(_dest(tmp_path, name), SHAPE, np.uint8, RESOLUTION)
        volume[...] = data
    copy = pickle.loads(pickle.dumps(volume))
    assert copy.resolution == volume.resolution
    np.testing.assert_array_equal(copy[1:4, 2], data[1:4, 2])


def test_channels_need_ndim_4(tmp_path):
    data = _ramp((4, 5, 6, 3), np.float32)
    create_volume(tmp_path / "c.zarr", data.shape, np.float32)[...] = data
    with pytest.raises(DataError, match=r"c\.zarr.*4D.*ndim=4"):
        open_volume(tmp_path / "c.zarr")
    volume = open_volume(tmp_path / "c.zarr", ndim=4)
    np.testing.assert_array_equal(volume[1:3, :, 2, 1:], data[1:3, :, 2, 1:])


def test_write_casts_only_when_values_fit():
    volume = open_volume(
        {
            "driver": "zarr",
            "kvstore": {"driver": "memory"},
            "metadata": {"shape": [2, 3, 4], "dtype": "|u1"},
            "create": True,
        }
    )
    volume[0] = np.full((3, 4), 255, np.int64)
    assert (volume[0] == 255).all()
    with pytest.raises(DataError, match=r"values 256\.\.256 do not fit in uint8"):
        volume[1] = np.full((3, 4), 256, np.int64)
    with pytest.raises(DataError, match="cannot write float values into a uint8 volume"):
        volume[1] = np.zeros((3, 4), np.float32)
    with pytest.raises(DataError, match=r"block of shape \(2, 2\) does not fit region of shape"):
        volume[1, 0:3, 0:4] = np.zeros((2, 2), np.uint8)


def test_real_hdf5_regions_equal_h5py(shared_data):
    raw_path = shared_data / "fib-medulla-250.h5"
    volume = open_volume(f"{raw_path}:/volumes/raw")
    with h5py.File(raw_path, "r") as file:
        dataset = file["volumes/raw"]
        assert volume.shape == dataset.shape and volume.dtype == dataset.dtype
        np.testing.assert_array_equal(volume.resolution, dataset.attrs["resolution"])
        np.testing.assert_array_equal(volume.offset, dataset.attrs["offset"])
        np.testing.assert_array_equal(volume[10:42, 100:130, -20:], dataset[10:42, 100:130, -20:])
        np.testing.assert_array_equal(volume[249], dataset[249])
    labels_path = shared_data / "vnc-larva-left.h5"
    clefts = open_volume(f"{labels_path}:volumes/labels/clefts")
    with h5py.File(labels_path, "r") as file:
        np.testing.assert_array_equal(
            clefts[3:9, 500:700, 0:512], file["volumes/labels/clefts"][3:9, 500:700]
        )
        np.testing.assert_array_equal(clefts.resolution, (50.0, 4.6, 4.6))


def test_error_missing_file(tmp_path):
    for source in ["gone.zarr", "gone.n5", "gone.h5:/raw", "gone.tif", "precomputed://gone"]:
        with pytest.raises(DataError, match="volume not found: .*gone"):
            open_volume(_dest(tmp_path, source))


def test_error_missing_dataset_lists_datasets(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as file:
        file["volumes/raw"] = np.zeros((2, 2, 2), np.uint8)
        file["volumes/labels/ids"] = np.zeros((2, 2, 2), np.uint64)
    expected = r"f\.h5.*no dataset '/volumes/nope'.*/volumes/labels/ids, /volumes/raw"
    with pytest.raises(DataError, match=expected):
        open_volume(f"{path}:/volumes/nope")
    with pytest.raises(DataError, match=r"name the dataset.*/volumes/labels/ids, /volumes/raw"):
        open_volume(path)


def test_error_wrong_ndim(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as file:
        file["image"] = np.zeros((4, 4), np.uint8)
    with pytest.raises(DataError, match=r"f\.h5:/image has shape \(4, 4\) \(2D\); expected 3D"):
        open_volume(f"{tmp_path / 'f.h5'}:/image")
    with pytest.raises(DataError, match="shape"):
        create_volume(tmp_path / "a.zarr", (4, 4), np.uint8)


def test_error_unsupported_dtype(tmp_path):
    with pytest.raises(DataError, match=r"b\.zarr: unsupported dtype int8"):
        create_volume(tmp_path / "b.zarr", SHAPE, np.int8)
    with pytest.raises(DataError, match="precomputed cannot store float64"):
        create_volume(f"precomputed://{tmp_path / 'p'}", SHAPE, np.float64)


def test_error_region_outside(tmp_path):
    volume = create_volume(tmp_path / "a.n5", SHAPE, np.uint8)
    for index, text in [
        ((slice(0, 6),), r"\[0:6\]"),
        ((slice(None), slice(None), 7), r"\[:, :, 7\]"),
        ((slice(-6, None),), r"\[-6:\]"),
    ]:
        with pytest.raises(DataError, match=rf"a\.n5: region {text} is outside .*\(5, 6, 7\)"):
            volume[index]
    with pytest.raises(DataError, match="outside"):
        volume[4:6] = 0
    with pytest.raises(DataError, match="step 2"):
        volume[::2]


def test_error_unknown_format_and_existing_dest(tmp_path):
    with pytest.raises(DataError, match=r"unknown volume format: .*x\.nii"):
        open_volume(tmp_path / "x.nii")
    create_volume(tmp_path / "a.zarr", SHAPE, np.uint8)
    with pytest.raises(DataError, match=r"a\.zarr already exists; pass overwrite=True"):
        create_volume(tmp_path / "a.zarr", SHAPE, np.uint8)
    replaced = create_volume(tmp_path / "a.zarr", (2, 2, 2), np.uint16, overwrite=True)
    assert open_volume(tmp_path / "a.zarr").shape == replaced.shape == (2, 2, 2)
    (tmp_path / "notes.n5").mkdir()
    (tmp_path / "notes.n5" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="is not a volume; refusing"):
        create_volume(tmp_path / "notes.n5", SHAPE, np.uint8, overwrite=True)


def test_error_zarr_group_names_arrays(tmp_path):
    create_volume(tmp_path / "g.zarr" / "raw", SHAPE, np.uint8)
    (tmp_path / "g.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    with pytest.raises(DataError, match=r"g\.zarr is a zarr group.*arrays here: raw"):
        open_volume(tmp_path / "g.zarr")
    assert open_volume(tmp_path / "g.zarr" / "raw").shape == SHAPE


def test_world_voxel_conversions(tmp_path):
    volume = create_volume(tmp_path / "a.zarr", SHAPE, np.uint8, RESOLUTION, OFFSET)
    # (80 + 2 * 40, 8 + 3 * 4, 12 + 1 * 4) nm.
    np.testing.assert_array_equal(volume.voxel_to_world([[2, 3, 1]]), [[160.0, 20.0, 16.0]])
    # (140 - 80) / 40 = 1.5 rounds up to 2; (13 - 8) / 4 = 1.25 to 1; (17.9 - 12) / 4 = 1.475 to 1.
    np.testing.assert_array_equal(volume.world_to_voxel([140.0, 13.0, 17.9]), [2, 1, 1])
    with pytest.raises(DataError, match=r"a\.zarr: slice bound 1\.5 is not an int"):
        volume[1.5:3]


def test_corrupt_zarr_chunk_is_one_line_naming_the_region(tmp_path):
    path = tmp_path / "corrupt.zarr"
    volume = create_volume(str(path), shape=(8, 16, 16), dtype=np.uint8, chunks=(4, 8, 8))
    volume[...] = np.arange(8 * 16 * 16, dtype=np.uint8).reshape(8, 16, 16)
    (path / "0.0.0").write_bytes(b"garbage")
    reopened = open_volume(str(path))
    # Chunks that are intact still read.
    np.testing.assert_array_equal(reopened[4:8, 8:16, 8:16], volume[4:8, 8:16, 8:16])
    with pytest.raises(
        DataError, match=r"corrupt.zarr: cannot read region \[\[0, 8\].*corrupt chunk"
    ):
        reopened[...]
