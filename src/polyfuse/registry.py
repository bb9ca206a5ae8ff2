"""One tiny registry class, used for every family of pluggable things.

Objectives, scorers, sampling backends and (later) merge methods each own one `Registry`; adding a
method is writing one file that decorates its class or function with `@REGISTRY.register("name")`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from polyfuse.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise ConfigError(f"unknown {self.family} {name!r}; expected one of: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
