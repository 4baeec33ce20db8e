"""Stages: one per trained model (build from typed settings, train, load, predict).

`ProximityStage` (the signed-proximity U-Net), `PrunerStage` (the candidate
pruning CNN) and `BoundaryEnsembleStage` (DeepEM3D's boundary nets), each
built by `from_config(config)` from the settings in `stages/settings.py`.
May import every package up to evaluation; the pipelines use the stages.
Names are re-exported lazily, so that reading the settings needs no JAX.
"""

import importlib

_EXPORTS = {
    "BoundaryEnsembleStage": "boundary_models",
    "ProximityStage": "proximity",
    "PrunerStage": "pruner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
