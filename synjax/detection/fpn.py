"""Feature pyramid network (Lin et al., 2017) over a 3D backbone's C2..C5.

Each level's map gets a 1x1x1 lateral conv to `features` channels; from the
coarsest level down, the coarser result is up-sampled by nearest neighbour to
the finer level's shape and added; a 3x3x3 conv then smooths each sum. With
anisotropic backbones the ratio between two levels differs per axis (e.g.
(1, 2, 2) between C2 and C3 of the default `ResNet3D`), so the factors are
read from the shapes: ceil(fine / coarse) per axis, cropped back to the fine
shape where a size was odd (the backbone rounds sizes up, so the first
coarse voxel covers the first fine voxels, as in torchvision's FPN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synjax.errors import ConfigError, DataError
from synjax.geometry import Triple, spatial_triple
from synjax.models.conv import Conv3D


@dataclasses.dataclass(frozen=True)
class FPNSettings:
    """Typed settings of `FPN3D`.

    Attributes:
      features: channels of every output map P2..P5 (and P6).
      output_kernel: (kz, ky, kx) of the smoothing conv after each sum.
      p6_strides: if set, also return "P6": P5 subsampled with these strides
        (torchvision's 1-wide max-pool), a coarser level for large anchors;
        None returns P2..P5 only.
      dtype: computation dtype; None follows the input.
    """

    features: int = 256
    output_kernel: Triple = (3, 3, 3)
    p6_strides: Triple | None = None
    dtype: Any = None

    def __post_init__(self):
        if self.features < 1:
            raise ConfigError(f"FPNSettings.features={self.features}; expected >= 1")
        kernel = spatial_triple(self.output_kernel, "FPNSettings.output_kernel")
        object.__setattr__(self, "output_kernel", kernel)
        if self.p6_strides is not None:
            strides = spatial_triple(self.p6_strides, "FPNSettings.p6_strides")
            object.__setattr__(self, "p6_strides", strides)


def upsample_nearest_to(x: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Nearest-neighbour up-sampling of x to spatial `shape`.

    Each axis repeats by ceil(target / size) and keeps the first `target`
    voxels, so output voxel i copies input voxel i // factor.

    Args:
      x: [batch, z, y, x, c].
      shape: target (z, y, x), each at least the input's size.

    Returns:
      [batch, *shape, c].
    """
    for axis, (have, want) in enumerate(zip(x.shape[1:4], shape, strict=True), start=1):
        if want < have:
            raise DataError(f"cannot up-sample size {have} to {want} along axis {axis}")
        factor = -(-want // have)
        if factor > 1:
            x = jnp.repeat(x, factor, axis=axis)
        x = jax.lax.slice_in_dim(x, 0, want, axis=axis)
    return x


def _level(name: str, prefix: str) -> int:
    if len(name) < 2 or name[0] != prefix or not name[1:].isdigit():
        raise DataError(f"feature map name {name!r}; expected {prefix}<level>, e.g. {prefix}2")
    return int(name[1:])


class FPN3D(nn.Module):
    """Feature pyramid over backbone maps {"C2": ..., "C5": ...}.

    Call: `model.apply({"params": params}, features)` with `features` a
    mapping "C{k}" -> `[batch, z_k, y_k, x_k, c_k]` (any levels; a finer
    level must be at least as large as a coarser one on every axis) ->
    {"P{k}": `[batch, z_k, y_k, x_k, settings.features]`}, plus "P6" when
    `settings.p6_strides` is set. Parameters: `lateral{k}`, `output{k}`.
    """

    settings: FPNSettings = FPNSettings()

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        s = self.settings
        if not features:
            raise DataError("FPN3D got no feature maps; expected {'C2': ..., 'C5': ...}")
        levels = sorted((_level(name, "C"), name) for name in features)
        outputs = {}
        top_down = None
        for level, name in reversed(levels):
            x = features[name]
            lateral = Conv3D(s.features, (1, 1, 1), dtype=s.dtype, name=f"lateral{level}")(x)
            if top_down is not None:
                lateral = lateral + upsample_nearest_to(top_down, lateral.shape[1:4])
            top_down = lateral
            outputs[f"P{level}"] = Conv3D(
                s.features, s.output_kernel, dtype=s.dtype, name=f"output{level}"
            )(lateral)
        if s.p6_strides is not None:
            coarsest = levels[-1][0]
            sz, sy, sx = s.p6_strides
            outputs[f"P{coarsest + 1}"] = outputs[f"P{coarsest}"][:, ::sz, ::sy, ::sx]
        return {name: outputs[name] for name in sorted(outputs, key=lambda n: int(n[1:]))}
