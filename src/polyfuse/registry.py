"""One tiny registry class, used for every family of pluggable things.

Objectives, scorers, sampling backends, merge methods and recipe stages each own one `Registry`, filled
the same way: the registry names the package its members live in, and on the first lookup it imports
every module of that package, each of which decorates its class with `@REGISTRY.register("name")`. So
adding a method is writing one file in that package, and nothing has to list it anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from polyfuse.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str, package: str | None = None):
        self.family = family
        self.package = package
        self._items: dict[str, T] = {}
        self._filled = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._items[name] = item
            return item

        return decorator

    def fill(self) -> None:
        """Import every module of the registry's package (each registers its members), once."""
        if self._filled:
            return
        self._filled = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")

    def get(self, name: str) -> T:
        self.fill()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise ConfigError(f"unknown {self.family} {name!r}; expected one of: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        self.fill()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self.fill()
        return name in self._items

    def config_validator(self, base: type, by_name: bool = False) -> Callable[[Any, Any], Any]:
        """A pydantic wrap validator for a field holding a member's options: a mapping with `type` is validated
        by the `Config` class of the member registered under that name (an open union: members registered by
        any module validate like built-in ones); an instance of `base` is kept. `by_name`: a bare name stands
        for `{type: name}`. Use: `Annotated[SerializeAsAny[Base], WrapValidator(REGISTRY.config_validator(Base))]`."""

        def pick(value: Any, handler: Any) -> Any:
            if isinstance(value, base):
                return value
            if by_name and isinstance(value, str):
                value = {"type": value}
            if not isinstance(value, dict) or "type" not in value:
                name = f"a {self.family} name or " if by_name else ""
                raise ValueError(f"expected {name}a mapping with a 'type' key (one of: {', '.join(self.names())})")
            try:
                member = self.get(value["type"])
            except ConfigError as err:
                raise ValueError(str(err)) from None
            return member.Config.model_validate(value)

        pick.registry = self  # type: ignore[attr-defined]  # how config errors find the keys a member allows
        return pick
