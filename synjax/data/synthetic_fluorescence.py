"""Synthetic two-photon / confocal volumes of dense fluorescent synaptic puncta.

Puncta are ellipsoids about 0.5 um across placed by Poisson sampling, so at the
default density many touch. Overlapping ellipsoids are split by their
normalised distance (each voxel goes to the punctum whose ellipsoid it is
deepest inside), which keeps every punctum one instance. The image is the
puncta's brightness blurred by an anisotropic Gaussian point-spread function
(wider in z), seen through Poisson shot noise and Gaussian read noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
from scipy.spatial import cKDTree

from synjax.errors import ConfigError
from synjax.geometry import spatial_triple, voxel_size

# Each voxel considers this many nearest puncta centres; more than any voxel
# can overlap at the supported densities.
_NEAREST_CANDIDATES = 8
# Ratio of a Gaussian's full width at half maximum to its sigma.
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclasses.dataclass(frozen=True)
class FluorescenceSyntheticSettings:
    """How a synthetic fluorescence volume looks. Lengths in nm.

    Attributes:
      density: puncta per cubic micrometre.
      punctum_diameter_nm: (min, max) in-plane diameter of a punctum.
      punctum_z_stretch: (min, max) z diameter over in-plane diameter.
      min_separation: least centre distance, as a fraction of the mean
        diameter; below 1 puncta overlap and touch.
      brightness_photons: median peak photons of a punctum (before the PSF).
      brightness_spread: log-normal sigma of the punctum brightness.
      background_photons: mean photons of the background per voxel.
      psf_fwhm_nm: full width at half maximum of the PSF, z-y-x.
      read_noise: std of the Gaussian read noise, in photons.
    """

    density: float = 1.0
    punctum_diameter_nm: tuple[float, float] = (400.0, 600.0)
    punctum_z_stretch: tuple[float, float] = (1.0, 1.5)
    min_separation: float = 0.7
    brightness_photons: float = 60.0
    brightness_spread: float = 0.3
    background_photons: float = 5.0
    psf_fwhm_nm: tuple[float, float, float] = (800.0, 300.0, 300.0)
    read_noise: float = 2.0


def _centres(rng, extent_nm: np.ndarray, count: int, min_distance: float) -> np.ndarray:
    """Poisson centres in the box, later ones dropped where closer than `min_distance`."""
    centres = rng.uniform(0.0, 1.0, size=(count, 3)) * extent_nm
    if count < 2 or min_distance <= 0:
        return centres
    pairs = cKDTree(centres).query_pairs(min_distance, output_type="ndarray")
    keep = np.ones(count, bool)
    keep[pairs.max(axis=1)] = False
    return centres[keep]


def make_fluorescence_volume(
    shape: Sequence[int] = (32, 128, 128),
    resolution: Sequence[float] = (200.0, 100.0, 100.0),
    seed: int = 0,
    density: float | None = None,
    settings: FluorescenceSyntheticSettings | None = None,
    **overrides,
) -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence volume of dense puncta and their instance labels.

    Args:
      shape: volume size in voxels, z-y-x.
      resolution: voxel size in nm, z-y-x.
      seed: seed of `np.random.default_rng`; equal arguments give equal volumes.
      density: puncta per cubic micrometre (default `settings.density`).
      settings: base look; `overrides` replace its fields by name.

    Returns:
      image: [z, y, x] float32 photon counts (noisy, may dip below 0 by read noise).
      labels: [z, y, x] uint32 punctum instances 1..n (0 = background).

    Raises:
      ConfigError: bad shape, resolution, density or unknown setting name.
    """
    s = settings or FluorescenceSyntheticSettings()
    known = {f.name for f in dataclasses.fields(FluorescenceSyntheticSettings)}
    if unknown := sorted(set(overrides) - known):
        raise ConfigError(
            f"make_fluorescence_volume got unknown settings {unknown}; expected fields of "
            "FluorescenceSyntheticSettings"
        )
    if density is not None:
        overrides["density"] = density
    s = dataclasses.replace(s, **overrides)
    spatial_triple(shape, "shape")
    voxel_size(resolution)
    if s.density < 0:
        raise ConfigError(f"density={s.density}: expected puncta per um^3 >= 0")
    shape = tuple(int(n) for n in shape)
    res = np.asarray(resolution, np.float64)
    rng = np.random.default_rng(seed)

    extent = np.asarray(shape) * res
    count = rng.poisson(s.density * np.prod(extent) / 1e9)
    mean_diameter = float(np.mean(s.punctum_diameter_nm))
    centres = _centres(rng, extent, count, s.min_separation * mean_diameter)
    n = len(centres)
    diameter = rng.uniform(*s.punctum_diameter_nm, size=n)
    semi = 0.5 * np.stack([diameter * rng.uniform(*s.punctum_z_stretch, size=n), diameter], 1)
    semi_axes = semi[:, [0, 1, 1]]
    brightness = s.brightness_photons * rng.lognormal(0.0, s.brightness_spread, size=n)

    labels = np.zeros(shape, np.uint32)
    if n:
        voxels = np.stack(np.meshgrid(*[np.arange(k) for k in shape], indexing="ij"), -1)
        points = (voxels.reshape(-1, 3) + 0.5) * res
        k = min(_NEAREST_CANDIDATES, n)
        _, nearest = cKDTree(centres).query(points, k=k)
        nearest = nearest.reshape(len(points), k)
        # Normalised ellipsoid radius to each candidate; < 1 means inside it.
        q = np.linalg.norm((points[:, None, :] - centres[nearest]) / semi_axes[nearest], axis=-1)
        best = np.argmin(q, axis=1)
        inside = q[np.arange(len(points)), best] < 1.0
        labels.ravel()[inside] = nearest[inside, best[inside]] + 1
    # Puncta lost to the voxel grid (too small or swallowed by neighbours) leave
    # no gap in the ids.
    present = np.unique(labels)
    lut = np.zeros(n + 1, np.uint32)
    lut[present] = np.arange(len(present), dtype=np.uint32)
    labels = lut[labels]
    intensity = np.zeros(len(present), np.float64)
    intensity[1:] = brightness[present[1:] - 1]

    sigma_vox = np.asarray(s.psf_fwhm_nm) / _FWHM_PER_SIGMA / res
    expected = scipy.ndimage.gaussian_filter(intensity[labels], sigma_vox) + s.background_photons
    image = rng.poisson(expected).astype(np.float32)
    image += rng.normal(0.0, s.read_noise, size=shape).astype(np.float32)
    return image, labels
