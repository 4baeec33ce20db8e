"""Models: the Flax networks (U-Net, DeepEM3D-Net, pruning CNN, ResNet3D, the EM
instance network and its baseline cleft segmenter), their layers and losses, and
the classical baseline's pixel forest.

May import io, data and targets. Names are re-exported lazily (JAX, scikit-learn).
"""

from synjax.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "CleftSegmenter": "cleft_segmenter",
        "Conv3D": "conv",
        "ConvTranspose3D": "conv",
        "DeepEM3DNet": "deepem3d",
        "DeepEM3DSettings": "deepem3d",
        "TOTAL_STRIDE": "deepem3d",
        "make_apply_fn": "deepem3d",
        "InstanceUNet": "instance_unet",
        "InstanceUNetSettings": "instance_unet",
        "UNetBackbone": "instance_unet",
        "UNetBackboneSettings": "instance_unet",
        "build_instance_unet": "instance_unet",
        "PReLU": "layers",
        "class_weighted_softmax_cross_entropy": "losses",
        "weighted_mse": "losses",
        "weighted_softmax_cross_entropy": "losses",
        "PixelForest": "pixel_forest",
        "PixelForestSettings": "pixel_forest",
        "train_or_load_pixel_forest": "pixel_forest",
        "PruningCNN": "pruning",
        "sigmoid_bce": "pruning",
        "ResNet3D": "resnet3d",
        "ResNet3DSettings": "resnet3d",
        "UNet3D": "unet3d",
        "UNet3DSettings": "unet3d",
    },
)
