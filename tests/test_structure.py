"""The shape of the house: no import circles in kd/, and a training core that does not load the experiments."""

import ast
import subprocess
import sys
from pathlib import Path

KD = Path(__file__).resolve().parent.parent / "kd"


def module_name(path: Path) -> str:
    parts = path.relative_to(KD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kd_imports(path: Path, modules: set[str]) -> set[str]:
    """Every kd module `path` imports, at the top or inside a function (a hidden circle is still one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from kd import x`
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(KD.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): kd_imports(p, modules) - {module_name(p)} for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    return next((cycle for node in sorted(graph) if node not in state and (cycle := visit(node))), None)


def test_the_cycle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    (tmp_path / "kd").mkdir()
    (tmp_path / "kd" / "a.py").write_text("from kd.b import x\n")
    (tmp_path / "kd" / "b.py").write_text("def f():\n    from kd.a import y\n")
    modules = {"kd.a", "kd.b"}
    graph = {f"kd.{n}": kd_imports(tmp_path / "kd" / f"{n}.py", modules) for n in "ab"}
    assert find_cycle(graph) == ["kd.a", "kd.b", "kd.a"]


def test_kd_has_no_import_circle():
    graph = import_graph()
    assert "kd.streaming" in graph["kd.data"]  # the graph is read, not empty
    assert find_cycle(graph) is None


def loaded_by(modules: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of `prefixes` that importing `modules` loads in a clean interpreter."""
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=KD.parent).stdout
    return ast.literal_eval(out)


def test_the_training_core_loads_neither_optuna_nor_the_experiments():
    assert loaded_by("kd.training, kd.evaluation, kd.export, kd.predict", ("optuna", "kd.experiments")) == []


def test_train_py_finding_runs_and_the_evaluation_scripts_flags_load_no_torch():
    """So that "no run yet" and a bad flag answer at once, not after seconds of importing torch and timm."""
    assert loaded_by("train, kd.record, kd.evaluation_cli, kd.report", ("torch", "timm")) == []
