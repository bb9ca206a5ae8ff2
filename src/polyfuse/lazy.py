"""`lazy_import`: a module that is imported the first time one of its names is read.

`polyfuse --help` builds its commands from the registered stages and objectives, so it imports their modules
and config classes; they use torch (and numpy) only inside their functions. Bound through `lazy_import`, those
libraries are imported when a loss or a merge first runs, not when a command is listed (torch alone takes
seconds to import). Unlike `importlib.util.LazyLoader` it leaves `sys.modules` alone: code that imports torch
itself gets the real module, and nothing changes for it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module `name`: reading an attribute imports the module (once) and reads it there."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:  # only called for names the proxy itself does not have
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazily imported module {self._name!r}>"


def lazy_import(name: str) -> Any:
    """`torch = lazy_import("torch")`: use as the module itself (`torch.zeros`, `isinstance(x, torch.Tensor)`)."""
    return LazyModule(name)


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> Any:
    """A package's module `__getattr__` (PEP 562) that imports a name from its module (`exports`: module of
    `package` -> the names it gives the package) when it is first asked for: `from package import name` works
    as with an eager import, but importing the package, or one light module of it (its config), does not
    import the heavy ones."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home[name]}"), name)

    return __getattr__


def inference_mode(function: Callable[..., Any]) -> Callable[..., Any]:
    """`@torch.inference_mode()` for a method of a module that must import without torch: the decorator is
    built when the function runs, not when the module is imported."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return function(*args, **kwargs)

    return run
