"""Ilastik-like pixel classification: a small random forest on voxel features.

The classical baseline that Chen et al. compare their 3D Mask R-CNN with is
Ilastik's pixel classification (a random forest on filter responses) followed
by a watershed. Here the forest is scikit-learn's `RandomForestClassifier` on
`synjax.data.voxel_features`, trained on the instance labels of a training
volume instead of brush strokes:

- foreground samples are voxels inside an instance (label > 0);
- as many background samples, a share `band_share` of them from a band of
  background within `band_nm` of an instance (the rims and gaps that Ilastik
  users paint most, since that is where the classifier errs), the rest from
  background farther away. Where a pool is smaller than its share, the other
  pool makes up the difference, so the sample stays balanced.

Features are computed in z slabs read with `feature_halo` margins, so neither
training nor prediction holds the features of a whole large volume: training
draws its sample first and gathers it slab by slab; prediction writes each
slab's foreground probability into the output.

The trained forest is saved with joblib as `<workdir>/pixel_forest.joblib`
(`FOREST_FILE`), with its settings, the training resolution and a SHA-256
fingerprint of the training image, labels, resolution and settings;
`train_or_load_pixel_forest` reuses a saved forest only when the fingerprint
matches, so a changed training volume or setting retrains it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import edt
import joblib
import numpy as np
from sklearn.ensemble import RandomForestClassifier

from synjax.data.voxel_features import DEFAULT_SCALES, feature_halo, voxel_features
from synjax.errors import ConfigError, DataError
from synjax.io.layout import FOREST_FILE

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PixelForestSettings:
    """How the pixel forest is trained and applied.

    Attributes:
        scales: feature scales, in units of the finest voxel side (`voxel_features`).
        n_trees: trees in the forest.
        max_depth: depth limit of each tree; keeps the forest small and smooth.
        samples_per_class: foreground samples drawn (fewer if the volume has
            fewer); as many background samples.
        band_nm: width of the background band around instances, in nm.
        band_share: fraction of the background samples taken from the band.
        slab_z: z slices per slab whose features are held at once (plus halo).
        n_jobs: scikit-learn worker threads for fitting and prediction.
        random_state: seed of the sample and the forest.
    """

    scales: tuple[float, ...] = DEFAULT_SCALES
    n_trees: int = 50
    max_depth: int = 12
    samples_per_class: int = 20_000
    band_nm: float = 300.0
    band_share: float = 0.5
    slab_z: int = 8
    n_jobs: int = 1
    random_state: int = 0

    def __post_init__(self):
        if self.n_trees < 1 or self.max_depth < 1 or self.samples_per_class < 1:
            raise ConfigError(
                f"pixel forest n_trees={self.n_trees}, max_depth={self.max_depth}, "
                f"samples_per_class={self.samples_per_class}: expected positive integers"
            )
        if self.band_nm < 0 or not 0.0 <= self.band_share <= 1.0:
            raise ConfigError(
                f"pixel forest band_nm={self.band_nm}, band_share={self.band_share}: expected "
                "band_nm >= 0 and band_share in [0, 1]"
            )
        if self.slab_z < 1:
            raise ConfigError(f"pixel forest slab_z={self.slab_z}: expected >= 1 z slices")


@dataclasses.dataclass
class PixelForest:
    """A trained forest with what is needed to apply it and to tell if it is stale.

    Attributes:
        classifier: the fitted scikit-learn forest (classes 0 = background, 1 = foreground).
        settings: the settings it was trained with.
        resolution: voxel size in nm, z-y-x, of the training volume; features
            depend on it, so prediction requires the same.
        fingerprint: `training_fingerprint` of the training inputs.
    """

    classifier: RandomForestClassifier
    settings: PixelForestSettings
    resolution: tuple[float, float, float]
    fingerprint: str

    def predict(self, image: np.ndarray, resolution: Sequence[float]) -> np.ndarray:
        """Foreground probability of every voxel; see `predict_foreground`."""
        return predict_foreground(self, image, resolution)


def _check_volume(image: np.ndarray, labels: np.ndarray | None = None) -> None:
    if image.ndim != 3:
        raise DataError(f"pixel forest expects a [z, y, x] image, got shape {image.shape}")
    if labels is not None and labels.shape != image.shape:
        raise DataError(
            f"pixel forest: labels shape {labels.shape} differs from image shape {image.shape}"
        )


def training_fingerprint(
    image: np.ndarray,
    labels: np.ndarray,
    resolution: Sequence[float],
    settings: PixelForestSettings,
) -> str:
    """SHA-256 (hex) of the training image, labels, resolution and settings.

    The arrays are hashed by shape, dtype and bytes, so any changed voxel, or
    the same values in another dtype, gives another fingerprint.
    """
    digest = hashlib.sha256()
    for array in (np.asarray(image), np.asarray(labels)):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype.str}".encode())
        digest.update(array.tobytes())
    record = {
        "resolution": [float(r) for r in resolution],
        "settings": dataclasses.asdict(settings),
    }
    digest.update(json.dumps(record, sort_keys=True).encode())
    return digest.hexdigest()


def sample_training_voxels(
    labels: np.ndarray, resolution: Sequence[float], settings: PixelForestSettings
) -> tuple[np.ndarray, np.ndarray]:
    """A balanced sample of foreground and background voxels (see the module docstring).

    Args:
        labels: `[z, y, x]` instance labels, 0 = background.
        resolution: voxel size in nm, z-y-x (for the band's width).
        settings: sample sizes, band and seed.

    Returns:
        `(flat_indices, targets)`: sorted int64 indices into `labels.ravel()`
        and their uint8 class (1 foreground, 0 background).

    Raises:
        DataError: if the labels have no foreground or no background voxel.
    """
    labels = np.asarray(labels)
    foreground = labels > 0
    n_foreground = int(foreground.sum())
    if n_foreground == 0 or n_foreground == labels.size:
        raise DataError(
            "pixel forest training labels need both foreground (> 0) and background (0) "
            f"voxels; got {n_foreground} foreground of {labels.size}"
        )
    # Distance (nm) of each background voxel to the nearest instance voxel.
    distance = edt.edt(~foreground, anisotropy=tuple(float(r) for r in resolution))
    background = ~foreground.ravel()
    in_band = background & (distance.ravel() <= settings.band_nm)
    beyond = background & ~in_band

    rng = np.random.default_rng(settings.random_state)
    n_per_class = min(settings.samples_per_class, n_foreground, int(background.sum()))
    band_pool, far_pool = np.flatnonzero(in_band), np.flatnonzero(beyond)
    n_band = min(round(settings.band_share * n_per_class), len(band_pool))
    n_far = min(n_per_class - n_band, len(far_pool))
    n_band = n_per_class - n_far  # the band makes up for a small far pool
    picked = [
        rng.choice(np.flatnonzero(foreground.ravel()), n_per_class, replace=False),
        rng.choice(band_pool, n_band, replace=False),
        rng.choice(far_pool, n_far, replace=False),
    ]
    targets = np.repeat(np.array([1, 0], np.uint8), [n_per_class, n_band + n_far])
    indices = np.concatenate(picked).astype(np.int64)
    order = np.argsort(indices)
    return indices[order], targets[order]


def slab_features(
    image: np.ndarray, resolution: Sequence[float], scales: Sequence[float], slab_z: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Voxel features of successive z slabs, each computed with its halo.

    Yields:
        `(z0, z1, features)`: features `[z1 - z0, y, x, n_features]` float32 of
        `image[z0:z1]`, equal to those of the whole volume there.
    """
    halo_z = feature_halo(scales, resolution)[0]
    depth = image.shape[0]
    for z0 in range(0, depth, slab_z):
        z1 = min(z0 + slab_z, depth)
        lo, hi = max(0, z0 - halo_z), min(depth, z1 + halo_z)
        # Features need 2 slices; a 1-slice volume cannot have features at all.
        if hi - lo < 2:
            raise DataError(f"pixel forest needs >= 2 z slices, got image of shape {image.shape}")
        yield z0, z1, voxel_features(image[lo:hi], resolution, scales)[z0 - lo : z1 - lo]


def train_pixel_forest(
    image: np.ndarray,
    labels: np.ndarray,
    resolution: Sequence[float],
    settings: PixelForestSettings | None = None,
) -> PixelForest:
    """Fits the forest on a balanced voxel sample of one training volume.

    Args:
        image: `[z, y, x]` training intensities.
        labels: `[z, y, x]` instance labels, 0 = background.
        resolution: voxel size in nm, z-y-x.
        settings: forest and sampling settings (defaults if None).

    Returns:
        The trained `PixelForest`.

    Raises:
        DataError: for mismatched shapes or labels with a single class.
    """
    settings = settings or PixelForestSettings()
    image, labels = np.asarray(image), np.asarray(labels)
    _check_volume(image, labels)
    indices, targets = sample_training_voxels(labels, resolution, settings)
    plane = image.shape[1] * image.shape[2]
    rows = []
    for z0, z1, features in slab_features(image, resolution, settings.scales, settings.slab_z):
        inside = indices[(indices >= z0 * plane) & (indices < z1 * plane)] - z0 * plane
        rows.append(features.reshape(-1, features.shape[-1])[inside])
    classifier = RandomForestClassifier(
        n_estimators=settings.n_trees,
        max_depth=settings.max_depth,
        n_jobs=settings.n_jobs,
        random_state=settings.random_state,
    )
    # `indices` is sorted, so the slabs' rows come in the order of `targets`.
    classifier.fit(np.concatenate(rows), targets)
    return PixelForest(
        classifier=classifier,
        settings=settings,
        resolution=tuple(float(r) for r in resolution),
        fingerprint=training_fingerprint(image, labels, resolution, settings),
    )


def predict_foreground(
    forest: PixelForest, image: np.ndarray, resolution: Sequence[float]
) -> np.ndarray:
    """Foreground probability of every voxel, slab by slab.

    Args:
        forest: a trained `PixelForest`.
        image: `[z, y, x]` intensities, same kind of data as the training volume.
        resolution: voxel size in nm, z-y-x; must equal the training resolution.

    Returns:
        `[z, y, x]` float32 probabilities in [0, 1].

    Raises:
        DataError: if the image is not 3D or its resolution differs from the training one.
    """
    image = np.asarray(image)
    _check_volume(image)
    if not np.allclose(resolution, forest.resolution, rtol=1e-3):
        raise DataError(
            f"pixel forest trained at resolution {forest.resolution} nm cannot classify a "
            f"volume at {tuple(resolution)} nm: its features depend on the voxel size"
        )
    foreground_column = int(np.flatnonzero(forest.classifier.classes_ == 1)[0])
    probability = np.empty(image.shape, np.float32)
    settings = forest.settings
    for z0, z1, features in slab_features(image, resolution, settings.scales, settings.slab_z):
        rows = features.reshape(-1, features.shape[-1])
        slab = forest.classifier.predict_proba(rows)[:, foreground_column]
        probability[z0:z1] = slab.reshape(features.shape[:3])
    return probability


def save_pixel_forest(forest: PixelForest, workdir: str | Path) -> Path:
    """Writes the forest to `<workdir>/pixel_forest.joblib`; returns that path."""
    path = Path(workdir) / FOREST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "classifier": forest.classifier,
        "settings": dataclasses.asdict(forest.settings),
        "resolution": forest.resolution,
        "fingerprint": forest.fingerprint,
    }
    # Write then rename, so that a killed run never leaves half a forest behind.
    partial = path.with_suffix(".partial")
    joblib.dump(record, partial)
    partial.replace(path)
    return path


