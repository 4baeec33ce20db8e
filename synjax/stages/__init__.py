"""Stages: one per trained model (build from typed settings, train, load, predict).

`ProximityStage` (the signed-proximity U-Net), `PrunerStage` (the candidate
pruning CNN) and `BoundaryEnsembleStage` (DeepEM3D's boundary nets), each built
by `from_config(config)` from the settings in `stages/settings.py`. May import
every package up to evaluation; the pipelines use the stages.
"""

from synjax.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "BoundaryEnsembleStage": "boundary_models",
        "BoundaryModelSettings": "settings",
        "BoundaryTrainSettings": "settings",
        "BlockwisePredictSettings": "settings",
        "ProximityNetworkSettings": "settings",
        "ProximityStage": "proximity",
        "ProximityTrainSettings": "settings",
        "PrunerSettings": "settings",
        "PrunerStage": "pruner",
        "PrunerTrainSettings": "settings",
        "SlicePredictSettings": "settings",
    },
)
