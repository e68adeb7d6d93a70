"""The one registry every extension point of dpcam uses: models, explanation methods and metrics,
local-DP mechanisms, run families, audit attacks, search objectives and source-format readers.

Like Opacus's ``GradSampleModule`` registry, a function or class registers under a name by
decorator (``@MODELS.register("smallcnn")``); a record that carries its own ``name`` field (a
:class:`dpcam.families.Family`, a :class:`dpcam.explain.metrics.Metric`) is added with
``REGISTRY.add(record)``. Either way a name registers once (a second registration is a
programming error, ``ValueError``), and :meth:`Registry.lookup` of an unknown name is the user's
one-line error listing the known names. A registry is a ``dict`` in registration order, so
``name in REGISTRY``, ``REGISTRY[name]`` and iteration read as they always did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from dpcam.errors import UserError

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Named objects of one ``kind`` (a word for messages: "model", "explanation method")."""

    def __init__(self, kind: str, records: Iterable[T] = ()) -> None:
        super().__init__()
        self.kind = kind
        for record in records:
            self.add(record)

    def _put(self, name: str, item: T) -> T:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the function or class below under ``name``."""
        return lambda item: self._put(name, item)

    def add(self, record: T) -> T:
        """Register a record under its own ``name`` field; returns it."""
        return self._put(record.name, record)  # type: ignore[attr-defined]

    def lookup(self, name: str) -> T:
        """The object registered as ``name``; a :class:`UserError` naming the known ones otherwise."""
        if name not in self:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(self)}")
        return self[name]
