"""The package's shape: one-way dependencies between subpackages, no private names across modules,
and a light ``import oloraplus``.

These read the source (``ast``), so they fail on the import that breaks a rule, whether or not any
other test happens to execute it (imports inside functions count too).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "oloraplus"

# Lowest first: a module may import from its own layer or any layer below it, never above.
LAYERS = (
    ("errors", "files", "outputs"),
    ("models", "data"),
    ("fast",),
    ("method",),
    ("evaluation",),
    ("analysis",),
    ("training",),
    ("experiments",),
    ("cli", "__init__", "__main__"),
)
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every oloraplus import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "oloraplus":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import at line {node.lineno}; import oloraplus.* absolutely")
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "oloraplus"]
    return found


def _part(module: str) -> str:
    """The subpackage (or top-level module) a dotted oloraplus module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_subpackage_has_a_layer():
    parts = {_part(m) for m in _modules()}
    assert parts <= set(LEVEL), f"give these a layer in LAYERS: {sorted(parts - set(LEVEL))}"


def test_dependencies_point_down_only():
    wrong = []
    for module, path in _modules().items():
        here = LEVEL[_part(module)]
        for target, _, line in _imports(path):
            if LEVEL[_part(target)] > here:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({_part(module)}) imports {target}")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_no_private_name_is_imported_from_another_module():
    wrong = []
    for module, path in _modules().items():
        for target, names, line in _imports(path):
            wrong += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}.{n}"
                      for n in names if n.startswith("_") and target != module]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {m: {t for t, _, _ in _imports(p) if t in modules and t != m} for m, p in modules.items()}
    # package __init__ files re-export from their own modules; they are not part of a cycle
    graph = {m: {t for t in ts if not t.endswith("__init__")} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_method_needs_no_research_code():
    """``method`` (what a Trainer/TRL user imports) never reaches training, experiments or analysis:
    the oloraplus modules it imports, followed transitively (imports inside functions too)."""
    modules = _modules()
    seen, todo = set(), [m for m in modules if m.startswith("oloraplus.method.")]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [t for t, _, _ in _imports(modules[m]) if t in modules]
    assert not {_part(m) for m in seen} & {"training", "experiments", "analysis", "cli"}, sorted(seen)

def test_import_oloraplus_stays_light():
    """The public API loads no plotting, statistics or metric library (they load when used)."""
    heavy = ("matplotlib", "scipy", "sacrebleu", "rouge_score", "nltk")
    code = f"import sys, oloraplus\nprint([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
