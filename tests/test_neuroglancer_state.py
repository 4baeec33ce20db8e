"""The neuroglancer state each run writes, its serving, and `python -m synjax.view`.

A tiny partner run: `run_phases` drives a job with the partner pipeline's
phases and outputs (signed proximity, a predicted segmentation, the synapse
table), written with the pipeline's own writers, so that the state is the one
a real run gets. No browser: the state is checked as JSON, parsed by the
`neuroglancer` package, and its files fetched over HTTP from the servers.
"""

import json
import os
import subprocess
import sys
import types
import urllib.request

import h5py
import numpy as np
import pytest

from synjax import pipelines
from synjax.io import create_volume, layout, open_volume
from synjax.io.synapse_table import SynapseTable
from synjax.report import neuroglancer_serve, neuroglancer_state
from tests.conftest import REPO_ROOT

RESOLUTION = (40.0, 4.0, 8.0)  # nm, z-y-x: every axis different, so an axis swap shows
SHAPE = (4, 6, 10)
# Hand-written rows: pre and post sites in nm (z, y, x), voxel i centred at i * resolution.
PRE = np.array([[40.0, 8.0, 16.0], [80.0, 12.0, 0.0], [0.0, 0.0, 72.0]])
POST = np.array([[40.0, 12.0, 24.0], [120.0, 16.0, 8.0], [0.0, 4.0, 64.0]])


def _tiny_partner_job():
    """A job with the partner pipeline's phases that writes its outputs."""
    raw = (np.arange(np.prod(SHAPE)) % 251).astype(np.uint8).reshape(SHAPE)

    def load_test(config):
        return types.SimpleNamespace(raw=raw, resolution=RESOLUTION)

    def predict(config, workdir, test):
        prox = create_volume(workdir / layout.PROXIMITY, SHAPE, np.float32, RESOLUTION)
        prox[...] = np.linspace(-1, 1, raw.size, dtype=np.float32).reshape(SHAPE)
        seg = create_volume(
            workdir / layout.volume_segmentation("test"), SHAPE, np.uint64, RESOLUTION
        )
        seg[...] = np.arange(raw.size, dtype=np.uint64).reshape(SHAPE) // 7
        table = SynapseTable.build([5, 6, 7], [8, 9, 10], (PRE + POST) / 2, PRE, POST, score=0.5)
        table.to_csv(workdir / layout.SYNAPSES_CSV_FILE)

    def fail(*args):
        raise AssertionError("phase not expected in this mode")

    job = types.SimpleNamespace(train=fail, load_test=load_test, predict=predict, evaluate=fail)
    return job, raw


@pytest.fixture
def partner_run(tmp_path):
    job, raw = _tiny_partner_job()
    pipelines.run_phases(job, types.SimpleNamespace(mode="predict"), tmp_path)
    state = json.loads((tmp_path / layout.NEUROGLANCER_STATE_FILE).read_text())
    return tmp_path, state, raw


def _metres(resolution_nm):
    return {axis: [r * 1e-9, "m"] for axis, r in zip("zyx", resolution_nm, strict=True)}


def test_state_names_every_layer_with_its_source_and_voxel_size(partner_run):
    workdir, state, raw = partner_run
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert list(layers) == ["raw", "proximity", "segmentation", "synapses"]
    expected = {
        "raw": ("image", layout.VIEW_RAW),
        "proximity": ("image", layout.PROXIMITY),
        "segmentation": ("segmentation", layout.volume_segmentation("test")),
    }
    for name, (kind, relative) in expected.items():
        layer = layers[name]
        assert layer["type"] == kind, name
        assert layer["source"]["url"] == "zarr://file://" + str((workdir / relative).absolute())
        # z 40 nm, y 4 nm, x 8 nm, in metres, in the array's z-y-x order.
        assert layer["source"]["transform"]["outputDimensions"] == {
            "z": [4e-8, "m"],
            "y": [4e-9, "m"],
            "x": [8e-9, "m"],
        }, name
    assert state["dimensions"] == {"x": [8e-9, "m"], "y": [4e-9, "m"], "z": [4e-8, "m"]}
    assert state["position"] == [5.0, 3.0, 2.0]  # the centre of 4 x 6 x 10 voxels, x-y-z
    # The raw copy is the raw the run predicted on, with its voxel size.
    copy = open_volume(str(workdir / layout.VIEW_RAW))
    np.testing.assert_array_equal(copy.read(), raw)
    assert tuple(copy.resolution) == RESOLUTION


