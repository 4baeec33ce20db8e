"""Targets: what the networks learn, from ground truth: signed proximity and its
weights (partners), boundary labels and class weights (DeepEM3D), instance targets.

May import io and data.
"""

from synjax.targets.boundaries import boundary_labels, class_weights
from synjax.targets.instances import (
    InstanceTargets,
    clean_instance_labels,
    instance_masks,
    instance_targets,
)
from synjax.targets.signed_proximity import (
    balanced_weights,
    partner_masks,
    signed_proximity_target,
    three_class_target,
)

__all__ = [
    "InstanceTargets",
    "balanced_weights",
    "boundary_labels",
    "class_weights",
    "clean_instance_labels",
    "instance_masks",
    "instance_targets",
    "partner_masks",
    "signed_proximity_target",
    "three_class_target",
]
