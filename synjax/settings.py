"""Typed settings from config blocks: one `from_config` for every settings dataclass.

A settings class is a frozen dataclass whose fields are the keys of one
config block (`config.unet`, `config.pruner`, each `config.models` entry, ...).
`from_config(cls, block, where)` builds it and refuses a key that is not one
of its fields, naming it in full (`config.pruner: unknown key 'stpes'`), so a
misspelt key is never silently ignored. The same classes tell the config
checks (`synjax.pipelines.config_checks`) which keys each block has: the
fields are written once, here and in the classes.

Two kinds of field are special:

- fields named in the class's `GIVEN` come from elsewhere (a seed from
  `config.seed`, a step count from a model entry): the caller passes them,
  and a block may not hold them;
- a field declared with `nested(SubSettings)` is a block of its own inside
  the block (`config.pruner.train`), built the same way; the given fields of
  nested classes are passed with the outer ones.

This module imports nothing but the standard library and `synjax.errors`, so
that checking a config never waits for JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from synjax.errors import ConfigError

T = TypeVar("T")

# Field metadata key: the settings class of a nested block.
_NESTED = "synjax.settings.nested"


def nested(settings_class: type, **field_kwargs) -> Any:
    """A dataclass field holding the settings of a nested block (`config.pruner.train`)."""
    return dataclasses.field(metadata={_NESTED: settings_class}, **field_kwargs)


def nested_class(field: dataclasses.Field) -> type | None:
    """The settings class of a `nested` field, or None for a plain one."""
    return field.metadata.get(_NESTED)


def given_fields(cls: type) -> tuple[str, ...]:
    """Fields of `cls` that its caller supplies (`cls.GIVEN`), never a config block."""
    return tuple(getattr(cls, "GIVEN", ()))


def all_given_fields(cls: type) -> set[str]:
    """The given fields of `cls` and of the classes of its nested blocks."""
    names = set(given_fields(cls))
    for field in dataclasses.fields(cls):
        if nested_class(field) is not None:
            names |= all_given_fields(nested_class(field))
    return names


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of settings class `cls` that a config block may hold, by name."""
    given = given_fields(cls)
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in given}


def is_required(field: dataclasses.Field) -> bool:
    """Whether a block must hold `field` (it has no default)."""
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _is_mapping(value: Any) -> bool:
    # ConfigDicts are not `Mapping`s, but have keys() and item access.
    return isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "__getitem__"))


def _frozen(value: Any) -> Any:
    """Lists and tuples (nested too) as tuples, so that settings stay hashable."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def from_config(cls: type[T], block: Any, where: str, **given: Any) -> T:
    """Settings `cls` from a config block.

    Args:
      cls: a settings dataclass.
      block: ConfigDict or mapping whose keys are fields of `cls`; absent
        fields keep their defaults.
      where: the block's full name for errors, e.g. "config.pruner".
      **given: the fields named in `cls.GIVEN` and in the `GIVEN` of its
        nested blocks' classes (all of them).

    Returns:
      The settings, sequences as tuples.

    Raises:
      ConfigError: the block is not a block, holds a key that is not a field
        (or one that is given elsewhere), or lacks a field without a default.
    """
    if not _is_mapping(block):
        raise ConfigError(f"{where}={block!r}: expected a block of settings")
    fields = config_fields(cls)
    if set(given) != all_given_fields(cls):
        raise TypeError(
            f"from_config({cls.__name__}): given {sorted(given)}, "
            f"expected {sorted(all_given_fields(cls))}"
        )
    keys = list(block.keys())
    for key in keys:
        if key not in fields:
            elsewhere = " (it is set elsewhere)" if key in given_fields(cls) else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}{elsewhere} (known: {', '.join(sorted(fields))})"
            )
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in keys:
            if is_required(field):
                raise ConfigError(f"{where}: missing key {name!r}")
            continue
        sub = nested_class(field)
        if sub is None:
            values[name] = _frozen(block[name])
        else:
            passed = {key: given[key] for key in all_given_fields(sub)}
            values[name] = from_config(sub, block[name], f"{where}.{name}", **passed)
    return cls(**values, **{key: given[key] for key in given_fields(cls)})