def load_pixel_forest(workdir: str | Path) -> PixelForest:
    """Reads the forest that `save_pixel_forest` wrote into `workdir`.

    Raises:
        DataError: if the file is missing or not a saved pixel forest.
    """
    path = Path(workdir) / FOREST_FILE
    if not path.is_file():
        raise DataError(f"{path}: no saved pixel forest (expected {FOREST_FILE} in the workdir)")
    try:
        record = joblib.load(path)
        settings = dict(record["settings"])
        settings["scales"] = tuple(settings["scales"])
        return PixelForest(
            classifier=record["classifier"],
            settings=PixelForestSettings(**settings),
            resolution=tuple(record["resolution"]),
            fingerprint=str(record["fingerprint"]),
        )
    except (KeyError, TypeError, EOFError, ValueError) as error:
        raise DataError(f"{path}: not a saved pixel forest ({error})") from error


def train_or_load_pixel_forest(
    image: np.ndarray,
    labels: np.ndarray,
    resolution: Sequence[float],
    settings: PixelForestSettings | None,
    workdir: str | Path,
) -> PixelForest:
    """The forest saved in `workdir` if it was trained on these inputs, else a new one.

    A new forest (none saved, or a saved one whose fingerprint differs from
    these inputs') is trained and saved over the old file.
    """
    settings = settings or PixelForestSettings()
    fingerprint = training_fingerprint(image, labels, resolution, settings)
    if (Path(workdir) / FOREST_FILE).is_file():
        saved = load_pixel_forest(workdir)
        if saved.fingerprint == fingerprint:
            return saved
        log.info("pixel forest in %s is stale (other training inputs); retraining", workdir)
    forest = train_pixel_forest(image, labels, resolution, settings)
    save_pixel_forest(forest, workdir)
    return forest
