"""No import cycle in the project, counting every import statement (inside functions too: an import
deferred into a function still ties two modules together), and trainer/args.py is a leaf of the trainer."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_modules() -> dict[str, str]:
    """{dotted name: file} of every module of the checkout (a package by its __init__.py)."""
    out = {}
    for here, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(here, f), ROOT)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(here, f)
    return out


def imported(name: str, path: str, known: dict) -> set[str]:
    """The project modules `name` imports (the deepest known module of each import)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else [])
                base = ".".join(p for p in parts if p)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, found = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root), on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w), on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while not component or component[-1] != v:
                    component.append(stack.pop())
                    on.discard(component[-1])
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_and_the_argument_schema_is_a_leaf():
    known = project_modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert {"train_sft", "trainer.recipe", "trainer.args", "sift.optimizer"} <= set(graph)
    assert "trainer.ds" in graph["trainer.methods"]  # the graph sees imports
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # it would see one
    assert not {m for m in graph["trainer.args"] if m.startswith("trainer")}, graph["trainer.args"]
