"""Second-stage heads of the 3D Mask R-CNN: box head and mask head.

Both read ROI features `[rois, z, y, x, channels]` pooled by ROIAlign from
the pyramid. Chen et al.'s heads:

* Box head: a conv with the ROI's own size (7x7x3 x-y-z, "VALID": a dense
  layer over the whole ROI, written as a conv), a 1x1x1 conv, then two dense
  layers: class logits and per-class box deltas.
* Mask head: four 3x3x3 convs (padding 1), a 2x2x2 stride-2 transposed conv
  with ReLU, a 3x3x3 conv to one mask logit per class (the sigmoid is left
  to the loss and to inference).

The transposed conv has kernel = stride, so each input voxel writes its own
output block: it is exactly a matrix product plus a reshape
(`conv.ConvTranspose3D` with implementation "folded"). That is the default
here on every backend: XLA's 3D transposed convolution is many times slower,
on GPU as on CPU. Measured on one H200 (jax 0.11.2, 20 timed calls after
warm-up), [64, 7, 14, 14, 256] -> [64, 14, 28, 28, 256]: forward 3.4 ms
native against 0.97 ms as a matmul, gradient 21.6 ms against 1.06 ms
(float32); bfloat16 2.1 / 0.55 ms and 6.9 / 0.65 ms.

Class indices: `num_classes` counts foreground classes (1 for synapses).
Class logits have num_classes + 1 entries, 0 = background (torchvision's
order); box deltas and mask logits have one entry per foreground class,
class c at index c - 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from synjax.detection.rpn import BOX_DIM
from synjax.errors import ConfigError, DataError
from synjax.geometry import Triple, spatial_triple
from synjax.models.conv import IMPLEMENTATIONS, Conv3D, ConvTranspose3D
from synjax.models.resnet3d import HE_NORMAL, group_norm

# detectron2's initial spreads of the predictors: class scores near uniform,
# box deltas near zero (the proposals), mask logits near zero.
CLASS_INIT = nn.initializers.normal(stddev=0.01)
BOX_INIT = nn.initializers.normal(stddev=0.001)
MASK_INIT = nn.initializers.normal(stddev=0.001)


def _check_rois(name: str, rois: jax.Array) -> None:
    if rois.ndim != 5:
        raise DataError(f"{name} input shape {rois.shape}; expected [rois, z, y, x, channels]")


@dataclasses.dataclass(frozen=True)
class BoxHeadSettings:
    """Typed settings of `BoxHead`.

    Attributes:
      num_classes: foreground classes (1: synapse).
      roi_size: (z, y, x) of the pooled ROI features, also the first conv's
        kernel: (3, 7, 7) is the paper's 7x7x3 (x-y-z).
      hidden_features: channels of both convs (the width of the two "fc" layers).
      norm_groups: GroupNorm groups after each conv; 0 for none.
      dtype: computation dtype; None follows the input.
    """

    num_classes: int = 1
    roi_size: Triple = (3, 7, 7)
    hidden_features: int = 512
    norm_groups: int = 0
    dtype: Any = None

    def __post_init__(self):
        if self.num_classes < 1 or self.hidden_features < 1 or self.norm_groups < 0:
            raise ConfigError(
                f"BoxHeadSettings num_classes={self.num_classes}, "
                f"hidden_features={self.hidden_features}, norm_groups={self.norm_groups}; "
                "expected >= 1, >= 1, >= 0"
            )
        object.__setattr__(
            self, "roi_size", spatial_triple(self.roi_size, "BoxHeadSettings.roi_size")
        )


def _conv_norm_relu(x, features, kernel, padding, norm_groups, dtype, name):
    """Conv (bias only without norm), optional GroupNorm, ReLU."""
    x = Conv3D(
        features,
        kernel,
        padding=padding,
        use_bias=norm_groups == 0,
        dtype=dtype,
        kernel_init=HE_NORMAL,
        name=name,
    )(x)
    if norm_groups:
        x = group_norm(features, norm_groups, dtype, f"{name}_norm")(x)
    return nn.relu(x)


class BoxHead(nn.Module):
    """Classifies ROIs and refines their boxes.

    Call: `model.apply({"params": params}, rois)` with rois
    `[num_rois, *settings.roi_size, channels]` -> `(class_logits
    [num_rois, num_classes + 1], box_deltas [num_rois, num_classes, BOX_DIM])`.
    Parameters: `conv1` (kernel = roi_size), `conv2` (1x1x1), `class_logits`,
    `box_deltas`.
    """

    settings: BoxHeadSettings = BoxHeadSettings()

    @nn.compact
    def __call__(self, rois: jax.Array) -> tuple[jax.Array, jax.Array]:
        s = self.settings
        _check_rois("BoxHead", rois)
        if tuple(rois.shape[1:4]) != s.roi_size:
            raise DataError(
                f"BoxHead ROI features of size {tuple(rois.shape[1:4])}; expected "
                f"BoxHeadSettings.roi_size={s.roi_size}"
            )
        f = s.hidden_features
        # "VALID" with kernel = ROI size: one output voxel, a dense layer over the ROI.
        h = _conv_norm_relu(rois, f, s.roi_size, "VALID", s.norm_groups, s.dtype, "conv1")
        h = _conv_norm_relu(h, f, (1, 1, 1), "VALID", s.norm_groups, s.dtype, "conv2")
        h = h.reshape(h.shape[0], f)
        class_logits = nn.Dense(
            s.num_classes + 1, dtype=s.dtype, kernel_init=CLASS_INIT, name="class_logits"
        )(h)
        box_deltas = nn.Dense(
            s.num_classes * BOX_DIM, dtype=s.dtype, kernel_init=BOX_INIT, name="box_deltas"
        )(h)
        return class_logits, box_deltas.reshape(-1, s.num_classes, BOX_DIM)


@dataclasses.dataclass(frozen=True)
class MaskHeadSettings:
    """Typed settings of `MaskHead`.

    Attributes:
      num_classes: foreground classes (1: synapse); one mask logit each.
      features: channels of the convs and of the transposed conv.
      num_convs: "SAME" convs before the up-sampling (4 in the paper).
      conv_kernel: (kz, ky, kx) of those convs.
      upsample_factors: (fz, fy, fx) of the transposed conv (kernel = stride).
      logits_kernel: (kz, ky, kx) of the last conv (3x3x3 in the paper).
      norm_groups: GroupNorm groups after each conv; 0 for none.
      upconv_implementation: `ConvTranspose3D.implementation`; "folded" (a
        matrix product) everywhere by default, see the module docstring.
      dtype: computation dtype; None follows the input.
    """

    num_classes: int = 1
    features: int = 256
    num_convs: int = 4
    conv_kernel: Triple = (3, 3, 3)
    upsample_factors: Triple = (2, 2, 2)
    logits_kernel: Triple = (3, 3, 3)
    norm_groups: int = 0
    upconv_implementation: str = "folded"
    dtype: Any = None

    def __post_init__(self):
        if self.num_classes < 1 or self.features < 1 or self.num_convs < 0:
            raise ConfigError(
                f"MaskHeadSettings num_classes={self.num_classes}, features={self.features}, "
                f"num_convs={self.num_convs}; expected >= 1, >= 1, >= 0"
            )
        if self.norm_groups < 0:
            raise ConfigError(f"MaskHeadSettings.norm_groups={self.norm_groups}; expected >= 0")
        if self.upconv_implementation not in IMPLEMENTATIONS:
            raise ConfigError(
                f"MaskHeadSettings.upconv_implementation={self.upconv_implementation!r}; "
                f"expected one of {IMPLEMENTATIONS}"
            )
        for field in ("conv_kernel", "upsample_factors", "logits_kernel"):
            value = spatial_triple(getattr(self, field), f"MaskHeadSettings.{field}")
            object.__setattr__(self, field, value)


class MaskHead(nn.Module):
    """Mask logits for ROIs, at `upsample_factors` times the ROI resolution.

    Call: `model.apply({"params": params}, rois)` with rois
    `[num_rois, z, y, x, channels]` -> mask logits
    `[num_rois, z * fz, y * fy, x * fx, num_classes]`. Parameters: `conv1` ..
    `conv{num_convs}`, `upconv` (kernel [fz, fy, fx, features, features], as
    `nn.ConvTranspose`'s), `mask_logits`.
    """

    settings: MaskHeadSettings = MaskHeadSettings()

    @nn.compact
    def __call__(self, rois: jax.Array) -> jax.Array:
        s = self.settings
        _check_rois("MaskHead", rois)
        h = rois
        for i in range(s.num_convs):
            h = _conv_norm_relu(
                h, s.features, s.conv_kernel, "SAME", s.norm_groups, s.dtype, f"conv{i + 1}"
            )
        h = ConvTranspose3D(
            s.features,
            s.upsample_factors,
            dtype=s.dtype,
            kernel_init=HE_NORMAL,
            implementation=s.upconv_implementation,
            name="upconv",
        )(h)
        h = nn.relu(h)
        return Conv3D(
            s.num_classes, s.logits_kernel, dtype=s.dtype, kernel_init=MASK_INIT, name="mask_logits"
        )(h)
