"""dpcam.registry: the one registration style of every extension point."""

from dataclasses import dataclass

import pytest

from dpcam.errors import UserError
from dpcam.registry import Registry


@dataclass(frozen=True)
class _Record:
    name: str


def test_decorator_and_record_register_in_order_once():
    reg: Registry = Registry("widget", [_Record("b")])

    @reg.register("a")
    def build():
        return 1

    assert list(reg) == ["b", "a"] and reg["a"] is build and reg.lookup("b") == _Record("b")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(build)
    with pytest.raises(ValueError, match="widget 'b' is already registered"):
        reg.add(_Record("b"))


def test_unknown_name_is_one_line_naming_the_known_ones():
    reg = Registry("widget", [_Record("b"), _Record("a")])
    with pytest.raises(UserError, match=r"^unknown widget 'c'; known: b, a$"):
        reg.lookup("c")


def test_every_registry_of_the_package_is_a_registry():
    from dpcam.audit.signals import ATTACKS
    from dpcam.data.mechanisms import MECHANISMS
    from dpcam.data.readers import FORMATS_READERS
    from dpcam.explain.methods import METHODS
    from dpcam.explain.metrics import METRICS
    from dpcam.families import FAMILIES
    from dpcam.models import MODELS
    from dpcam.search.objectives import OBJECTIVES

    registries = (ATTACKS, MECHANISMS, FORMATS_READERS, METHODS, METRICS, FAMILIES, MODELS, OBJECTIVES)
    assert all(isinstance(r, Registry) and len(r) >= 2 for r in registries)
