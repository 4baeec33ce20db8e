"""Atomic writes of the small result files (metrics.json, reports)."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from synjax.io import atomic


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON-friendly Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(path: str | os.PathLike, data: dict) -> pathlib.Path:
    """Writes `data` (numpy values allowed) as indented JSON, atomically.

    A failure part-way leaves any previous file untouched; the new file is
    fsync'ed before the rename (`synjax.io.atomic.write_text_atomic`).
    """
    return atomic.write_text_atomic(path, json.dumps(_plain(data), indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)
