"""Helpers that config files import.

Config files are loaded by path (`--config=configs/demo.py:smoke`), so they
cannot import each other; what they share lives here.
"""

from __future__ import annotations

from collections.abc import Iterable

import ml_collections

from synjax.errors import ConfigError


def variant(arg: str | None, known: Iterable[str], config_name: str) -> str:
    """Returns the variant named after the colon in `--config=file.py:variant`.

    Args:
      arg: the text after the colon, or None for the default variant.
      known: variant names the config file defines ("default" among them).
      config_name: the config file's name, for the error message.

    Raises:
      ConfigError: the variant is not one of `known`.
    """
    name = arg or "default"
    known = tuple(known)
    if name not in known:
        raise ConfigError(f"{config_name}: unknown variant {name!r}; expected one of {list(known)}")
    return name


def config_dict(fields: dict) -> ml_collections.ConfigDict:
    """A ConfigDict whose nested dicts become ConfigDicts too."""
    return ml_collections.ConfigDict(fields)
