"""A user's own volume to predict with a trained run: `config.predict.input`, `.output`, `.roi`.

    python -m synjax.main --config=configs/demo.py --workdir=RUN --config.mode=predict \
        --config.predict.input=/data/em.zarr --config.predict.output=/data/em_pred \
        --config.predict.roi=0:64,0:1024,0:1024

`input` is any source `synjax.io.open_volume` reads (zarr, N5,
`precomputed://...`, `file.h5:/dataset`, TIFF); `output` is the folder that
receives the network predictions, written block by block as zarr; `roi`
(optional) is the region `z0:z1,y0:y1,x0:x1` in voxels (an empty bound means
the volume's edge: `:,100:,:`). The models (and tuned parameters) are those
trained in RUN. Without `input` a run predicts its configured test data, as
before.
"""

from __future__ import annotations

import pathlib

from synjax.errors import ConfigError, DataError
from synjax.geometry import SPATIAL_DIMS, Box
from synjax.io import open_volume
from synjax.io.volume_base import Volume

INPUT_KEY, OUTPUT_KEY, ROI_KEY = (
    "config.predict.input",
    "config.predict.output",
    "config.predict.roi",
)


def predicts_own_volume(config) -> bool:
    """Whether the run predicts `config.predict.input` rather than its test data."""
    predict = config.get("predict")
    return bool(predict is not None and predict.get("input"))


def parse_roi(text: str, shape, key: str = ROI_KEY) -> Box:
    """The region `"z0:z1,y0:y1,x0:x1"` (voxels) of a volume of spatial `shape`.

    Args:
      text: three comma-separated `start:stop` ranges; an empty start is 0, an
        empty stop the volume's size; "" is the whole volume.
      shape: the volume's spatial shape `(z, y, x)`.
      key: the config key, for errors.

    Raises:
      ConfigError: not three ranges of integers, or an empty or reversed one.
      DataError: the region leaves the volume.
    """
    shape = tuple(int(s) for s in shape[:SPATIAL_DIMS])
    if not text:
        return Box.from_shape(shape)
    parts = str(text).split(",")
    expected = "three ranges z0:z1,y0:y1,x0:x1 of voxels"
    if len(parts) != SPATIAL_DIMS or any(part.count(":") != 1 for part in parts):
        raise ConfigError(f"{key}={text!r}: expected {expected}")
    start, stop = [], []
    for part, size in zip(parts, shape, strict=True):
        low, high = (p.strip() for p in part.split(":"))
        try:
            a, b = int(low) if low else 0, int(high) if high else size
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected {expected}") from None
        if a < 0 or b <= a:
            raise ConfigError(f"{key}={text!r}: range {part!r} is empty or negative")
        start.append(a)
        stop.append(b)
    roi = Box(tuple(start), tuple(stop))
    if any(b > s for b, s in zip(stop, shape, strict=True)):
        raise DataError(f"{key}={text!r} leaves the input volume of shape {shape}")
    return roi


def open_input(config) -> tuple[Volume, Box]:
    """Opens `config.predict.input` (lazily) and its region of interest.

    Raises:
      ConfigError: no `config.predict.output`, or a malformed roi.
      DataError: the input cannot be opened (missing file or dataset, unknown
        format), is not 3D, or the roi leaves it; named in one line.
    """
    predict = config.predict
    if not predict.get("output"):
        raise ConfigError(
            f"{OUTPUT_KEY} is empty: expected a folder for the predictions of "
            f"{INPUT_KEY}={predict.input!r}"
        )
    try:
        volume = open_volume(predict.input)
    except DataError as error:
        raise DataError(f"{INPUT_KEY}={predict.input!r}: {error}") from error
    roi = parse_roi(predict.get("roi") or "", volume.shape)
    return volume, roi


def output_dir(config) -> pathlib.Path:
    """The folder of the predictions of `config.predict.input` (created)."""
    path = pathlib.Path(config.predict.output)
    if path.exists() and not path.is_dir():
        raise DataError(f"{OUTPUT_KEY}={str(path)!r} is a file: expected a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_mode(config) -> None:
    """A user's volume is predicted in `config.mode=predict` only.

    Raises:
      ConfigError: `config.predict.input` is set with another mode.
    """
    if predicts_own_volume(config) and config.mode != "predict":
        raise ConfigError(
            f"{INPUT_KEY} is set with config.mode={config.mode!r}: a volume of your own is "
            "predicted with config.mode=predict (train first, in the same workdir)"
        )


class RegionVolume:
    """The region `roi` of a `[z, y, x]` volume, read as a volume of its own (reads only)."""

    def __init__(self, volume, roi: Box):
        self.volume, self.roi = volume, roi
        self.shape = tuple(int(s) for s in roi.shape)
        self.dtype = volume.dtype

    def __getitem__(self, key: tuple[slice, ...]):
        shifted = tuple(
            slice((s.start or 0) + o, (n if s.stop is None else s.stop) + o)
            for s, o, n in zip(key, self.roi.start, self.shape, strict=True)
        )
        return self.volume[shifted]
