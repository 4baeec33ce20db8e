"""Typed settings from config blocks (`synjax.settings.from_config`) and the stages' classes."""

import dataclasses
from typing import ClassVar

import ml_collections
import pytest

from synjax.errors import ConfigError
from synjax.settings import config_fields, from_config, nested
from synjax.stages.settings import BoundaryTrainSettings, PrunerSettings, PrunerTrainSettings


@dataclasses.dataclass(frozen=True)
class _Inner:
    GIVEN: ClassVar[tuple[str, ...]] = ("seed",)

    rate: float
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class _Outer:
    size: tuple[int, int, int]
    inner: _Inner = nested(_Inner)
    name: str = "x"


def test_builds_nested_blocks_and_freezes_sequences():
    block = ml_collections.ConfigDict({"size": [1, 2, 3], "inner": {"rate": 0.5}})
    got = from_config(_Outer, block, "config.outer", seed=7)
    assert got == _Outer(size=(1, 2, 3), inner=_Inner(rate=0.5, seed=7), name="x")
    assert isinstance(got.size, tuple)
    assert set(config_fields(_Inner)) == {"rate"}


@pytest.mark.parametrize(
    "block, message",
    [
        (
            {"size": (1, 1, 1), "inner": {"rate": 1.0}, "nmae": "y"},
            "config.outer: unknown key 'nmae'",
        ),
        ({"inner": {"rate": 1.0}}, "config.outer: missing key 'size'"),
        ({"size": (1, 1, 1), "inner": {}}, "config.outer.inner: missing key 'rate'"),
        (
            {"size": (1, 1, 1), "inner": {"rate": 1.0, "seed": 3}},
            "config.outer.inner: unknown key 'seed' (it is set elsewhere)",
        ),
        ({"size": (1, 1, 1), "inner": 5}, "config.outer.inner=5: expected a block"),
    ],
)
def test_refuses_unknown_missing_and_given_keys(block, message):
    with pytest.raises(ConfigError) as error:
        from_config(_Outer, block, "config.outer", seed=0)
    assert str(error.value).startswith(message)


def test_the_caller_passes_exactly_the_given_fields():
    with pytest.raises(TypeError, match="expected \\['seed'\\]"):
        from_config(_Outer, {"size": (1, 1, 1), "inner": {"rate": 1.0}}, "config.outer")


def test_stage_training_blocks_are_train_settings():
    """One training block is one class: TrainSettings' fields plus the stage's own."""
    pruner = from_config(
        PrunerSettings,
        {
            "window": (8, 32, 32),
            "features": (4, 4, 8, 8, 8),
            "pools": ((1, 2, 2),) * 4,
            "dense_features": 16,
            "train": {
                "steps": 6,
                "batch_size": 4,
                "learning_rate": 1e-3,
                "label_distance_nm": 400.0,
            },
        },
        "config.pruner",
        seed=3,
    )
    assert isinstance(pruner.train, PrunerTrainSettings)
    assert (pruner.train.steps, pruner.train.seed, pruner.train.optimizer) == (6, 3, "adam")
    # A DeepEM3D model's steps and seed come from its own entry, never the block.
    assert "steps" not in config_fields(BoundaryTrainSettings)
    with pytest.raises(ConfigError, match="unknown key 'steps' \\(it is set elsewhere\\)"):
        from_config(
            BoundaryTrainSettings,
            {"steps": 4, "batch_size": 1, "learning_rate": 1.0, "patch_yx": 16, "augment": False},
            "config.train",
            seed=0,
            steps=2,
        )
