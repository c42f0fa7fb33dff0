"""The structure of the rankwise package: modules, lines, imports, and the one-way flow.

Usage (from the repository root; plain Python, nothing imported from rankwise)::

    python tools/structure.py            # table of modules, lines and rankwise imports, then the problems
    python tools/structure.py --check    # the problems only; exit 1 when there is one

The problems: a module that imports one later in the flow, an import circle, a module over
:data:`MAX_LINES` lines.

The flow is model + data -> statistics -> decisions -> new layers -> report, save, export.
:data:`STAGES` orders the modules (a module's stage is that of its first name); a module may
import only from its own stage or earlier ones. An import inside a function counts too: it is
still a dependency. :data:`ALLOWED` lists the accepted exceptions, each with its reason.

An import names a module: ``from rankwise.ranks.frontier import x`` the module
``ranks.frontier``, ``from rankwise.ranks import frontier`` too, ``from rankwise.ranks import x``
the package ``ranks`` (its ``__init__``), ``from rankwise import x`` the package root
``__init__`` unless ``x`` is a module. A *circle* is a set of modules that reach each other
through such imports; the packages a module sits in, which Python imports before it, are not
counted as its imports.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "rankwise"

MAX_LINES = 400
"""The most lines a module may have (one concept per module)."""

STAGES = (  # earliest first
    ("foundations", ("_version", "progress", "checks", "goals", "masks", "batches", "threads", "solvers", "moments", "rnn", "learnables",
                     "tables", "kinds", "ties", "distributed", "metric", "batchnorm_modes")),
    ("layers", ("forms", "layers")),
    ("statistics", ("statistics", "recurrent_statistics", "targets", "holdout", "blockwise", "pca", "divergence",
                    "estimate")),
    ("decisions", ("ranks",)),
    ("construction", ("selection", "info", "projection", "flops", "latency", "throughput", "latency_aware", "latency_budget", "batchnorm",
                      "correction")),
    ("methods", ("decompose", "evolve", "train", "recovery", "sensitivity", "incremental")),
    ("outputs", ("report", "io", "export", "hf", "cli", "datasets", "examples", "demo", "__init__")),
)


ALLOWED = {  # (module, import): why this one import against the flow is accepted
    ("pca", "ranks"): "npca.learnables_reduction_range (public API) asks the decisions for the range, "
                      "lazily, inside the property: statistics never import decisions at load time",
}

ALLOWED_IN_CIRCLES = {  # (module, import): why this import is left out when looking for circles
    ("layers.recurrent", "layers"): "ProjectedLSTM / ProjectedGRU under their former home, for structures "
                                    "pickled by older versions: read from the package on attribute access "
                                    "(module __getattr__), after the package has imported this module",
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def stage_of(module: str) -> int:
    head = module.split(".")[0]
    for index, (_, prefixes) in enumerate(STAGES):
        if head in prefixes:
            return index
    raise KeyError(f"module {module!r} has no stage in tools/structure.py STAGES; add it")


def rankwise_imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``tree`` imports (see the module docstring)."""
    def module(parent: str, name: str) -> str:
        inner = f"{parent}.{name}" if parent else name
        return inner if inner in modules else parent or "__init__"

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "rankwise" or node.module.startswith("rankwise."):
                parent = node.module.removeprefix("rankwise").removeprefix(".")
                found.update(module(parent, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("rankwise.") for a in node.names if a.name.startswith("rankwise."))
    return found


KIND_TYPES = {"Linear", "Conv1d", "Conv2d", "Conv3d", "LSTM", "GRU", "RecurrentStatistics",
              "RecurrentOptions", "LayerStatistics"}


def kind_switches(tree: ast.AST) -> int:
    """``isinstance`` calls that ask which layer kind something is (outside the kinds table)."""
    def names(node):
        if isinstance(node, ast.Attribute):
            return {node.attr}
        if isinstance(node, ast.Name):
            return {node.id}
        if isinstance(node, ast.Tuple):
            return set().union(*map(names, node.elts))
        if isinstance(node, ast.BinOp):
            return names(node.left) | names(node.right)
        return set()
    return sum(1 for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
               and len(node.args) == 2 and names(node.args[1]) & KIND_TYPES)


def survey():
    """``(module, lines, rankwise imports, kind switches)`` of every module, by name."""
    paths = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}
    rows = []
    for name, path in paths.items():
        text = path.read_text()
        tree = ast.parse(text)
        imports = rankwise_imports(tree, set(paths)) - {name}
        rows.append((name, len(text.splitlines()), sorted(imports), kind_switches(tree)))
    return rows


def backward_imports(rows) -> list[str]:
    problems = []
    for name, _, imports, _ in rows:
        if name == "__init__":
            continue
        for target in imports:
            if target.split(".")[0] == name.split(".")[0]:
                continue  # imports within one package
            if stage_of(target) > stage_of(name) and (name, target) not in ALLOWED:
                problems.append(f"{name} ({STAGES[stage_of(name)][0]}) imports {target} "
                                f"({STAGES[stage_of(target)][0]})")
    return problems


def circles(rows) -> list[str]:
    """Each set of modules that import each other (a strongly connected component of the import
    graph, :data:`ALLOWED_IN_CIRCLES` left out): its modules, and the shortest circle through the
    first of them."""
    graph = {name: [t for t in imports if (name, t) not in ALLOWED_IN_CIRCLES] for name, _, imports, _ in rows}
    index, low, stack, found = {}, {}, [], []

    def visit(node):  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return sorted(f"{', '.join(c)} ({' -> '.join(_shortest_circle(graph, c[0]))})" for c in found)


def _shortest_circle(graph, start: str) -> list[str]:
    """The shortest chain of imports from ``start`` back to it (breadth first)."""
    paths, layer = {start: [start]}, [start]
    while layer:
        following = []
        for node in layer:
            for target in sorted(graph[node]):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        layer = following
    raise ValueError(f"{start} is in no circle")


def long_modules(rows) -> list[str]:
    """The modules over :data:`MAX_LINES` lines, with their lengths."""
    return [f"{name} ({lines} lines)" for name, lines, _, _ in rows if lines > MAX_LINES]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 on a backward import, an import circle or a module over {MAX_LINES} lines")
    args = parser.parse_args()
    rows = survey()
    if not args.check:
        print(f"{'module':32s} {'lines':>5s} {'kind switches':>13s}  rankwise imports")
        for name, lines, imports, switches in rows:
            print(f"{name:32s} {lines:5d} {switches:13d}  {', '.join(imports)}")
        centre = [r for r in rows if r[0].split(".")[0] not in ("decompose", "evolve", "examples", "cli")]
        print(f"{len(rows)} modules, {sum(r[1] for r in rows)} lines, "
              f"largest {max(rows, key=lambda r: r[1])[0]} ({max(r[1] for r in rows)} lines), "
              f"{len(long_modules(rows))} over {MAX_LINES} lines, "
              f"{sum(r[3] for r in centre)} kind switches in the centre (outside decompose/, evolve/)")
    problems = [*(f"backward import: {problem}" for problem in backward_imports(rows)),
                *(f"import circle: {circle}" for circle in circles(rows)),
                *(f"over {MAX_LINES} lines: {module}" for module in long_modules(rows))]
    for problem in problems:
        print(problem)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
