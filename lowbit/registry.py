"""A tiny typed registry: one mapping from a key to a registered object.

Used for configs (``quant_method`` -> config class), quantizers (``quant_method`` ->
quantizer class), checkpoint layouts and kernels. Lookups of unknown keys raise
``ValueError`` naming the key and the known ones, so a user typo reads as a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps string keys to objects of one kind (``what`` names that kind in errors)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, key: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("gptq")`` stores the decorated object under ``key``."""

        def deco(obj: T) -> T:
            self.add(key, obj)
            return obj

        return deco

    def add(self, key: str, obj: T) -> None:
        if key in self._items:
            raise ValueError(f"{self.what} {key!r} is already registered")
        self._items[key] = obj

    def get(self, key: str) -> T:
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise ValueError(f"unknown {self.what} {key!r}; known: {known}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())
