"""synjax.models: Flax networks and their losses."""

from synjax.models.layers import PReLU
from synjax.models.losses import weighted_mse, weighted_softmax_cross_entropy
from synjax.models.unet3d import UNet3D, UNet3DSettings

__all__ = [
    "PReLU",
    "UNet3D",
    "UNet3DSettings",
    "weighted_mse",
    "weighted_softmax_cross_entropy",
]
