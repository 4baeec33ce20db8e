"""Provenance of cached outputs: which model and which input made them.

An output that a later run reuses (a block-wise prediction and its manifest,
a tuned parameter file) records a provenance dict, and a run compares it with
its own before reusing anything. The conventional layout:

    {"model": {"name": str, "step": int | None, "params_hash": str},
     "input": {"path": str | None, "dataset": str | None,
               "shape": [int, ...], "dtype": str, "fingerprint": str}}

Fingerprints are cheap by design: parameters are hashed whole (they are small
next to a volume), a volume is hashed whole only up to `FULL_HASH_BYTES` and
otherwise through `SAMPLE_COUNT` boxes at fixed places, so a huge volume is
never read in full. A sampled fingerprint misses a change that lies entirely
outside the sampled boxes; the path, shape and dtype are compared too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from synjax.geometry import Box

# Volumes up to this size are hashed in full (16 MiB: a fraction of a second).
FULL_HASH_BYTES = 1 << 24
# Larger volumes: this many boxes of at most SAMPLE_EDGE voxels per axis.
SAMPLE_COUNT = 8
SAMPLE_EDGE = 64
# blake2b digest size in bytes (32 hex characters): collisions are not a concern.
DIGEST_BYTES = 16


def _leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) pairs of a nested mapping/sequence, mappings in sorted key order."""
    if isinstance(tree, Mapping):
        for key in sorted(tree, key=str):
            yield from _leaves(tree[key], f"{path}/{key}")
    elif isinstance(tree, list | tuple):
        for index, item in enumerate(tree):
            yield from _leaves(item, f"{path}/{index}")
    else:
        yield path, tree


def params_fingerprint(params: Any) -> str:
    """Hash of a parameter tree: its structure, every leaf's dtype, shape and bytes.

    The same values give the same hash whatever the containers (dict or
    FrozenDict) or devices (numpy or jax arrays) hold them, so parameters in
    memory and the same parameters restored from a checkpoint agree.

    Args:
      params: nested mappings (or sequences) of arrays, e.g. a Flax
        `variables["params"]`.

    Returns:
      32 hex characters.
    """
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for path, leaf in _leaves(params):
        array = np.asarray(leaf)
        digest.update(json.dumps([path, str(array.dtype), list(array.shape)]).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def model_provenance(name: str, step: int | None, params: Any) -> dict[str, Any]:
    """`{"name", "step", "params_hash"}` of a model's parameters (see `params_fingerprint`)."""
    return {
        "name": str(name),
        "step": None if step is None else int(step),
        "params_hash": params_fingerprint(params),
    }


def describe_model(model: Mapping[str, Any] | None) -> str:
    """A model provenance in words, e.g. "proximity step 8 (params 1a2b3c4d5e6f)"."""
    if model is None:
        return "none"
    params = str(model.get("params_hash"))[:12]
    return f"{model.get('name')} step {model.get('step')} (params {params})"


def sample_boxes(
    shape: Sequence[int], count: int = SAMPLE_COUNT, edge: int = SAMPLE_EDGE
) -> list[tuple[slice, ...]]:
    """Fixed boxes spread over a volume: the first and last corners, then seeded places.

    Args:
      shape: the volume's shape (any rank; `[z, y, x(, c)]`).
      count: number of boxes.
      edge: largest box size along each axis.

    Returns:
      `count` index tuples, the same for the same `shape`.
    """
    shape = tuple(int(s) for s in shape)
    size = tuple(min(s, edge) for s in shape)
    span = np.asarray([s - b for s, b in zip(shape, size, strict=True)])
    # Seeded, so the places depend on the shape only; corners catch edits
    # (and crops) at either end.
    fractions = np.random.default_rng(0).random((count, len(shape)))
    if count >= 1:
        fractions[0] = 0.0
    if count >= 2:
        fractions[1] = 1.0
    starts = np.round(fractions * span).astype(np.int64)
    return [Box.at(start, size).slices() for start in starts]


def input_fingerprint(
    volume: Any,
    path: str | os.PathLike | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Provenance of an input volume: where it came from, its shape, dtype and content hash.

    Args:
      volume: a numpy array or anything with `.shape`, `.dtype` and numpy
        slicing (a `synjax.io` volume, an h5py dataset); only the sampled
        boxes are read when it is larger than `FULL_HASH_BYTES`.
      path: the file it was read from, if any (recorded as an absolute path).
      dataset: the dataset inside that file, if any.

    Returns:
      `{"path", "dataset", "shape", "dtype", "fingerprint", "sampled"}`; the
      fingerprint is 32 hex characters, "sampled" says whether it covers only
      sampled boxes.
    """
    shape = [int(s) for s in volume.shape]
    dtype = np.dtype(volume.dtype)
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    digest.update(json.dumps([shape, dtype.str]).encode())
    sampled = int(np.prod(shape)) * dtype.itemsize > FULL_HASH_BYTES
    boxes = sample_boxes(shape) if sampled else [tuple(slice(0, s) for s in shape)]
    for box in boxes:
        digest.update(json.dumps([[b.start, b.stop] for b in box]).encode())
        digest.update(np.ascontiguousarray(np.asarray(volume[box], dtype)).tobytes())
    return {
        "path": None if path is None else os.path.abspath(os.fspath(path)),
        "dataset": dataset,
        "shape": shape,
        "dtype": dtype.name,
        "fingerprint": digest.hexdigest(),
        "sampled": sampled,
    }


def plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(value, default=_to_builtin))


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """What differs between a recorded and a current provenance, one phrase per leaf.

    Args:
      recorded: the provenance found with a cached output (from JSON).
      current: the provenance of this run.
      prefix: dotted path of both values (for nested calls).

    Returns:
      e.g. `["model.step: 8 -> 16", "model.params_hash: 1a2b... -> 9f8e..."]`;
      empty when they agree.
    """
    recorded, current = plain(recorded), plain(current)
    if isinstance(recorded, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(recorded) | set(current)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in recorded:
                found.append(f"{name}: not recorded -> {current[key]!r}")
            elif key not in current:
                found.append(f"{name}: {recorded[key]!r} -> not given")
            else:
                found += differences(recorded[key], current[key], name)
        return found
    if recorded != current:
        return [f"{prefix or 'provenance'}: {recorded!r} -> {current!r}"]
    return []
