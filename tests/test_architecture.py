"""The shape of the package, checked: no import circles, commands are leaves, modules and functions that fit in a
head. The graph counts every import in a module, function-level (lazy) ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import noisyft

ROOT = Path(noisyft.__file__).parent
COMMAND_MODULES = ("noisyft.cli", "noisyft.commands.", "noisyft.experiment.cli")
THIN = ("noisyft.recipe", "noisyft.eval.recipe", "noisyft.trainer")  # functions <= 80 lines here


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _is_command(name: str) -> bool:
    return any(name == c or (c.endswith(".") and name.startswith(c)) for c in COMMAND_MODULES)


def test_no_import_cycles():
    graph = _graph()
    # package __init__ files that only re-export lazily are not edges of a cycle worth flagging
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_commands_are_leaves():
    graph = _graph()
    for name, deps in graph.items():
        commands = {d for d in deps if _is_command(d)}
        if name == "noisyft.cli":  # the dispatcher routes to the commands
            continue
        assert not commands, f"{name} imports command module(s) {sorted(commands)}"


def test_modules_and_functions_fit_in_a_head():
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        assert lines <= 500, f"{name} has {lines} lines (> 500)"
        if name in THIN:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    assert length <= 80, f"{name}.{node.name} has {length} lines (> 80)"


def test_method_configs_import_without_torch():
    import subprocess
    import sys

    from noisyft.methods import REGISTRY

    targets = [spec.config.split(":")[0] for spec in REGISTRY.values()] + ["noisyft.config", "noisyft.cli"]
    probe = "import sys\n" + "".join(f"import {t}\n" for t in targets) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
