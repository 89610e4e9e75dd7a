"""The import graph keeps the architecture honest: no cycles, and production code never leans on test or dev tooling.

Read from the source with ``ast`` (every ``import``, at module level or inside a function, except those under
``if TYPE_CHECKING:``), so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pgferry

SRC = Path(pgferry.__file__).resolve().parent

DEV_TOOLING = ("pgferry.localstack", "pgferry.testing")
"""Local servers and test fixtures: what the CLI's ``dev``/``demo`` commands and the tests use, never a library."""

MAY_USE_DEV_TOOLING = ("pgferry.localstack", "pgferry.testing", "pgferry.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _runtime_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def test_production_code_never_imports_dev_tooling() -> None:
    arrows = [
        f"{importer} -> {imported}"
        for importer, targets in _graph().items()
        if not importer.startswith(MAY_USE_DEV_TOOLING)
        for imported in targets
        if imported.startswith(DEV_TOOLING)
    ]
    assert not arrows, "production modules import local-stack or test code:\n" + "\n".join(sorted(arrows))


def test_only_tests_import_the_test_fixtures() -> None:
    arrows = [
        f"{importer} -> {imported}"
        for importer, targets in _graph().items()
        if not importer.startswith("pgferry.testing")
        for imported in targets
        if imported.startswith("pgferry.testing")
    ]
    assert not arrows, "\n".join(sorted(arrows))


def test_no_import_cycles() -> None:
    graph = _graph()
    # Tarjan's strongly connected components; a component of more than one module is a cycle. A package's
    # __init__ re-exporting its submodules is not an arrow back: only submodule -> sibling edges count there.
    edges = {m: {t for t in targets if not (m.startswith(t + ".") and t in graph)} for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in edges.get(node, ()):
            if succ not in index:
                strongconnect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            strongconnect(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_migrate_run_starts_without_the_schema_toolchain() -> None:
    """``pgferry migrate run`` must not pay for Alembic, SQLAlchemy or the local stack it never uses."""
    probe = (
        "import sys; from pgferry.cli.main import build_app; build_app(['migrate']); "
        "print(sorted(m for m in ('alembic', 'sqlalchemy', 'pgferry.localstack', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_package_has_a_version() -> None:
    assert pgferry.__version__ and pgferry.__version__ != "0.0.0+unknown"
