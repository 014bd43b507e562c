"""The layers of ``ace/``, enforced: every import (module level or inside a function) runs down the layers,
module-level imports form no cycle, and no module reaches a private name of another sub-package."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from run_kit import ROOT

# what each sub-package may import from ace (besides itself); the top-level modules and ace.tune are the
# applications, which may import anything
LAYERS = {
    "utils": set(),
    "symmetry": {"utils"},
    "nn": {"symmetry", "utils"},
    "constrained": {"nn", "symmetry", "utils"},
    "runs": {"utils"},
    "train": {"constrained", "nn", "symmetry", "runs", "utils"},
    "config": {"constrained", "runs", "utils"},
    "tasks": {"config", "nn", "symmetry", "utils"},
}


def modules(package: Path) -> dict[str, Path]:
    """``ace.x.y`` -> its file, for every module under ``package`` (the folder named ``ace``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer(module: str) -> str:
    """The sub-package of ``ace.x.y`` (``x``), or ``""`` for the root and the top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], bool, int]]:
    """``(imported module, names, at module level?, line)`` for each ace import of ``module``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != "ace":
                continue
            names = [a.name for a in node.names]
            for name in names:  # `from ace.x import y` with y a module imports that module
                if f"{target}.{name}" in known:
                    out.append((f"{target}.{name}", [], id(node) in top, node.lineno))
            names = [n for n in names if f"{target}.{n}" not in known]
            out.append((target, names, id(node) in top, node.lineno))
        elif isinstance(node, ast.Import):
            ace = [a.name for a in node.names if a.name.split(".")[0] == "ace"]
            out += [(name, [], id(node) in top, node.lineno) for name in ace]
    return out


def private_definitions(known: dict[str, Path]) -> dict[str, set[str]]:
    """``_name`` -> the sub-packages that define it (a function, class, assignment or ``self._name``)."""
    out: dict[str, set[str]] = {}
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Store):
                names = [node.id if isinstance(node, ast.Name) else node.attr]
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    out.setdefault(name, set()).add(layer(module))
    return out


def violations(package: Path) -> list[str]:
    """Every upward import, private reach-in and module-level import cycle under ``package``."""
    known = modules(package)
    defined = private_definitions(known)
    found, graph = [], {}
    for module, path in known.items():
        own = layer(module)
        graph[module] = set()
        for target, names, at_top, line in imports(module, path, known):
            where = f"{path.relative_to(package.parent)}:{line}"
            theirs = layer(target)
            if target == "ace" and own:
                found.append(f"{where}: {module} imports the package root (import from its sub-package)")
            elif own in LAYERS and theirs != own and theirs not in LAYERS[own]:
                found.append(f"{where}: {module} ({own}) imports {target} ({theirs or 'application'})")
            reached = [n for n in names if private(n, own, theirs)]
            found += [f"{where}: {module} imports private {n} from {target}" for n in reached]
            if at_top and target in known and target != module:
                graph[module].add(target)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and private(node.attr, own, None):
                others = defined.get(node.attr, set())
                if others and own not in others:
                    where = f"{path.relative_to(package.parent)}:{node.lineno}"
                    found.append(f"{where}: {module} reaches .{node.attr}")
    return found + cycles(graph)


def private(name: str, own: str, theirs: str | None) -> bool:
    return name.startswith("_") and not name.startswith("__") and theirs != own


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per module-level import cycle (depth-first search; a package imports its ``__init__``'s
    names, so a module importing its own package is not a cycle)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if node.startswith(nxt + "."):
                continue  # ace.x.y importing ace.x: the package, already being initialised
            if state.get(nxt) == "open":
                found.append("cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_import_runs_down_the_layers_and_no_private_name_crosses_a_sub_package():
    assert violations(ROOT / "ace") == []


def test_only_the_constrained_step_imports_cooper():
    importers = {
        module
        for module, path in modules(ROOT / "ace").items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            n.split(".")[0] == "cooper"
            for n in [getattr(node, "module", None) or ""] + [a.name for a in node.names]
        )
    }
    assert importers == {"ace.constrained.multipliers", "ace.constrained.lagrangian"}


def test_the_check_fails_on_a_planted_upward_import_a_cycle_and_a_private_reach_in(tmp_path):
    package = tmp_path / "ace"
    shutil.copytree(ROOT / "ace", package)
    deviation = package / "symmetry" / "deviation.py"
    deviation.write_text(deviation.read_text() + "\nfrom ace.train.trainer import Trainer\n")
    relaxed = package / "nn" / "relaxed.py"
    relaxed.write_text(relaxed.read_text() + "\nfrom ace.constrained.primal_dual import _unused\n")
    (package / "utils" / "a.py").write_text("import ace.utils.b\n")
    (package / "utils" / "b.py").write_text("from ace.utils import a\n")
    found = violations(package)
    assert any("ace.symmetry.deviation (symmetry) imports ace.train.trainer (train)" in f for f in found)
    assert any("ace.nn.relaxed (nn) imports ace.constrained.primal_dual (constrained)" in f for f in found)
    assert any("imports private _unused" in f for f in found)
    assert any(f.startswith("cycle: ace.utils.a -> ace.utils.b -> ace.utils.a") for f in found), found
    upward = [f for f in found if not f.startswith("cycle") and "deviation" not in f and "relaxed" not in f]
    assert upward == [], upward  # nothing else: the unplanted tree is clean
