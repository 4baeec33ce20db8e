"""Attention maps of the EM instance network: Grad-CAM on the last backbone stage.

What the network attends to when it scores a detection (the paper shows
such heat maps over the EM slices). Grad-CAM (Selvaraju et al., 2017): for
a detection's box, the score is its foreground logit minus its background
logit from the box head; its gradient with respect to the decoder map that
the ROI heads read (the backbone's last stage before them) is averaged over
the map into one weight per channel; the map's channels, weighted and
summed, through a ReLU, give the heat map, which is repeated up to the input
grid (the map's stride) and scaled to a maximum of 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from synjax.errors import DataError
from synjax.models.instance_unet import InstanceUNet


@functools.lru_cache(maxsize=8)
def _cam_function(model: InstanceUNet):
    """The jitted `(params, image [z, y, x], boxes [n, 6]) -> [n, z', y', x']` Grad-CAM.

    Cached per model (Linen modules compare and hash by their settings), so that
    the attention maps of one run compile once.
    """
    level = model.settings.roi_name

    def cam(params, image, boxes):
        variables = {"params": params}
        maps = model.apply(variables, image[None, ..., None], method=InstanceUNet.maps)

        def scores(level_map):
            replaced = dict(maps)
            replaced[level] = level_map
            logits = model.apply(variables, replaced, boxes[None], method=InstanceUNet.box_logits)
            return logits[0, :, 1] - logits[0, :, 0]

        activations = maps[level]
        gradients = jax.jacrev(scores)(activations)  # [n, 1, z', y', x', c]
        weights = jnp.mean(gradients[:, 0], axis=(1, 2, 3))  # [n, c]
        return jax.nn.relu(jnp.einsum("nc,zyxc->nzyx", weights, activations[0]))

    return jax.jit(cam)


def grad_cam(model: InstanceUNet, params, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Grad-CAM heat maps of detections.

    Args:
      model: the instance network (either mode: only its parts are used).
      params: its parameters.
      image: [z, y, x] normalised input block (a valid network input).
      boxes: [n, 6] detection boxes (z0, y0, x0, z1, y1, x1) in block voxels.

    Returns:
      [n, z, y, x] float32 heat maps in [0, 1] (all zeros where the score's
      gradient gives no positive evidence).
    """
    image = np.asarray(image, np.float32)
    boxes = np.asarray(boxes, np.float32)
    if image.ndim != 3 or boxes.ndim != 2 or boxes.shape[1] != 6:
        raise DataError(
            f"grad_cam: image {image.shape}, boxes {boxes.shape}; expected [z, y, x] and [n, 6]"
        )
    if boxes.shape[0] == 0:
        return np.zeros((0, *image.shape), np.float32)
    settings = model.settings
    cam = _cam_function(model)(params, jnp.asarray(image), jnp.asarray(boxes))
    cam = np.asarray(cam, np.float32)
    for axis, stride in enumerate(settings.backbone.feature_strides[settings.roi_name], start=1):
        cam = np.repeat(cam, stride, axis=axis)
    peak = cam.reshape(cam.shape[0], -1).max(axis=1)
    cam = cam / np.where(peak > 0, peak, 1.0)[:, None, None, None]
    return cam[:, : image.shape[0], : image.shape[1], : image.shape[2]]