def test_synapse_annotations_are_the_table_rows(partner_run):
    workdir, state, _ = partner_run
    layer = next(layer for layer in state["layers"] if layer["type"] == "annotation")
    rows = SynapseTable.from_csv(workdir / layout.SYNAPSES_CSV_FILE)
    assert len(layer["annotations"]) == len(rows) == 3
    assert layer["source"]["transform"]["outputDimensions"] == {
        "x": [1e-9, "m"],
        "y": [1e-9, "m"],
        "z": [1e-9, "m"],
    }
    first = layer["annotations"][0]
    assert first["type"] == "line"
    # Pre (40, 8, 16) nm z-y-x plus half a voxel (20, 2, 4), written x-y-z.
    assert first["pointA"] == [20.0, 10.0, 60.0]
    assert first["pointB"] == [28.0, 14.0, 60.0]  # post (40, 12, 24) + half a voxel
    assert "5 -> 8" in first["description"]
    assert layer["annotations"][2]["pointA"] == [76.0, 2.0, 20.0]


def test_neuroglancer_reads_the_state(partner_run):
    neuroglancer = pytest.importorskip("neuroglancer")
    _, state, _ = partner_run
    parsed = neuroglancer.ViewerState(state)
    assert [layer.name for layer in parsed.layers] == [
        "raw",
        "proximity",
        "segmentation",
        "synapses",
    ]
    assert isinstance(parsed.layers["segmentation"].layer, neuroglancer.SegmentationLayer)
    annotations = parsed.layers["synapses"].layer.annotations
    assert [type(a).__name__ for a in annotations] == ["LineAnnotation"] * 3
    np.testing.assert_allclose(annotations[1].point_a, [4.0, 14.0, 100.0])
    assert parsed.dimensions.names == ("x", "y", "z")
    np.testing.assert_allclose(parsed.dimensions.scales, [8e-9, 4e-9, 4e-8])


def test_training_only_run_writes_no_state(tmp_path):
    job = types.SimpleNamespace(train=lambda config, workdir: None)
    pipelines.run_phases(job, types.SimpleNamespace(mode="train"), tmp_path)
    assert not (tmp_path / layout.NEUROGLANCER_STATE_FILE).exists()


def test_rewrite_sources_by_hand(tmp_path):
    folder = tmp_path / "predictions"
    state = {
        "layers": [
            {"name": "a", "source": {"url": "zarr://" + (folder / "a b.zarr").as_uri()}},
            {"name": "b", "source": "precomputed://" + (tmp_path / "seg").as_uri()},
            {"name": "c", "source": {"url": "local://annotations"}},
        ]
    }
    assert neuroglancer_serve.local_folders(state) == [tmp_path, folder]
    served = {folder: "http://h:1/t1", tmp_path: "http://h:2/t2/"}
    out = neuroglancer_serve.rewrite_sources(state, served)
    assert out["layers"][0]["source"]["url"] == "zarr://http://h:1/t1/a%20b.zarr"
    assert out["layers"][1]["source"] == "precomputed://http://h:2/t2/seg"
    assert out["layers"][2]["source"]["url"] == "local://annotations"
    assert state["layers"][0]["source"]["url"].startswith("zarr://file://")  # not changed in place
    with pytest.raises(Exception, match="is not served"):
        neuroglancer_serve.rewrite_sources(state, {folder: "http://h:1/t1"})


def test_serve_gives_the_files_over_http(partner_run):
    neuroglancer = pytest.importorskip("neuroglancer")
    workdir, state, _ = partner_run
    served = neuroglancer_serve.serve(state)
    try:
        folder = (workdir / layout.PREDICTIONS_DIR).absolute()
        assert list(served.file_urls) == [folder]
        assert served.url.startswith("http://127.0.0.1:")
        base = served.file_urls[folder]
        with urllib.request.urlopen(f"{base}/proximity.zarr/.zarray", timeout=10) as response:
            served_meta = json.loads(response.read())
        assert served_meta == json.loads((folder / "proximity.zarr" / ".zarray").read_text())
        layer = served._viewer.state.layers["proximity"]
        assert layer.source[0].url == f"zarr://{base}/proximity.zarr"
    finally:
        served.stop()
        neuroglancer.server.stop()


def _view(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "synjax.view", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_view_help():
    result = _view("--help")
    assert result.returncode == 0, result.stderr
    assert "RUN" in result.stdout and "--bind-address" in result.stdout


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "no-state"])
def test_view_bad_run_is_one_line(tmp_path, exists):
    run = tmp_path / "run"
    if exists:
        run.mkdir()
    result = _view(str(run))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("synjax: error: ") and str(run) in lines[0]
    assert ("does not exist" if not exists else "neuroglancer_state.json is absent") in lines[0]


