"""Region proposal network head (Ren et al., 2015) for 3D feature pyramids.

One head, shared by every pyramid level: a 3x3x3 conv with ReLU (Chen et
al. keep its maps to 128 channels, against 256 in 2D Mask R-CNN, to fit 3D
volumes in memory), then two 1x1x1 convs: an objectness logit per anchor
and `BOX_DIM` box deltas per anchor, in the order that the box coder
decodes. Output voxel (z, y, x) holds its anchors in the anchor generator's
order: the deltas of anchor a are conv channels [a * BOX_DIM, (a + 1) * BOX_DIM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from synjax.errors import ConfigError, DataError
from synjax.geometry import Triple, spatial_triple
from synjax.models.conv import Conv3D

# Values per 3D box delta: centre offsets and log sizes along z, y and x.
BOX_DIM = 6
# Small initial predictions (detectron2's std 0.01): proposals start near the
# anchors and objectness near 0.5.
RPN_INIT = nn.initializers.normal(stddev=0.01)


@dataclasses.dataclass(frozen=True)
class RPNSettings:
    """Typed settings of `RPNHead`.

    Attributes:
      features: channels of the shared conv (128 in the paper).
      num_anchors: anchors per voxel of each level (3: the paper's scales
        [2, 4, 8] at one aspect ratio).
      conv_kernel: (kz, ky, kx) of the shared conv.
      dtype: computation dtype; None follows the input.
    """

    features: int = 128
    num_anchors: int = 3
    conv_kernel: Triple = (3, 3, 3)
    dtype: Any = None

    def __post_init__(self):
        if self.features < 1 or self.num_anchors < 1:
            raise ConfigError(
                f"RPNSettings.features={self.features}, num_anchors={self.num_anchors}; "
                "expected >= 1"
            )
        kernel = spatial_triple(self.conv_kernel, "RPNSettings.conv_kernel")
        object.__setattr__(self, "conv_kernel", kernel)


class RPNHead(nn.Module):
    """Objectness logits and box deltas for every anchor of every level.

    Call: `model.apply({"params": params}, features)` with `features` a
    mapping level name -> `[batch, z, y, x, c]` (the same c on every level)
    -> `(objectness, deltas)`, dicts with the same keys:
    objectness `[batch, z, y, x, num_anchors]` (logits; sigmoid = probability
    of an object) and deltas `[batch, z, y, x, num_anchors, BOX_DIM]`. One set
    of parameters (`conv`, `objectness`, `deltas`) serves all levels.
    """

    settings: RPNSettings = RPNSettings()

    @nn.compact
    def __call__(
        self, features: Mapping[str, jax.Array]
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        s = self.settings
        if not features:
            raise DataError("RPNHead got no feature maps; expected {'P2': ..., ...}")
        # Layers built once and called per level: Flax shares their parameters.
        shared = Conv3D(s.features, s.conv_kernel, dtype=s.dtype, name="conv")
        objectness = Conv3D(
            s.num_anchors, (1, 1, 1), dtype=s.dtype, kernel_init=RPN_INIT, name="objectness"
        )
        deltas = Conv3D(
            s.num_anchors * BOX_DIM,
            (1, 1, 1),
            dtype=s.dtype,
            kernel_init=RPN_INIT,
            name="deltas",
        )
        logits_out, deltas_out = {}, {}
        for name, x in features.items():
            if x.ndim != 5:
                raise DataError(f"RPNHead input {name!r} shape {x.shape}; expected 5 dimensions")
            h = nn.relu(shared(x))
            logits_out[name] = objectness(h)
            d = deltas(h)
            deltas_out[name] = d.reshape(*d.shape[:-1], s.num_anchors, BOX_DIM)
        return logits_out, deltas_out
