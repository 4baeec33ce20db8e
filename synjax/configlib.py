"""Helpers that config files import.

Config files are loaded by path (`--config=configs/demo.py:smoke`), so they
cannot import each other; what they share lives here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import ml_collections

from synjax.errors import ConfigError, DataError


def variant(arg: str | None, known: Iterable[str], config_name: str) -> str:
    """Returns the variant named after the colon in `--config=file.py:variant`.

    Args:
      arg: the text after the colon, or None for the default variant.
      known: variant names the config file defines ("default" among them).
      config_name: the config file's name, for the error message.

    Raises:
      ConfigError: the variant is not one of `known`.
    """
    name = arg or "default"
    known = tuple(known)
    if name not in known:
        raise ConfigError(f"{config_name}: unknown variant {name!r}; expected one of {list(known)}")
    return name


def config_dict(fields: dict) -> ml_collections.ConfigDict:
    """A ConfigDict whose nested dicts become ConfigDicts too."""
    return ml_collections.ConfigDict(fields)


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
