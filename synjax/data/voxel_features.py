"""Ilastik-like per-voxel features of an anisotropic volume.

The classical baseline of the fluorescence pipeline (Chen et al. compare their
3D Mask R-CNN with "Ilastik pixel classification + watershed") classifies each
voxel from a stack of filter responses at several scales, as Ilastik's pixel
classification workflow does. Per scale these are:

- Gaussian smoothing;
- Laplacian of Gaussian (the trace of the Hessian below);
- Gaussian gradient magnitude;
- difference of Gaussians, G(sigma) - G(0.66 sigma) (Ilastik's ratio);
- the 3 eigenvalues of the structure tensor, with Ilastik's scales: derivatives
  of the image smoothed at sigma, averaged over a window of sigma / 2;
- the 3 eigenvalues of the Hessian of Gaussian.

Eigenvalues are in decreasing order, as scikit-image returns them.

Anisotropy: a scale is given in units of the finest voxel side (Ilastik's
convention on isotropic data), and every axis gets the same *physical* sigma,
`scale * min(resolution)` nm, i.e. `sigma_axis = scale * min(resolution) /
resolution[axis]` voxels. On 1000 x 96 x 96 nm voxels a scale of 1.6 is
sigma 1.6 voxels in y and x and 0.15 in z.

Derivatives are finite differences on the Gaussian-smoothed image
(`np.gradient`, `scipy.ndimage.sobel` inside `skimage.feature.structure_tensor`,
and `skimage.feature.hessian_matrix` with `use_gaussian_derivatives=False`),
not Gaussian-derivative kernels: along z the sigma is often well below one
voxel, where a sampled second-derivative-of-Gaussian kernel degenerates to a
large multiple of the identity, while a finite difference stays a derivative.
Derivatives are then rescaled to physical units (per finest-voxel side), so
that a z step of 10 in-plane voxels weighs 10 times less per voxel than a y
step, and eigenvalues compare like with like.

Block-wise use: the features of a voxel depend on the image within
`feature_halo(...)` voxels of it along each axis, so features of a block read
with that halo and cropped equal the features of the whole volume there. The
halo is at most `ceil(6 * largest sigma) + 2` voxels per axis: the structure
tensor reaches 4 sigma (smoothing) + 1 (Sobel) + 4 * sigma / 2 (window),
the Hessian 4 sigma + 2 (two differences). Borders are reflected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi
from skimage.feature import (
    hessian_matrix,
    hessian_matrix_eigvals,
    structure_tensor,
    structure_tensor_eigenvalues,
)

from synjax.errors import ConfigError, DataError
from synjax.geometry import voxel_size

# Ilastik's default scales are 0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0; puncta are
# about 5 in-plane voxels across (0.5 um at 96 nm), so the middle ones matter.
DEFAULT_SCALES = (0.7, 1.6, 3.5, 5.0)
# Ilastik's difference of Gaussians: G(sigma) - G(DOG_RATIO * sigma).
DOG_RATIO = 0.66
# Ilastik's structure tensor window (outer scale) relative to its derivative scale.
STRUCTURE_WINDOW_RATIO = 0.5
# scipy's default Gaussian truncation, in sigmas; scikit-image's gaussian uses it too.
TRUNCATE = 4.0
# Border handling of every filter; scipy's default, so blocks and volumes agree.
MODE = "reflect"
# A 3D Sobel filter returns 32 x the derivative of a linear ramp: the central
# difference (2 x the slope) times [1, 2, 1] smoothing (sum 4) on two axes.
SOBEL_GAIN_3D = 32.0
FEATURES_PER_SCALE = (
    "gaussian",
    "laplacian_of_gaussian",
    "gradient_magnitude",
    "difference_of_gaussians",
    "structure_tensor_ev0",
    "structure_tensor_ev1",
    "structure_tensor_ev2",
    "hessian_ev0",
    "hessian_ev1",
    "hessian_ev2",
)


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0 or not all(np.isfinite(scales)):
        raise ConfigError(f"feature scales {scales}: expected one or more positive numbers")
    return scales


def sigmas_per_axis(scale: float, resolution: Sequence[float]) -> tuple[float, float, float]:
    """Gaussian sigma in voxels along z, y, x for one scale.

    Args:
        scale: sigma in units of the finest voxel side.
        resolution: voxel size in nm, z-y-x.

    Returns:
        `(sigma_z, sigma_y, sigma_x)` = `scale * min(resolution) / resolution`.
    """
    res = voxel_size(resolution)
    return tuple(float(s) for s in scale * res.min() / res)


def feature_names(scales: Sequence[float] = DEFAULT_SCALES) -> list[str]:
    """Names of the feature channels, in the order `voxel_features` returns them."""
    return [f"{name}_s{s:g}" for s in _check_scales(scales) for name in FEATURES_PER_SCALE]


def _radius(sigma: float) -> int:
    # scipy.ndimage's Gaussian kernel radius for the default truncation.
    return int(TRUNCATE * sigma + 0.5)


def feature_halo(
    scales: Sequence[float] = DEFAULT_SCALES, resolution: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[int, int, int]:
    """Voxels along z, y, x beyond which the image does not change a voxel's features.

    Args:
        scales: feature scales (units of the finest voxel side).
        resolution: voxel size in nm, z-y-x.

    Returns:
        `(halo_z, halo_y, halo_x)`: read a block with this margin, compute its
        features, crop the margin, and they equal the whole volume's there.
    """
    halo = np.zeros(3, int)
    for scale in _check_scales(scales):
        for axis, sigma in enumerate(sigmas_per_axis(scale, resolution)):
            window = sigma * STRUCTURE_WINDOW_RATIO
            reach = max(_radius(sigma) + 1 + _radius(window), _radius(sigma) + 2)
            halo[axis] = max(halo[axis], reach)
    return tuple(int(h) for h in halo)


def _to_physical(
    elements: list[np.ndarray], spacing: np.ndarray, gain: float = 1.0
) -> list[np.ndarray]:
    """Upper-diagonal entries (i, j) of a per-voxel tensor of derivative pairs
    (voxel units, as scikit-image returns them), divided by
    `gain * spacing_i * spacing_j` to give physical units."""
    pairs = [(i, j) for i in range(3) for j in range(i, 3)]
    return [
        (e / (gain * spacing[i] * spacing[j])).astype(np.float32)
        for e, (i, j) in zip(elements, pairs, strict=True)
    ]


def voxel_features(
    image: np.ndarray,
    resolution: Sequence[float],
    scales: Sequence[float] = DEFAULT_SCALES,
) -> np.ndarray:
    """Ilastik-like filter responses of every voxel at several scales.

    Args:
        image: `[z, y, x]` intensities, any real dtype; at least 2 voxels per axis.
        resolution: voxel size in nm, z-y-x.
        scales: sigmas in units of the finest voxel side (see the module docstring).

    Returns:
        `[z, y, x, 10 * len(scales)]` float32, channels named by `feature_names(scales)`.

    Raises:
        DataError: if the image is not 3D, is too small or holds non-finite values.
        ConfigError: for a bad resolution or scale.
    """
    image = np.asarray(image)
    if image.ndim != 3 or min(image.shape) < 2:
        raise DataError(
            f"voxel features expect a [z, y, x] image with >= 2 voxels per axis, got {image.shape}"
        )
    image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise DataError("voxel features: the image holds NaN or infinite values")
    scales = _check_scales(scales)
    res = voxel_size(resolution)
    spacing = res / res.min()

    out = np.empty((*image.shape, len(FEATURES_PER_SCALE) * len(scales)), np.float32)
    channel = 0
    for scale in scales:
        sigma = sigmas_per_axis(scale, res)
        smoothed = ndi.gaussian_filter(image, sigma, mode=MODE, truncate=TRUNCATE)
        narrower = ndi.gaussian_filter(
            image, [s * DOG_RATIO for s in sigma], mode=MODE, truncate=TRUNCATE
        )
        gradient = np.gradient(smoothed)
        magnitude = np.sqrt(sum((g / step) ** 2 for g, step in zip(gradient, spacing, strict=True)))
        # The Hessian smooths with the same sigma and truncation as `smoothed`.
        hessian = _to_physical(
            hessian_matrix(image, sigma, mode=MODE, use_gaussian_derivatives=False), spacing
        )
        hessian_ev = hessian_matrix_eigvals(hessian)
        # Diagonal entries of the upper triangle: (0,0), (1,1), (2,2) at 0, 3, 5.
        laplacian = hessian[0] + hessian[3] + hessian[5]
        window = [s * STRUCTURE_WINDOW_RATIO for s in sigma]
        tensor = _to_physical(
            structure_tensor(smoothed, window, mode=MODE), spacing, SOBEL_GAIN_3D**2
        )
        tensor_ev = structure_tensor_eigenvalues(tensor)

        responses = [smoothed, laplacian, magnitude, smoothed - narrower, *tensor_ev, *hessian_ev]
        for response in responses:
            out[..., channel] = response
            channel += 1
    return out
