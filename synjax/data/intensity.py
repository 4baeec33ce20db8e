"""The one intensity convention: how raw EM values become a network's float32 input.

Every model (the proximity U-Net, the pruning CNN, the DeepEM3D ensemble)
trains and predicts on `normalize_intensity(values, normalization, name)`,
and its `IntensityNormalization` is saved next to its checkpoint
(`checkpoints/<model>/intensity.json`) so that prediction applies exactly
what training did, whatever the dtype of the volume it is given.

Two methods (`config.data.intensity.method`):

- "dtype" (default): the dtype's range maps to [0, 1]. Unsigned integers are
  divided by their maximum (uint8 / 255, uint16 / 65535, so a uint16 copy of
  a uint8 volume scaled by 257 gives bit-identical input); floating-point
  data is taken to be in [0, 1] already (skimage's convention for float
  images) and is rejected if it is not. Signed integers have no such range.
  For uint8 this is bit for bit the `/ 255` the published figures used.
- "percentiles": the `low_percent` and `high_percent` percentiles of the
  training volume (nearest rank, on a strided subsample of at most
  `MAX_STATISTICS_VOXELS` voxels) map to 0 and 1, values beyond are clipped.
  The measured intensities (`low`, `high`) are saved with the checkpoint and
  re-applied at prediction; they are never re-measured on the test volume.

Only windows are ever converted (`normalize_intensity` on a patch, block or
slice batch, or `NormalizedVolume`, a lazy view), never a whole volume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from synjax.errors import ConfigError, DataError
from synjax.io.layout import INTENSITY_FILE
from synjax.report import files

DTYPE = "dtype"
PERCENTILES = "percentiles"
METHODS = (DTYPE, PERCENTILES)
# Percentiles are measured on at most this many voxels of the training volume.
MAX_STATISTICS_VOXELS = 4_000_000
CONFIG_KEY = "config.data.intensity"


@dataclasses.dataclass(frozen=True)
class IntensityNormalization:
    """How raw intensities are mapped to a network's [0, 1] input.

    Attributes:
      method: "dtype" (the dtype's range) or "percentiles" (the training
        volume's percentiles); see the module docstring.
      low_percent: for "percentiles", the percentile (0-100) mapped to 0.
      high_percent: for "percentiles", the percentile (0-100) mapped to 1.
      low: for "percentiles", the training volume's intensity at
        `low_percent`; None until measured (`fit`).
      high: for "percentiles", the intensity at `high_percent`; None until
        measured.
    """

    method: str = DTYPE
    low_percent: float = 1.0
    high_percent: float = 99.0
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(
                f"{CONFIG_KEY}.method={self.method!r}: expected one of {list(METHODS)}"
            )
        if not 0.0 <= self.low_percent < self.high_percent <= 100.0:
            raise ConfigError(
                f"{CONFIG_KEY}: low_percent={self.low_percent}, high_percent="
                f"{self.high_percent}; expected 0 <= low_percent < high_percent <= 100"
            )
        if (self.low is None) != (self.high is None):
            raise ConfigError(f"intensity low={self.low}, high={self.high}: expected both or none")
        if self.low is not None and not (
            math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high
        ):
            raise ConfigError(
                f"intensity low={self.low}, high={self.high}: expected finite low < high"
            )

    @property
    def measured(self) -> bool:
        """Whether it can be applied: "dtype" always, "percentiles" once `fit`."""
        return self.method == DTYPE or self.low is not None

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> IntensityNormalization:
        """The (unmeasured) settings of a `config.data.intensity` section; None: "dtype"."""
        if section is None:
            return cls()
        known = {"method", "low_percent", "high_percent"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"{CONFIG_KEY}: unknown fields {unknown}; expected {sorted(known)}")
        return cls(
            method=str(section.get("method", DTYPE)),
            low_percent=float(section.get("low_percent", cls.low_percent)),
            high_percent=float(section.get("high_percent", cls.high_percent)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the measured `low`/`high` included)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "intensity"
    ) -> IntensityNormalization:
        """Inverse of `to_dict`.

        Raises:
          DataError: `data` lacks fields or holds values `__init__` rejects;
            `source` (e.g. the file) is named.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, Mapping) or set(data) != set(names):
            raise DataError(f"{source}: expected the fields {names}, got {data!r}")
        try:
            return cls(**{k: data[k] for k in names})
        except (ConfigError, TypeError) as e:
            raise DataError(f"{source}: {e}") from e

    def fit(self, volumes: Sequence[Any], name: str) -> IntensityNormalization:
        """These settings, measured on the training volume(s) where the method needs it.

        Args:
          volumes: `[z, y, x]` (or `[z, y, x, c]`) training volumes: numpy
            arrays or lazy volumes with `.shape` and slicing along z; each is
            read on a strided subsample (`strided_sample`).
          name: the volumes' name for errors, e.g. "training raw".

        Returns:
          `self` for "dtype"; for "percentiles" a copy with `low` and `high`,
          the nearest-rank percentiles of the pooled subsamples.

        Raises:
          DataError: a volume holds NaN or Inf, is not numeric, or its
            percentiles coincide (a constant volume).
        """
        if self.method == DTYPE:
            return self
        budget = max(1, MAX_STATISTICS_VOXELS // max(1, len(volumes)))
        sample = np.concatenate([strided_sample(v, budget).ravel() for v in volumes])
        _check_numeric(sample, name)
        _check_finite(sample, name)
        low, high = np.percentile(sample, [self.low_percent, self.high_percent], method="nearest")
        if not low < high:
            raise DataError(
                f"{name}: the {self.low_percent} and {self.high_percent} percentiles are both "
                f"{float(low)}; percentile normalisation needs a volume with contrast"
            )
        logging.info(
            "%s: intensity percentiles %s -> %s, %s -> %s",
            name,
            self.low_percent,
            float(low),
            self.high_percent,
            float(high),
        )
        return dataclasses.replace(self, low=float(low), high=float(high))


DTYPE_RANGE = IntensityNormalization()


def normalize_intensity(
    values: Any, normalization: IntensityNormalization, name: str
) -> np.ndarray:
    """Raw intensities as the network's float32 input (a new array).

    Args:
      values: intensities of any shape (a patch, block, window or slice
        batch): unsigned integers or floats (any numeric dtype for
        "percentiles").
      normalization: the model's normalisation (measured, for percentiles).
      name: the volume's name for errors, e.g. "test raw".

    Returns:
      float32 array of `values`' shape, in [0, 1].

    Raises:
      DataError: `values` holds NaN or Inf; under "dtype", signed integers,
        or floats outside [0, 1].
      ConfigError: percentile settings that were never measured.
    """
    values = np.asarray(values)
    _check_numeric(values, name)
    if normalization.method == PERCENTILES:
        if not normalization.measured:
            raise ConfigError(
                f"{name}: percentile normalisation used before its percentiles were measured "
                "on the training volume (IntensityNormalization.fit)"
            )
        x = values.astype(np.float32)
        _check_finite(x, name)
        low, high = np.float32(normalization.low), np.float32(normalization.high)
        return np.clip((x - low) / (high - low), np.float32(0.0), np.float32(1.0))
    if values.dtype.kind == "u":
        # Integer / max in float32: exact for uint8 and uint16, and equal to the
        # historical `/ 255` bit for bit (IEEE division is correctly rounded).
        return values.astype(np.float32) / np.float32(np.iinfo(values.dtype).max)
    if values.dtype.kind == "f":
        _check_finite(values, name)
        if values.size and (values.min() < 0 or values.max() > 1):
            raise DataError(
                f"{name}: float intensities span [{float(values.min())}, "
                f"{float(values.max())}]; {CONFIG_KEY}.method='dtype' expects floats in "
                f"[0, 1] (use method='percentiles' for other ranges)"
            )
        return values.astype(np.float32)
    raise DataError(
        f"{name}: dtype {values.dtype} has no [0, 1] range for {CONFIG_KEY}.method='dtype'; "
        "expected unsigned integers or floats in [0, 1] (or use method='percentiles')"
    )


class NormalizedVolume:
    """Lazy float32 view of a raw volume: each read window is normalised on its own.

    For code that reads windows of a volume (block-wise prediction, pruning
    windows): nothing is converted but what is read.

    Args:
      raw: `[z, y, x]` (or `[z, y, x, c]`) array-like with `.shape` and numpy
        slicing.
      normalization: as `normalize_intensity`.
      name: the volume's name for errors.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, raw: Any, normalization: IntensityNormalization, name: str):
        self.raw = raw
        self.normalization = normalization
        self.name = name
        self.shape = tuple(int(s) for s in raw.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        return normalize_intensity(np.asarray(self.raw[index]), self.normalization, self.name)


class TrainedParams(NamedTuple):
    """A model's parameters with the intensity normalisation they were trained on.

    Returned by the stages' train and load functions and taken by their
    predict functions, so that prediction cannot apply another convention.
    """

    params: Any
    intensity: IntensityNormalization


def strided_sample(volume: Any, max_voxels: int = MAX_STATISTICS_VOXELS) -> np.ndarray:
    """Every s-th voxel along z, y and x, with the smallest s giving <= `max_voxels`.

    Reads one z slice at a time (lazy volumes need only slicing along z).

    Args:
      volume: `[z, y, x]` or `[z, y, x, c]` array-like.
      max_voxels: most voxels (z, y, x positions) returned.

    Returns:
      `[ceil(z / s), ceil(y / s), ceil(x / s)(, c)]` array in the volume's dtype.
    """
    shape = tuple(int(n) for n in volume.shape[:3])
    stride = max(1, math.floor((math.prod(shape) / max_voxels) ** (1 / 3)))
    while math.prod(math.ceil(n / stride) for n in shape) > max_voxels:
        stride += 1
    if isinstance(volume, np.ndarray):
        return volume[::stride, ::stride, ::stride]
    return np.stack(
        [np.asarray(volume[z : z + 1])[0, ::stride, ::stride] for z in range(0, shape[0], stride)]
    )


def save_normalization(normalization: IntensityNormalization, directory: Any) -> pathlib.Path:
    """Writes `normalization` into a model's checkpoint folder (`INTENSITY_FILE`).

    Training calls this before its first step. A folder that already holds
    checkpoints keeps the normalisation they were trained with: a different
    one is refused rather than mixed into a resumed or reused model.

    Args:
      normalization: measured settings (`fit`).
      directory: the model's checkpoint folder (`checkpoint.checkpoint_dir`).

    Returns:
      The file written (or found identical).

    Raises:
      ConfigError: the folder's checkpoints were trained with another
        normalisation (checkpoints without the file count as "dtype").
      ConfigError: percentile settings that were never measured.
    """
    if not normalization.measured:
        raise ConfigError("save_normalization: measure the percentiles first (fit)")
    directory = pathlib.Path(directory)
    path = directory / INTENSITY_FILE
    if path.exists():
        previous = load_normalization(directory)
    elif directory.is_dir() and any(directory.iterdir()):
        # Checkpoints from before this file existed were trained on dtype range.
        previous = DTYPE_RANGE
    else:
        previous = None
    if previous is not None and previous != normalization:
        raise ConfigError(
            f"{directory}: its checkpoints were trained with intensity "
            f"{previous.to_dict()}, this run asks for {normalization.to_dict()} "
            f"({CONFIG_KEY} or a different training volume); use a new workdir"
        )
    return files.write_json(path, normalization.to_dict())


def load_normalization(directory: Any) -> IntensityNormalization:
    """The normalisation saved in a model's checkpoint folder.

    A folder without the file (a workdir from before it existed) gets "dtype",
    the convention those models were trained with, and a warning.

    Raises:
      DataError: the file is not a saved normalisation.
    """
    path = pathlib.Path(directory) / INTENSITY_FILE
    if not path.exists():
        logging.warning("%s is absent: assuming intensity method 'dtype' (uint8 / 255)", path)
        return DTYPE_RANGE
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e})") from e
    return IntensityNormalization.from_dict(data, source=str(path))


def _check_numeric(values: np.ndarray, name: str) -> None:
    if values.dtype.kind not in "uif":
        raise DataError(f"{name}: dtype {values.dtype}; expected integer or float intensities")


def _check_finite(values: np.ndarray, name: str) -> None:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise DataError(f"{name}: {bad} NaN or Inf intensities; expected finite values")
