"""The shape of the code (issue #9): the import graph of ``wa_worker`` has no cycle,
imports inside functions and long functions say why, and the module map in
docs/architecture.md lists every module. Pure ``ast``, nothing is imported."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wa_worker"
#: a function longer than this needs a ``# long: <reason>`` comment above it
MAX_FUNCTION_LINES = 60
REASON = re.compile(r"#\s*\S")
LONG_REASON = re.compile(r"#\s*long:\s*\S")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import that runs (not under ``if TYPE_CHECKING``), and whether it sits in a function."""

    def walk(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                yield from (x for n in child.orelse for x in walk_one(n, in_function))
                continue
            yield from walk_one(child, in_function)

    def walk_one(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
            return
        yield from walk(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))

    yield from walk(tree, False)


def targets(importer: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The ``wa_worker`` modules an import loads (a ``from pkg import sub`` loads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    return {n for n in names if n in known and n != importer}


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or on a line of the imports and comments just above it."""
    if REASON.search(lines[lineno - 1]):
        return True
    for line in reversed(lines[:lineno - 1]):
        stripped = line.strip()
        if stripped.startswith("#"):
            return True
        if not stripped.startswith(("from ", "import ")):
            return False
    return False


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    unexplained: list[str] = []
    for name, path in mods.items():
        lines = path.read_text().splitlines()
        for node, in_function in imports(ast.parse(path.read_text())):
            graph[name] |= targets(name, path, node, set(mods))
            if in_function and not _has_reason(lines, node.lineno):
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return graph, unexplained


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_import_graph_of_wa_worker_is_acyclic() -> None:
    graph, _ = import_graph()
    assert len(graph) > 40 and "wa_worker.storage.journal" in graph["wa_worker.daemon"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_say_why() -> None:
    _, unexplained = import_graph()
    assert unexplained == [], "imports inside functions need a comment (why not at module level):\n" + "\n".join(
        unexplained)


def long_functions(root: Path) -> list[str]:
    """Functions longer than :data:`MAX_FUNCTION_LINES` (decorators included) without
    a ``# long: <reason>`` comment in the three lines above them (a long function's
    reason covers the functions inside it)."""
    found = []

    def visit(node: ast.AST, path: Path, lines: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, path, lines)
                continue
            first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
            length = (child.end_lineno or child.lineno) - first + 1
            if length <= MAX_FUNCTION_LINES:
                visit(child, path, lines)
            elif not any(LONG_REASON.search(line) for line in lines[max(0, first - 4):first - 1]):
                found.append(f"{path.relative_to(ROOT)}:{child.lineno} {child.name} ({length} lines)")

    for path in sorted(root.rglob("*.py")):
        visit(ast.parse(path.read_text()), path, path.read_text().splitlines())
    return found


def test_long_functions_say_why() -> None:
    found = long_functions(PACKAGE) + long_functions(ROOT / "tests")
    assert found == [], (f"functions over {MAX_FUNCTION_LINES} lines: split them, or write `# long: <reason>` "
                         "above them:\n" + "\n".join(found))


# ---------------------------------------------------------------------- module map

_ENTRY = re.compile(r"^(?P<indent>(?:│   |    )*)(?:├── |└── )(?P<names>\S.*?)(?:\s{2,}|$)")


def module_map() -> set[str]:
    """The paths the tree in docs/architecture.md ("Module map") lists, relative to the repository."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Module map", 1)[1].split("```", 2)[1]
    listed: set[str] = set()
    parents: list[str] = []
    for line in block.splitlines():
        if line.startswith("wa_worker/"):
            parents = ["wa_worker"]
            continue
        m = _ENTRY.match(line)
        if m is None or not parents:
            continue
        depth = len(m["indent"]) // 4 + 1
        del parents[depth:]
        for name in (n.strip() for n in m["names"].split(",")):
            listed.add("/".join([*parents, name.rstrip("/")]))
        if m["names"].endswith("/"):
            parents.append(m["names"].rstrip("/"))
    return listed


def test_the_module_map_lists_every_module() -> None:
    listed = module_map()
    wanted = set()
    for path in PACKAGE.rglob("*"):
        rel = path.relative_to(ROOT)
        if "__pycache__" in rel.parts:
            continue
        if path.is_dir():
            wanted.add(rel.as_posix())
        elif path.suffix == ".py" and path.name != "__init__.py":
            wanted.add(rel.as_posix())
    # a folder's non-Python files (dev/static/) are covered by the folder
    assert sorted(wanted - listed) == [], "missing from the module map in docs/architecture.md"
    assert sorted(listed - wanted - {"wa_worker"}) == [], "listed in the module map but not in the tree"
