"""The structure holds: imports only look down (import-linter), no import cycle, no project import hidden in a
function outside the entry points, files a reader can hold in their head."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted([*ROOT.glob("mm/**/*.py"), *ROOT.glob("data/**/*.py")])
ENTRY_POINTS = sorted([ROOT / "train.py", ROOT / "eval.py", *ROOT.glob("scripts/*.py")])
PROJECT = ("mm", "data")


def test_layers_contract_holds():
    """pyproject.toml's [tool.importlinter] contract: each layer imports only from lower ones."""
    lint = Path(sys.executable).with_name("lint-imports")
    p = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken" in p.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on_stack, out = [], set(), []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle_counting_imports_inside_functions():
    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph(*PROJECT)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


def _function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every project import inside a function body."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and (inner.module or "").split(".")[0] in PROJECT:
                out.append((inner.lineno, inner.module))
            elif isinstance(inner, ast.Import):
                out += [(inner.lineno, a.name) for a in inner.names if a.name.split(".")[0] in PROJECT]
    return out


def test_no_project_import_inside_a_function_but_for_fast_cli_help():
    assert [(str(p.relative_to(ROOT)), x) for p in LIBRARY for x in _function_imports(p)] == []
    hidden = [(p, line) for p in ENTRY_POINTS for line, _ in _function_imports(p)]
    assert len({p for p, _ in hidden}) <= 5  # train.py, eval.py, chat.py, generate.py, make_shards.py
    for path, line in hidden:  # each says why, right above its block of imports
        lines = path.read_text().splitlines()[:line]
        is_import = lambda s: not s.strip() or s.lstrip().startswith(("from ", "import "))  # noqa: E731
        block = next(i for i in range(len(lines) - 1, -1, -1) if not is_import(lines[i]))
        assert "not at the top" in lines[block] or "not at the top" in lines[line - 1], (path.name, line)


def test_files_and_functions_a_reader_can_hold_in_their_head():
    long_files, long_functions = [], []
    for path in LIBRARY + ENTRY_POINTS:
        source = path.read_text()
        if len(source.splitlines()) > 600:
            long_files.append(path.name)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{path.name}:{node.name}")
    assert long_files == [] and long_functions == []


def test_readme_layout_names_paths_that_exist():
    """Every path of the README's layout table exists (the files a folder's row names, inside that folder)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout") :]
    rows = [line.split(" | ") for line in section[: section.index("\n## ", 4)].splitlines() if line.startswith("| ")]
    checked, missing = 0, []
    for row in rows[2:]:
        where = [p for p in row[1].split("`")[1::2]]
        folder = next((p for p in where if p.endswith("/")), "")  # the row's folder: its files are named inside
        names = [n for n in row[-1].split("`")[1::2] if n.endswith((".py", "/", ".yaml", ".sh")) and "{" not in n]
        for name in [p for p in where if "{" not in p] + [folder + n for n in names]:
            checked += 1
            # a file of a sub-folder named in the same row (heads/: base.py, flow.py) is found inside the folder
            inside = folder and any((ROOT / folder).rglob(Path(name).name))
            if not ((ROOT / name).exists() or list(ROOT.glob(name)) or inside):
                missing.append(name)
    assert checked > 40 and missing == []
