"""dpcam's import graph (dpcam.codegraph): what each stage runs, and the layers it keeps."""

from dpcam import codegraph


def test_the_import_graph_has_no_cycle():
    assert codegraph.cycles(codegraph.graph()) == []


def test_cycles_are_found():
    g = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset()}
    assert codegraph.cycles(g) == [["a", "b", "c", "a"]]


def test_import_closure_follows_from_imports_of_modules():
    closure = codegraph.import_closure("dpcam.train.family")
    # lazy imports count
    assert "src/dpcam/privacy/engine.py" in closure and "src/dpcam/tracking/__init__.py" in closure
    assert "src/dpcam/privacy/__init__.py" in closure  # a package's __init__ runs on import


LAYERS = [
    "dpcam",
    "dpcam.errors",
    "dpcam.registry",
    "dpcam.codegraph",
    "dpcam.names",
    "dpcam.guard",
    "dpcam.layout",
    "dpcam.config",
    "dpcam.families",
    "dpcam.records",
    "dpcam.tracking",
    "dpcam.executor",
    "dpcam.data",
    "dpcam.layers",
    "dpcam.tvmodels",
    "dpcam.weights",
    "dpcam.models",
    "dpcam.saved",
    "dpcam.privacy",
    "dpcam.train",
    "dpcam.explain",
    "dpcam.audit",
    "dpcam.search",
    "dpcam.report",
    "dpcam.profiles",
    "dpcam.pipeline",
    "dpcam.cli",
    "dpcam.__main__",
]


def _layer(module: str) -> int:
    return max(i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + "."))


def test_modules_import_only_the_layers_below_them():
    """The README's reading order: config is the ground floor, stages sit on it, the CLI on top."""
    upward = [
        (m, d)
        for m, deps in codegraph.graph().items()
        for d in deps
        if not m.startswith(d + ".") and _layer(d) > _layer(m)
    ]
    assert upward == []
