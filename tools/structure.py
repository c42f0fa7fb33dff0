"""The structure of the rankwise package: modules, lines, imports, and the one-way flow.

Usage (from the repository root; plain Python, nothing imported from rankwise)::

    python tools/structure.py            # table of modules, lines and rankwise imports
    python tools/structure.py --check    # exit 1 when a module imports one later in the flow

The flow is model + data -> statistics -> decisions -> new layers -> report, save, export.
:data:`STAGES` orders the modules (a module's stage is that of its longest matching prefix); a
module may import only from its own stage or earlier ones. An import inside a function counts
too: it is still a dependency. :data:`ALLOWED` lists the accepted exceptions, each with its reason.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "rankwise"

STAGES = (  # earliest first
    ("foundations", ("checks", "masks", "batches", "moments", "rnn", "learnables", "tables", "kinds", "distributed",
                     "metric")),
    ("layers", ("forms", "layers")),
    ("statistics", ("statistics", "recurrent_statistics", "targets", "selection", "blockwise", "pca")),
    ("decisions", ("ranks",)),
    ("construction", ("info", "projection", "flops", "latency", "latency_aware", "batchnorm",
                      "correction")),
    ("methods", ("decompose", "evolve", "train", "sensitivity", "incremental")),
    ("outputs", ("report", "io", "export", "hf", "cli", "datasets", "examples", "demo", "__init__")),
)


ALLOWED = {  # (module, import): why this one import against the flow is accepted
    ("pca", "ranks"): "npca.learnables_reduction_range (public API) asks the decisions for the range, "
                      "lazily, inside the property: statistics never import decisions at load time",
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


def rankwise_imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "rankwise":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("rankwise."):
                found.add(node.module.removeprefix("rankwise."))
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
    rows = []
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        text = path.read_text()
        tree = ast.parse(text)
        rows.append((name, len(text.splitlines()), sorted(rankwise_imports(tree)), kind_switches(tree)))
    return rows


def backward_imports(rows) -> list[str]:
    problems = []
    for name, _, imports, _ in rows:
        if name == "__init__":
            continue
        for target in imports:
            if target == "__version__" or target.split(".")[0] == name.split(".")[0]:
                continue  # the version string; imports within one package
            if stage_of(target) > stage_of(name) and (name, target) not in ALLOWED:
                problems.append(f"{name} ({STAGES[stage_of(name)][0]}) imports {target} "
                                f"({STAGES[stage_of(target)][0]})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a backward import")
    args = parser.parse_args()
    rows = survey()
    if not args.check:
        print(f"{'module':32s} {'lines':>5s} {'kind switches':>13s}  rankwise imports")
        for name, lines, imports, switches in rows:
            print(f"{name:32s} {lines:5d} {switches:13d}  {', '.join(imports)}")
        centre = [r for r in rows if r[0].split(".")[0] not in ("decompose", "evolve", "examples", "cli")]
        print(f"{len(rows)} modules, {sum(r[1] for r in rows)} lines, "
              f"largest {max(rows, key=lambda r: r[1])[0]} ({max(r[1] for r in rows)} lines), "
              f"{sum(r[1] > 400 for r in rows)} over 400 lines, "
              f"{sum(r[3] for r in centre)} kind switches in the centre (outside decompose/, evolve/)")
    problems = backward_imports(rows)
    for problem in problems:
        print("backward import:", problem)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
