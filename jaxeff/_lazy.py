"""Lazy package fronts (PEP 562): a package lists its submodules and re-exported names, and
nothing is imported until an attribute is first read.

    __getattr__, __dir__, __all__ = attach(
        __name__, submodules=("loop",), attrs={"make_train_step": "loop"}
    )

``attrs`` maps each exported name to the submodule (relative to the package) that defines it.
Reading ``package.name`` imports that submodule, caches the value in the package's namespace
and returns it, so ``import jaxeff.nn`` stays free of jax until a name that needs it is used.
This module imports only the standard library.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def attach(
    package: str,
    *,
    submodules: Iterable[str] = (),
    attrs: Mapping[str, str] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for the package named ``package``.

    Args:
      package: the package's ``__name__``.
      submodules: submodules (or subpackages) reachable as attributes, e.g. ``jaxeff.nn``.
      attrs: ``{name: submodule}``: names re-exported from those submodules.
    """
    submodules = frozenset(submodules)
    attrs = dict(attrs or {})
    clash = submodules & attrs.keys()
    if clash:
        raise ValueError(f"{package}: {sorted(clash)} are both submodules and attributes")
    exported = sorted(submodules | attrs.keys())

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name in attrs:
            value = getattr(importlib.import_module(f"{package}.{attrs[name]}"), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exported))

    return __getattr__, __dir__, list(exported)
