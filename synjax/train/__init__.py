"""Training: device mesh, train state, checkpoints and the training loop."""

from synjax.train.checkpoint import Checkpointer, latest_step, restore_params, restore_variables
from synjax.train.loop import make_train_step, train
from synjax.train.parallel import batch_sharding, make_mesh, replicated_sharding
from synjax.train.settings import TrainSettings
from synjax.train.state import TrainState, create_train_state, make_optimizer

__all__ = [
    "Checkpointer",
    "TrainSettings",
    "TrainState",
    "batch_sharding",
    "create_train_state",
    "latest_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "replicated_sharding",
    "restore_params",
    "restore_variables",
    "train",
]