def test_channels_and_neuron_outputs(tmp_path):
    """A neuron run: boundaries with a channel axis, segmentation and watershed; no synapses."""
    resolution = (30.0, 6.0, 6.0)
    boundaries = create_volume(tmp_path / layout.BOUNDARIES, (2, 3, 4, 3), np.float32, resolution)
    boundaries[...] = 0.5
    for relative in (layout.SEGMENTATION, layout.WATERSHED_ONLY):
        create_volume(tmp_path / relative, (2, 3, 4), np.uint64, resolution)[...] = 1
    path = neuroglancer_state.write_state(tmp_path)
    state = json.loads(path.read_text())
    assert [(layer["name"], layer["type"]) for layer in state["layers"]] == [
        ("boundaries", "image"),
        ("segmentation", "segmentation"),
        ("watershed", "segmentation"),
    ]
    assert state["layers"][0]["source"]["transform"]["outputDimensions"] == {
        **_metres(resolution),
        "c^": [1, ""],
    }
    assert state["layers"][2]["source"]["transform"]["outputDimensions"] == _metres(resolution)
    assert state["position"] == [2.0, 1.5, 1.0]


def test_source_urls_of_input_formats(tmp_path):
    """Zarr, N5 and precomputed inputs are shown where they lie; HDF5 and TIFF cannot be."""
    url = neuroglancer_state.source_url
    assert url(tmp_path / "em.zarr") == "zarr://file://" + str(tmp_path / "em.zarr")
    assert url(f"{tmp_path}/em.zarr/raw/") == "zarr://file://" + str(tmp_path / "em.zarr/raw")
    assert url(tmp_path / "em.n5") == "n5://file://" + str(tmp_path / "em.n5")
    assert url("precomputed://gs://bucket/em") == "precomputed://gs://bucket/em"
    assert url(f"precomputed://{tmp_path}/em") == "precomputed://file://" + f"{tmp_path}/em"
    assert url("gs://bucket/em.zarr") == "zarr://gs://bucket/em.zarr"
    assert url(tmp_path / "em.h5:/raw") is None
    assert url(tmp_path / "em.tif") is None


def test_own_volume_state_without_a_readable_input_and_with_a_synapse_table(tmp_path):
    """An HDF5 input gets no layer (and no copy); outputs sit at their offsets, synapses in nm."""
    resolution, offset = (40.0, 4.0, 8.0), (80.0, 0.0, 16.0)
    raw = np.zeros(SHAPE, np.uint8)
    with h5py.File(tmp_path / "em.h5", "w") as f:
        f.create_dataset("raw", data=raw).attrs["resolution"] = resolution
    output = tmp_path / "out"
    output.mkdir()
    create_volume(output / layout.VOLUME_PROXIMITY, SHAPE, np.float32, resolution, offset)
    table = SynapseTable.build([5, 6, 7], [8, 9, 10], (PRE + POST) / 2, PRE, POST, score=0.5)
    table.to_csv(output / layout.SYNAPSES_CSV_FILE)
    path = neuroglancer_state.write_volume_state(output, f"{tmp_path / 'em.h5'}:/raw")
    assert path == output / layout.NEUROGLANCER_STATE_FILE
    state = json.loads(path.read_text())
    assert [layer["name"] for layer in state["layers"]] == ["proximity", "synapses"]
    transform = state["layers"][0]["source"]["transform"]
    # (80, 0, 16) nm over (40, 4, 8) nm voxels: (2, 0, 2) voxels.
    assert transform["matrix"] == [[1, 0, 0, 2], [0, 1, 0, 0], [0, 0, 1, 2]]
    assert "shader" in state["layers"][0]
    # The view starts at the proximity's centre in the input's voxels, x-y-z.
    assert state["position"] == [2 + 5.0, 0 + 3.0, 2 + 2.0]
    assert sorted(p.name for p in output.iterdir()) == [
        layout.NEUROGLANCER_STATE_FILE,
        layout.VOLUME_PROXIMITY,
        layout.SYNAPSES_CSV_FILE,
    ]


def test_an_n5_input_is_shown_by_its_own_metadata(tmp_path):
    """N5 names its own axes and voxel size: the layer is its URL alone, nothing copied."""
    create_volume(tmp_path / "em.n5", SHAPE, np.uint8, (40.0, 4.0, 8.0))
    output = tmp_path / "out"
    create_volume(output / layout.VOLUME_BOUNDARIES, SHAPE, np.float32, (40.0, 4.0, 8.0))
    state = neuroglancer_state.build_volume_state(output, str(tmp_path / "em.n5"))
    assert state["layers"][0] == {
        "type": "image",
        "name": "raw",
        "source": "n5://file://" + str(tmp_path / "em.n5"),
    }
    assert [layer["name"] for layer in state["layers"]] == ["raw", "boundaries"]
    assert "matrix" not in state["layers"][1]["source"]["transform"]  # offset 0: none
    assert sorted(p.name for p in output.iterdir()) == [layout.VOLUME_BOUNDARIES]


