"""Rules: what one config key may hold, and the walk that checks a block.

A schema maps each key of a block to a rule: a `Value` (a leaf with a test),
a `Block` (a nested block with its own schema) or `Entries` (a sequence of
blocks). `settings_block` derives a block's schema from the settings class
that reads it, so a key is declared once, in its settings class.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from synjax.errors import ConfigError
from synjax.settings import config_fields, is_required, nested_class


@dataclasses.dataclass(frozen=True)
class Value:
    """A leaf: `test(value)` must hold; `expected` says what it wants."""

    test: Callable[[Any], bool]
    expected: str
    required: bool = True

    def check(self, value: Any, key: str) -> None:
        if not self.test(value):
            raise ConfigError(f"{key}={value!r}: expected {self.expected}")


@dataclasses.dataclass(frozen=True)
class Block:
    """A nested block (ConfigDict or dict) with its own schema."""

    schema: Mapping[str, Any]
    required: bool = True

    @property
    def expected(self) -> str:
        return f"a block with keys {', '.join(sorted(self.schema))}"

    def check(self, value: Any, key: str) -> None:
        check_block(value, self.schema, key)


@dataclasses.dataclass(frozen=True)
class Entries:
    """A non-empty sequence of blocks of one schema (e.g. `config.models`)."""

    schema: Mapping[str, Any]
    required: bool = True

    @property
    def expected(self) -> str:
        return f"a non-empty sequence of blocks with keys {', '.join(sorted(self.schema))}"

    def check(self, value: Any, key: str) -> None:
        if not is_sequence(value) or not value:
            raise ConfigError(f"{key}={value!r}: expected {self.expected}")
        for index, entry in enumerate(value):
            check_block(entry, self.schema, f"{key}[{index}]")


def is_mapping(value: Any) -> bool:
    # ConfigDicts are not `Mapping`s, but have keys() and item access.
    return isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "__getitem__"))


def check_block(block: Any, schema: Mapping[str, Any], where: str) -> None:
    """Every key of `block` is in `schema`, every required one is there, each value fits."""
    if not is_mapping(block):
        raise ConfigError(f"{where}={block!r}: expected a block with keys {', '.join(schema)}")
    keys = list(block.keys())
    unknown = [key for key in keys if key not in schema]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(schema))})"
        )
    for key, rule in schema.items():
        if key in keys:
            rule.check(block[key], f"{where}.{key}")
        elif rule.required:
            raise ConfigError(f"{where}: missing key {key!r} (expected {rule.expected})")


def is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(minimum: int | None = None, required: bool = True) -> Value:
    """An integer, at least `minimum` when given."""
    return Value(
        lambda v: is_int(v) and (minimum is None or v >= minimum),
        "an integer" if minimum is None else f"an integer >= {minimum}",
        required,
    )


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    required: bool = True,
) -> Value:
    """A real number within [low, high] (ends open where asked; None: unbounded)."""

    def test(v: Any) -> bool:
        if not is_number(v) or v != v:  # v != v: NaN
            return False
        above = low is None or (v > low if open_low else v >= low)
        below = high is None or (v < high if open_high else v <= high)
        return above and below

    if low is not None and high is not None:
        expected = f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        expected = f"a number {'>' if open_low else '>='} {low}"
    else:
        expected = "a number"
    return Value(test, expected, required)


def positive(required: bool = True) -> Value:
    return number(0, open_low=True, required=required)


def non_negative(required: bool = True) -> Value:
    return number(0, required=required)


def fraction(required: bool = True) -> Value:
    return number(0, 1, required=required)


def choice(options: Sequence[Any], required: bool = True) -> Value:
    return Value(lambda v: v in options, f"one of {list(options)}", required)


def boolean(required: bool = True) -> Value:
    return Value(lambda v: isinstance(v, bool), "True or False", required)


def text(required: bool = True, non_empty: bool = False) -> Value:
    return Value(
        lambda v: isinstance(v, str) and (bool(v) or not non_empty),
        "a non-empty string" if non_empty else "a string",
        required,
    )


def optional(rule: Value) -> Value:
    """None or what `rule` accepts; the key itself may be absent."""
    return Value(lambda v: v is None or rule.test(v), f"None or {rule.expected}", required=False)


def integers(
    count: int | None = None, minimum: int = 1, odd: bool = False, required: bool = True
) -> Value:
    """A sequence of `count` (any number, but at least one, if None) integers >= minimum."""

    def test(v: Any) -> bool:
        return (
            is_sequence(v)
            and (len(v) == count if count is not None else len(v) >= 1)
            and all(is_int(x) and x >= minimum and (x % 2 == 1 or not odd) for x in v)
        )

    size = f"{count}" if count is not None else "one or more"
    kind = "odd integers" if odd else "integers"
    return Value(test, f"{size} {kind} >= {minimum}", required)


def sequence(element: Value, min_len: int = 1, required: bool = True) -> Value:
    """A sequence of at least `min_len` elements, each accepted by `element`."""
    size = "a non-empty sequence" if min_len == 1 else f"a sequence of >= {min_len} items"
    return Value(
        lambda v: is_sequence(v) and len(v) >= min_len and all(element.test(x) for x in v),
        f"{size}, each {element.expected}",
        required,
    )


def triples(minimum: int = 1, odd: bool = False) -> Value:
    """A non-empty sequence of (z, y, x) integer triples (pooling windows, kernels)."""
    triple = integers(3, minimum, odd)
    return Value(
        lambda v: is_sequence(v) and len(v) >= 1 and all(triple.test(x) for x in v),
        f"a sequence of (z, y, x) triples of {triple.expected.split(' ', 1)[1]}",
    )


def z_range() -> Value:
    """None or (start, stop) with 0 <= start < stop."""
    return optional(
        Value(
            lambda v: integers(2, 0).test(v) and v[0] < v[1],
            "(start, stop) with 0 <= start < stop",
        )
    )


def yx_crop() -> Value:
    """None or (y0, y1, x0, x1) with y0 < y1 and x0 < x1."""
    return optional(
        Value(
            lambda v: integers(4, 0).test(v) and v[0] < v[1] and v[2] < v[3],
            "(y0, y1, x0, x1) with 0 <= y0 < y1 and 0 <= x0 < x1",
        )
    )


ANY = Value(lambda v: True, "any value")


def settings_block(cls: type, rules: Mapping[str, Any], required: bool = True) -> Block:
    """The schema of a block that settings class `cls` reads.

    Args:
      cls: a settings dataclass; its config fields are the block's keys, and
        a field without a default is a key the block must hold.
      rules: the range rule (`Value`) of some of those keys; for a nested
        block (`synjax.settings.nested`), a mapping of its own rules. Keys
        without a rule take any value; rules of fields that the class is
        given elsewhere (`GIVEN`, e.g. a model's steps) are not used.
      required: whether the block itself must be present.

    Raises:
      TypeError: a rule names no field of `cls` (a programming error).
    """
    fields = config_fields(cls)
    stray = sorted(set(rules) - {field.name for field in dataclasses.fields(cls)})
    if stray:
        raise TypeError(f"config_checks: rules for {stray}, which are no fields of {cls.__name__}")
    schema: dict[str, Any] = {}
    for name, field in fields.items():
        sub = nested_class(field)
        if sub is not None:
            schema[name] = settings_block(sub, rules.get(name, {}), is_required(field))
        else:
            schema[name] = dataclasses.replace(rules.get(name, ANY), required=is_required(field))
    return Block(schema, required)
