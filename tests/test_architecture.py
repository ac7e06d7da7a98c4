"""The layering the project keeps, checked on the source: the runtime never imports the exporter, the
CLI or the server; the project's modules import each other without cycles (function-level imports
count: a lazy import is still a dependency); no module imports another module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = {"runtime": "ditrt.runtime", "exporter": "ditrt.exporter", "ditrt": "ditrt"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = project_modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(module: str) -> list[tuple[str, str | None]]:
    """(imported project module, name imported from it or None) for every import in the file."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:  # `from package import submodule`
                    found.append((f"{base}.{alias.name}", None))
                elif base in MODULES:
                    found.append((base, alias.name))
    return found


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in imports(m) if target != m} for m in MODULES}


def test_the_module_list_is_the_project():
    assert {"ditrt.runtime", "ditrt.runtime.pipeline", "ditrt.runtime.trt.backend", "ditrt.exporter.onnx_export",
            "ditrt.cli", "ditrt.serve"} <= set(MODULES)


def test_the_runtime_imports_no_exporter_cli_or_server():
    bad = [(m, t) for m, targets in graph().items() if m.startswith("ditrt.runtime")
           for t in targets if not t.startswith("ditrt.runtime")]
    assert bad == []


def test_the_import_graph_is_acyclic():
    edges, state, cycles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_cross_modules():
    bad = [(m, f"{t}.{name}") for m in MODULES for t, name in imports(m)
           if name and name.startswith("_") and not name.startswith("__") and t != m]
    assert bad == []


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The checks above are real: a cycle and a private import planted in copies are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from ditrt.runtime import b_mod\n")
    b.write_text("def f():\n    from ditrt.runtime.a_mod import _secret\n")
    monkeypatch.setitem(MODULES, "ditrt.runtime.a_mod", a)
    monkeypatch.setitem(MODULES, "ditrt.runtime.b_mod", b)
    edges = graph()
    assert "ditrt.runtime.b_mod" in edges["ditrt.runtime.a_mod"] and "ditrt.runtime.a_mod" in edges["ditrt.runtime.b_mod"]
    assert ("ditrt.runtime.a_mod", "_secret") in imports("ditrt.runtime.b_mod")
