"""``tools/structure.py``: which module an import names, import circles, modules over the limit."""

import ast
import importlib.util
import pathlib

import pytest

PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "structure.py"


@pytest.fixture(scope="module")
def structure():
    spec = importlib.util.spec_from_file_location("structure", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODULES = {"__init__", "io", "pca", "ranks", "ranks.frontier", "ranks.options", "layers"}


@pytest.mark.parametrize("source, expected", [
    ("from rankwise.ranks.frontier import measured_options", {"ranks.frontier"}),
    ("from rankwise.ranks import frontier, LOSSLESS", {"ranks.frontier", "ranks"}),
    ("from rankwise import io, __version__", {"io", "__init__"}),
    ("import rankwise.ranks.options", {"ranks.options"}),
    ("def f():\n    from rankwise.pca import NeuronPCA", {"pca"}),  # an import inside a function counts
    ("from . import x\nimport torch", set()),
])
def test_an_import_names_the_module_it_reads(structure, source, expected):
    assert structure.rankwise_imports(ast.parse(source), MODULES) == expected


def rows(graph, lines=None):
    return [(name, (lines or {}).get(name, 10), sorted(imports), 0) for name, imports in graph.items()]


def test_a_circle_is_reported_with_its_modules_and_the_shortest_way_round(structure):
    graph = {"__init__": ["io", "pca"], "io": ["__init__"], "pca": ["ranks"], "ranks": ["ranks.frontier"],
             "ranks.frontier": ["pca", "ranks.options"], "ranks.options": []}
    assert structure.circles(rows(graph)) == [
        "__init__, io (__init__ -> io -> __init__)",
        "pca, ranks, ranks.frontier (pca -> ranks -> ranks.frontier -> pca)"]


def test_imports_one_way_make_no_circle(structure):
    graph = {"__init__": ["io", "pca"], "io": ["pca"], "pca": ["ranks.options"], "ranks.options": []}
    assert structure.circles(rows(graph)) == []


def test_an_accepted_import_is_left_out_of_circles(structure):
    graph = {"layers": ["layers.recurrent"], "layers.recurrent": ["layers"]}
    assert ("layers.recurrent", "layers") in structure.ALLOWED_IN_CIRCLES
    assert structure.circles(rows(graph)) == []


def test_modules_over_the_limit_are_named_with_their_length(structure):
    graph = {"pca": [], "io": [], "cli": []}
    lengths = {"pca": structure.MAX_LINES, "cli": structure.MAX_LINES + 1}
    assert structure.long_modules(rows(graph, lengths)) == [f"cli ({structure.MAX_LINES + 1} lines)"]


def test_rankwise_has_no_import_circle(structure):
    assert structure.circles(structure.survey()) == []
