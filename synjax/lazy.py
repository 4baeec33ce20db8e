"""Lazy re-exports for the packages whose modules import JAX (or scikit-learn).

A package's `__init__.py` names its public API once:

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"train": "loop", ...})

`from synjax.train import train` then imports `synjax.train.loop` on first
use, so that importing a JAX-free module of the package (e.g.
`synjax.train.settings`, which the config checks read) does not import JAX.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """The `__getattr__`, `__dir__` and `__all__` of a package that re-exports lazily.

    Args:
      package: the package's `__name__`.
      exports: public name -> the package's module that defines it.
    """
    names = sorted(exports)

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__, names
