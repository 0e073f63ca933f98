"""A name → object registry: one place maps each estimator name to its function."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; rejects duplicates and lists the valid names on a bad lookup.

    >>> KL = Registry("KL estimator")
    >>> @KL.register("k1")
    ... def k1(x): return x
    >>> KL["k1"] is k1
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._items))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def check(self, name: str, field: str) -> None:
        """Raise a ValueError naming `field` when `name` is not registered."""
        if name not in self._items:
            raise ValueError(
                f"{field}: unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}"
            )
