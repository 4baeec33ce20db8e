"""Random training patches from one or more volumes.

A source is a mapping of same-shaped arrays (`raw`, labels, masks): numpy
arrays or lazy `Volume`-like objects with `.shape` and numpy slicing, of which
only the patch is read. Each example is an input-sized patch, augmented, with
the input keys stacked as channels and every other key centre-cropped to the
output size of a valid-padding network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from synjax.data.augment import AugmentSettings, augment
from synjax.data.intensity import DTYPE_RANGE, IntensityNormalization, normalize_intensity
from synjax.errors import ConfigError, DataError
from synjax.geometry import SPATIAL_DIMS, Box
from synjax.io.cremi_volume import CREMI_BACKGROUND

INPUT_KEY = "input"


def is_positive(values: np.ndarray) -> np.ndarray:
    """Foreground of a label or mask array: non-zero and not CREMI's background.

    Args:
      values: `[z, y, x]` or `[z, y, x, c]` labels, mask or scores.

    Returns:
      `[z, y, x]` bool, true where any channel is foreground.
    """
    values = np.asarray(values)
    positive = values != 0
    if values.dtype == np.uint64:
        positive &= values != CREMI_BACKGROUND
    return positive.any(axis=-1) if positive.ndim > SPATIAL_DIMS else positive


def center_crop(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Central `shape` (z, y, x) part of `array` `[z, y, x, ...]`.

    The margin on each side is `(in - out) // 2` before and the rest after,
    i.e. what a valid-padding network removes.
    """
    start = [(size - out) // 2 for size, out in zip(array.shape[:SPATIAL_DIMS], shape, strict=True)]
    return array[Box.at(start, shape).slices()]


class PatchSampler:
    """Draws augmented training patches from a list of sources.

    Args:
      sources: mappings of key -> `[z, y, x]` or `[z, y, x, c]` arrays (same
        z, y, x shape within a source, same keys over sources).
      input_shape: z, y, x size of the network input.
      output_shape: z, y, x size of the network output (targets are cropped
        to it); None: same as the input.
      input_keys: keys stacked as input channels, in this order.
      augment: augmentation settings; None: no augmentation.
      seed: seed of `batch`'s random streams.
      sample_weights: relative probability of each source; None: proportional
        to its number of patch positions.
      mask_key: key of a mask; patches are centred only on its foreground
        (e.g. the labelled region).
      positive_key: key whose foreground (see `is_positive`) the patch centre
        lies on with probability `positive_fraction` (for sparse targets such
        as synaptic clefts).
      positive_fraction: probability of a positive-centred patch.
      intensity: how the input keys' values become the network's [0, 1]
        input (`synjax.data.intensity`; measured already, for percentiles),
        applied to each patch as it is read; default: the dtype's range.

    Mask and positive arrays are read whole, once, at construction.

    Raises:
      DataError: a source lacks a key, its arrays disagree in shape, or a patch
        of `input_shape` does not fit it; no positive voxel anywhere.
      ConfigError: bad shapes, weights or fraction.
    """

    def __init__(
        self,
        sources: Sequence[Mapping[str, Any]],
        input_shape: Sequence[int],
        output_shape: Sequence[int] | None = None,
        input_keys: Sequence[str] = ("raw",),
        augment: AugmentSettings | None = None,
        seed: int = 0,
        sample_weights: Sequence[float] | None = None,
        mask_key: str | None = None,
        positive_key: str | None = None,
        positive_fraction: float = 0.5,
        intensity: IntensityNormalization = DTYPE_RANGE,
    ):
        self.input_shape = _check_shape("input_shape", input_shape)
        self.output_shape = (
            self.input_shape if output_shape is None else _check_shape("output_shape", output_shape)
        )
        if any(o > i for o, i in zip(self.output_shape, self.input_shape, strict=True)):
            raise ConfigError(
                f"output_shape {self.output_shape} is larger than input_shape {self.input_shape}"
            )
        if not sources:
            raise ConfigError("PatchSampler: no sources given")
        if not intensity.measured:
            raise ConfigError(
                "PatchSampler: percentile intensity normalisation must be measured on the "
                "training volume first (IntensityNormalization.fit)"
            )
        if not 0.0 <= positive_fraction <= 1.0:
            raise ConfigError(f"positive_fraction={positive_fraction}: expected a value in [0, 1]")
        self.sources = list(sources)
        self.input_keys = tuple(input_keys)
        self.augment_settings = augment
        self.seed = seed
        self.mask_key = mask_key
        self.positive_key = positive_key
        self.positive_fraction = positive_fraction
        self.intensity = intensity
        required = set(self.input_keys) | {k for k in (mask_key, positive_key) if k}
        self.target_keys = tuple(k for k in self.sources[0] if k not in self.input_keys)
        self.shapes = [self._check_source(i, s, required) for i, s in enumerate(self.sources)]
        # Patch centres run over a box of this many positions per source.
        self._box_shapes = [
            tuple(s - p + 1 for s, p in zip(shape, self.input_shape, strict=True))
            for shape in self.shapes
        ]
        self.weights = self._weights(sample_weights)
        self._allowed = [self._candidates(s, mask_key, None) for s in self.sources]
        self._positives = [self._candidates(s, mask_key, positive_key) for s in self.sources]
        if positive_key and positive_fraction > 0 and not any(len(p) for p in self._positives):
            raise DataError(
                f"positive_key {positive_key!r}: no foreground voxel where a patch of "
                f"{self.input_shape} can be centred in any source"
            )
        if mask_key and not any(len(a) for a in self._allowed):
            raise DataError(f"mask_key {mask_key!r}: the mask is empty in every source")

    def _check_source(self, index: int, source: Mapping[str, Any], required: set[str]):
        missing = sorted(required - set(source))
        if missing or set(source) - set(self.input_keys) != set(self.target_keys):
            raise DataError(
                f"source {index}: keys {sorted(source)}; expected {sorted(required)} and "
                f"the same keys as source 0 ({sorted(self.sources[0])})"
            )
        if INPUT_KEY in source:
            raise DataError(f"source {index}: key {INPUT_KEY!r} is reserved for the stacked input")
        shape = None
        for key, array in source.items():
            key_shape = tuple(int(s) for s in np.shape(array))
            if len(key_shape) not in (SPATIAL_DIMS, SPATIAL_DIMS + 1):
                raise DataError(
                    f"source {index} key {key!r}: expected [z, y, x] or [z, y, x, c], "
                    f"got shape {key_shape}"
                )
            if shape is not None and key_shape[:SPATIAL_DIMS] != shape:
                raise DataError(
                    f"source {index} key {key!r}: z, y, x shape {key_shape[:SPATIAL_DIMS]} "
                    f"differs from the other keys' {shape}"
                )
            shape = key_shape[:SPATIAL_DIMS]
            if any(s < p for s, p in zip(shape, self.input_shape, strict=True)):
                raise DataError(
                    f"source {index} key {key!r}: a patch of input_shape {self.input_shape} "
                    f"does not fit its shape {key_shape}"
                )
        return shape

    def _weights(self, sample_weights: Sequence[float] | None) -> np.ndarray:
        if sample_weights is None:
            weights = np.array([np.prod(b) for b in self._box_shapes], np.float64)
        else:
            weights = np.asarray(sample_weights, np.float64)
            if weights.shape != (len(self.sources),) or (weights < 0).any() or weights.sum() <= 0:
                raise ConfigError(
                    f"sample_weights {list(weights)}: expected {len(self.sources)} "
                    "non-negative numbers with a positive sum"
                )
        return weights / weights.sum()

    def _candidates(
        self, source: Mapping[str, Any], mask_key: str | None, positive_key: str | None
    ) -> np.ndarray:
        """Flat indices (into the centre box) of allowed centres; empty if unrestricted."""
        if mask_key is None and positive_key is None:
            return np.zeros((0,), np.int64)
        lo = [p // 2 for p in self.input_shape]
        box = Box.at(lo, _box_of(source, self.input_shape)).slices()
        allowed = None
        for key in (mask_key, positive_key):
            if key is not None:
                positive = is_positive(source[key][box])
                allowed = positive if allowed is None else allowed & positive
        return np.flatnonzero(allowed)

    def sample_location(self, rng: np.random.Generator) -> tuple[int, tuple[int, int, int]]:
        """Draws a source and the z, y, x origin (first voxel) of an input patch."""
        positive = bool(self.positive_key) and rng.random() < self.positive_fraction
        candidates = self._positives if positive else self._allowed
        restricted = positive or self.mask_key is not None
        weights = self.weights
        if restricted:
            weights = weights * np.array([len(c) > 0 for c in candidates])
            weights = weights / weights.sum()
        index = int(rng.choice(len(self.sources), p=weights))
        box_shape = self._box_shapes[index]
        if restricted:
            flat = candidates[index][rng.integers(len(candidates[index]))]
            # Centre-box index i is the patch whose centre is i + input // 2,
            # i.e. whose origin is i.
            origin = np.unravel_index(flat, box_shape)
        else:
            origin = rng.integers(0, box_shape)
        return index, tuple(int(o) for o in origin)

    def read(
        self, index: int, origin: Sequence[int], rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """The example whose input patch starts at `origin` in source `index`.

        Args:
          index: source index.
          origin: z, y, x of the patch's first voxel.
          rng: random generator for augmentation; None: no augmentation.

        Returns:
          "input" `[z, y, x, channels]` float32 of `input_shape` (normalised
          by `intensity`, then augmented), and every
          other key centre-cropped to `output_shape`, `[z, y, x]` or
          `[z, y, x, c]` in its stored dtype.
        """
        window = Box.at(origin, self.input_shape).slices()
        patch = {key: np.asarray(array[window]) for key, array in self.sources[index].items()}
        for key in self.input_keys:
            patch[key] = normalize_intensity(
                patch[key], self.intensity, name=f"training source {index} key {key!r}"
            )
        if self.augment_settings is not None and rng is not None:
            patch = augment(patch, rng, self.augment_settings, intensity_keys=self.input_keys)
        channels = [
            patch[key][..., None] if patch[key].ndim == SPATIAL_DIMS else patch[key]
            for key in self.input_keys
        ]
        example = {INPUT_KEY: np.concatenate(channels, axis=-1).astype(np.float32)}
        for key in self.target_keys:
            example[key] = np.ascontiguousarray(center_crop(patch[key], self.output_shape))
        return example

    def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One random, augmented example (see `read` for the keys and shapes)."""
        index, origin = self.sample_location(rng)
        return self.read(index, origin, rng)

    def batch(
        self, step: int, batch_size: int, shard: int = 0, num_shards: int = 1
    ) -> dict[str, np.ndarray]:
        """The examples of training step `step`, deterministic in (seed, step, shard).

        Args:
          step: training step.
          batch_size: global batch size.
          shard: this process's index (`jax.process_index()`).
          num_shards: number of processes; each returns `batch_size // num_shards`.

        Returns:
          "input" `[batch, z, y, x, channels]` and targets `[batch, z, y, x(, c)]`.
        """
        if batch_size < 1 or batch_size % num_shards:
            raise ConfigError(
                f"config.train.batch_size={batch_size}: expected a positive multiple of "
                f"the process count {num_shards}"
            )
        key = [self.seed, step] if num_shards == 1 else [self.seed, step, shard]
        rng = np.random.default_rng(key)
        examples = [self.sample(rng) for _ in range(batch_size // num_shards)]
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def _box_of(source: Mapping[str, Any], input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = np.shape(next(iter(source.values())))[:SPATIAL_DIMS]
    return tuple(s - p + 1 for s, p in zip(shape, input_shape, strict=True))


def _check_shape(name: str, shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != SPATIAL_DIMS or min(shape) < 1:
        raise ConfigError(f"{name}={shape}: expected three positive sizes (z, y, x)")
    return shape