# The zarr v2 dtypes neuroglancer's zarr source reads (its client's numpy type table).
NEUROGLANCER_ZARR_DTYPES = {"|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4"}


def test_own_volume_state_places_the_segmentation_and_serves_every_folder(tmp_path):
    """Input, segmentation and outputs in three folders: each layer opens over HTTP.

    The segmentation is of the region's shape and records no offset: it is
    placed where the partner pipeline read it, at the region's offset.
    """
    neuroglancer = pytest.importorskip("neuroglancer")
    resolution = (40.0, 4.0, 8.0)
    source = str(tmp_path / "em" / "raw.zarr")
    create_volume(source, SHAPE, np.uint8, resolution, (80.0, 0.0, 16.0))[...] = 7
    # The region 1:4, 2:6, 3:10 of the input: (80 + 40, 0 + 8, 16 + 24) nm.
    region, offset = (3, 4, 7), (120.0, 8.0, 40.0)
    output = tmp_path / "out"
    create_volume(output / layout.VOLUME_PROXIMITY, region, np.float32, resolution, offset)
    create_volume(output / layout.VOLUME_PRE_SITES, region, np.uint64, resolution, offset)
    segmentation = str(tmp_path / "neurons" / "seg.zarr")
    create_volume(segmentation, region, np.uint64, resolution)[...] = 3
    state = neuroglancer_state.build_volume_state(output, source, segmentation)
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert list(layers) == ["raw", "proximity", "segmentation", "pre sites"]
    assert layers["segmentation"]["type"] == "segmentation"
    assert layers["segmentation"]["source"]["url"] == "zarr://file://" + segmentation
    matrices = {name: layer["source"]["transform"]["matrix"] for name, layer in layers.items()}
    # 120 / 40, 8 / 4, 40 / 8 voxels; the input at 80 / 40, 0, 16 / 8.
    assert matrices["segmentation"] == [[1, 0, 0, 3], [0, 1, 0, 2], [0, 0, 1, 5]]
    assert matrices["segmentation"] == matrices["proximity"] == matrices["pre sites"]
    assert matrices["raw"] == [[1, 0, 0, 2], [0, 1, 0, 0], [0, 0, 1, 2]]
    parsed = neuroglancer.ViewerState(state)
    assert isinstance(parsed.layers["segmentation"].layer, neuroglancer.SegmentationLayer)
    served = neuroglancer_serve.serve(state)
    try:
        folders = [tmp_path / "em", tmp_path / "neurons", output]
        assert sorted(served.file_urls) == [f.absolute() for f in folders]
        for layer in served._viewer.state.layers:
            url = layer.source[0].url
            assert url.startswith("zarr://http://127.0.0.1:"), layer.name
            with urllib.request.urlopen(url[len("zarr://") :] + "/.zarray", timeout=10) as got:
                meta = json.loads(got.read())
            # What neuroglancer's zarr v2 source reads.
            assert meta["zarr_format"] == 2 and meta["dimension_separator"] in (".", "/")
            assert meta["dtype"] in NEUROGLANCER_ZARR_DTYPES, layer.name
            assert meta["compressor"]["id"] in ("blosc", "gzip", "zlib", "zstd"), layer.name
    finally:
        served.stop()
        neuroglancer.server.stop()
    # One neuroglancer cannot read (HDF5) gets no layer; the folder's own
    # segmentation.zarr (the neuron pipeline's, same folder) is listed once.
    with h5py.File(tmp_path / "seg.h5", "w") as f:
        f.create_dataset("seg", data=np.zeros(region, np.uint64))
    state = neuroglancer_state.build_volume_state(output, source, f"{tmp_path / 'seg.h5'}:/seg")
    assert [layer["name"] for layer in state["layers"]] == ["raw", "proximity", "pre sites"]
    own = output / layout.VOLUME_SEGMENTATION
    create_volume(own, region, np.uint64, resolution, offset)
    state = neuroglancer_state.build_volume_state(output, source, f"{own}/")
    names = [layer["name"] for layer in state["layers"]]
    assert names == ["raw", "proximity", "segmentation", "pre sites"]
