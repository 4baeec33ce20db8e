"""Checks of input files and of the values read from them, shared by every loader.

`require_file` names the config key, the dataset and where to download it when
a file named by a config is absent. A single NaN in a raw EM volume spreads
through smoothing, watersheds and networks and ends as an empty result with
no hint of why; loaders call `require_finite` right after reading so that the
file and dataset are named instead.
"""

from __future__ import annotations

import os

import numpy as np

from synjax.errors import DataError

# dtype kinds that can hold NaN or infinity: floating and complex.
_INEXACT_KINDS = "fc"


def require_file(path: str, key: str, dataset: str, published_at: str) -> str:
    """Checks that a dataset file named by a config field exists.

    Args:
      path: the file path from the config, optionally with `:/dataset`.
      key: the config key that holds the path, e.g. "config.data.train_path".
      dataset: the dataset's name, e.g. "CREMI sample A".
      published_at: where a user can download it.

    Returns:
      The path unchanged.

    Raises:
      DataError: the file does not exist.
    """
    file_part = path.split(":/", 1)[0] if path else path
    if not file_part or not os.path.exists(file_part):
        raise DataError(
            f"{key}={path!r}: {dataset} not found; download it from {published_at} "
            f"and set {key} to its path"
        )
    return path


def require_finite(array: np.ndarray, where: str) -> np.ndarray:
    """Returns `array` unchanged if every value is finite; raises otherwise.

    Integer and boolean arrays cannot hold NaN or infinity and are returned
    without looking at their values. Floating arrays are summed in float64
    first (no array-sized temporary): the sum is finite whenever every value
    is, and only a non-finite sum (a NaN or infinity, or an overflow) makes
    the check look voxel by voxel.

    Args:
      array: values of any shape, e.g. `[z, y, x]` raw intensities.
      where: what was read, named in the error, e.g. "sample_A.h5:/volumes/raw".

    Returns:
      `array` as a numpy array.

    Raises:
      DataError: some value is NaN or infinite; the message gives how many
        and the index of the first.
    """
    array = np.asarray(array)
    if array.dtype.kind not in _INEXACT_KINDS or array.size == 0:
        return array
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is checked below
        total = np.sum(array, dtype=np.result_type(array.dtype, np.float64))
    if np.isfinite(total):
        return array
    nan_count = int(np.count_nonzero(np.isnan(array)))
    inf_count = int(np.count_nonzero(np.isinf(array)))
    if nan_count == inf_count == 0:
        return array  # the float64 sum overflowed; every value is finite
    first = np.unravel_index(int(np.argmax(~np.isfinite(array).ravel())), array.shape)
    raise DataError(
        f"{where}: {nan_count} NaN and {inf_count} infinite value(s) among {array.size} "
        f"(first at index {tuple(int(i) for i in first)} of the array read); expected finite "
        "values"
    )
