"""Data: synthetic EM and fluorescence volumes, patch sampling and augmentation,
the one intensity normalisation, voxel features of the classical baseline.

May import io (and `errors`, `geometry`, `report`).
"""

from synjax.data.augment import AugmentSettings
from synjax.data.intensity import (
    DTYPE_RANGE,
    IntensityNormalization,
    NormalizedVolume,
    TrainedParams,
    load_normalization,
    normalize_intensity,
    save_normalization,
)
from synjax.data.sampling import PatchSampler, center_crop
from synjax.data.synthetic import make_em_volume, save_em_volume
from synjax.data.synthetic_em import EMSyntheticSettings
from synjax.data.synthetic_fluorescence import (
    FluorescenceSyntheticSettings,
    make_fluorescence_volume,
)

__all__ = [
    "DTYPE_RANGE",
    "AugmentSettings",
    "EMSyntheticSettings",
    "FluorescenceSyntheticSettings",
    "IntensityNormalization",
    "NormalizedVolume",
    "PatchSampler",
    "TrainedParams",
    "center_crop",
    "load_normalization",
    "make_em_volume",
    "make_fluorescence_volume",
    "normalize_intensity",
    "save_em_volume",
    "save_normalization",
]
