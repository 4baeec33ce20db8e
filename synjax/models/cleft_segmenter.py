"""The two-step baseline's network: the instance network's U-Net as a binary cleft segmenter.

The approach the end-to-end network improves on: the same backbone
(`synjax.models.instance_unet.UNetBackbone`) with a 1x1x1 convolution on its
finest decoder map gives one cleft logit per voxel; thresholds and connected
components (`synjax.postprocess.components`) then make the instances.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from synjax.models.conv import Conv3D
from synjax.models.instance_unet import UNetBackbone, UNetBackboneSettings


class CleftSegmenter(nn.Module):
    """`[b, z, y, x, 1]` images -> `[b, z, y, x, 1]` cleft logits (sigmoid: probability).

    Attributes:
      backbone: settings of the U-Net (the instance network's).
    """

    backbone: UNetBackboneSettings = UNetBackboneSettings()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        maps = UNetBackbone(self.backbone, name="backbone")(x)
        return Conv3D(1, (1, 1, 1), dtype=self.backbone.dtype, name="logits")(maps["D0"])
