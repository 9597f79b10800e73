"""The library's import graph has no cycles and never reaches the entry points in ``services/``.

Read statically (``ast``), so lazy imports inside functions count too: a cycle hidden behind a
function-level import still couples the two modules. Checked at two levels: modules, and the
library's top-level packages (``personalkv.index`` may use ``personalkv.storage`` or the other
way round, never both).
"""

from __future__ import annotations

import ast
import pathlib

LIBRARY = pathlib.Path(__file__).resolve().parents[2] / "shared"


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    found = {}
    for path in LIBRARY.rglob("*.py"):
        parts = list(path.relative_to(LIBRARY).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(path: pathlib.Path, package: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> tuple[dict[str, set[str]], set[str]]:
    """(module -> library modules it imports, every absolute name imported anywhere)."""
    modules = _modules()
    graph, everything = {}, set()
    for name, (path, is_package) in modules.items():
        imported = _imports(path, name if is_package else name.rpartition(".")[0])
        everything |= imported
        targets = set()
        for target in imported:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph, everything


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _top_package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_module_import_cycles():
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_no_package_import_cycles():
    graph, _ = _graph()
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = _top_package(module)
        # personalkv/__init__ is the root, not a layer of its own
        if source == "personalkv":
            continue
        packages.setdefault(source, set()).update(
            t for t in map(_top_package, targets) if t not in (source, "personalkv"))
    assert _cycles(packages) == []


def test_the_library_never_imports_the_entry_points():
    _, everything = _graph()
    assert sorted(n for n in everything if n == "services" or n.startswith("services.")) == []
    # ... not even by name (Celery's include=, importlib): dependencies point inwards only.
    by_name = []
    for path, _ in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.value.split(":")[0] if isinstance(node, ast.Constant) \
                and isinstance(node.value, str) else ""
            if module.startswith("services.") and all(map(str.isidentifier, module.split("."))):
                by_name.append(f"{path.name}: {node.value}")
    assert by_name == []


def test_the_cycle_finder_finds_a_cycle():
    # The checks above pass vacuously if _cycles cannot see one.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _external_imports_reachable_from(package: str) -> dict[str, set[str]]:
    """Every non-library top-level module imported by ``package``'s modules or by any library
    module they reach (lazy and type-only imports included) -> the library modules importing it."""
    modules = _modules()
    graph, _ = _graph()
    todo = [m for m in modules if m == package or m.startswith(package + ".")]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    found: dict[str, set[str]] = {}
    for module in seen:
        path, is_package = modules[module]
        for name in _imports(path, module if is_package else module.rpartition(".")[0]):
            top = name.split(".")[0]
            if top and top != "personalkv":
                found.setdefault(top, set()).add(module)
    return found


def test_the_use_cases_import_neither_celery_nor_argparse():
    # service_layer is the use cases only: the Celery adapters live in personalkv.celery_app,
    # the commands in personalkv.commands, the composition root in personalkv.bootstrap.
    found = _external_imports_reachable_from("personalkv.service_layer")
    assert {name: sorted(found[name]) for name in ("celery", "kombu", "argparse")
            if name in found} == {}
    assert "torch" in found  # the walk reaches the model code, so it does see transitive imports


def test_the_python_client_needs_grpc_and_protobuf_only():
    """personalkv.api.client imports and builds a client with the model stack, Milvus, Celery,
    the object store and pydantic made unimportable (``sys.modules[name] = None``), and loads
    no third-party module but grpc (and its optional grpc_* helpers, when installed), protobuf
    and typing_extensions: what `pip install --no-deps personalkv grpcio protobuf
    typing-extensions` provides."""
    import subprocess
    import sys

    script = """
import sys
for name in ("torch", "transformers", "pymilvus", "milvus_lite", "celery", "kombu", "redis",
             "minio", "numpy", "PIL", "cv2", "pydantic", "pydantic_settings"):
    sys.modules[name] = None
from personalkv.api.client import PersonalKVClient
PersonalKVClient("https://pkv.example.com", "127.0.0.1:1", "token").close()
loaded = {name.split(".")[0] for name, module in sys.modules.items() if module is not None}
print(" ".join(sorted(loaded - set(sys.stdlib_module_names))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(LIBRARY), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    third_party = {name for name in done.stdout.split()
                   if not name.startswith(("_", "grpc_")) and name != "cython_runtime"}
    assert third_party == {"google", "grpc", "personalkv", "typing_extensions"}
