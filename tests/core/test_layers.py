"""The core imports only downward, in the order docs/architecture.md lists (module-level imports;
``TYPE_CHECKING`` blocks and imports inside functions are not edges)."""

from __future__ import annotations

import ast
import pathlib

import adapterkit

# docs/architecture.md's package graph, bottom first; a module may import only modules before it.
ORDER = ["atomic_io", "sites", "site_check", "stacks", "heads", "kinds", "tasks", "config", "task_adapter",
         "routing", "composition", "artifact", "fusion", "attach", "model"]
SRC = pathlib.Path(adapterkit.__file__).parent


def _unit(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def _imports(path: pathlib.Path) -> set[str]:
    """The adapterkit units a file imports at module level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(SRC).parent.parts
    found = set()
    for node in tree.body:  # module level only: not functions, not ``if TYPE_CHECKING:``
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            parts = (*base, *(node.module.split(".") if node.module else ()))
            if parts:
                found.add(parts[0])
            else:  # ``from . import x`` at the top: the package itself or its modules
                found |= {a.name for a in node.names if (SRC / f"{a.name}.py").exists() or (SRC / a.name).is_dir()}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adapterkit."):
            found.add(node.module.split(".")[1])
    return found


def test_core_modules_import_only_downward():
    problems = []
    for unit in ORDER:
        files = [SRC / f"{unit}.py"] if (SRC / f"{unit}.py").exists() else sorted((SRC / unit).glob("*.py"))
        assert files, f"{unit} is in the documented order but not in the package"
        for f in files:
            for target in _imports(f) - {unit}:
                if target not in ORDER[: ORDER.index(unit)]:
                    problems.append(f"{f.relative_to(SRC)} imports {target}")
    assert problems == []


def test_the_documented_order_is_the_one_tested():
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    positions = [doc.index(f"`{u}.py`" if (SRC / f"{u}.py").exists() else f"`{u}/`") for u in ORDER]
    assert positions == sorted(positions)
