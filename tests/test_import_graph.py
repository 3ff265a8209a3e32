"""The import graph of minilora/, models/ and kernels/ has no circles: every module can be read after the
modules it imports, and none of them imports it back, not even inside a function.

An edge A -> B for every `import B` and `from B import x` in A's source (top level or in a function);
`from P import m` with m a module of package P is an edge to P.m. Cycles are the strongly connected
components of more than one module (Tarjan), or a module importing itself.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = (("minilora", "minilora"), ("models", "minilora.models"), ("kernels", "minilora.kernels"))


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the three folders."""
    found = {}
    for folder, package in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                    rel = rel.removesuffix("__init__").rstrip(".")
                    found[f"{package}.{rel}" if rel else package] = os.path.join(d, f)
    return found


def edges(mods: dict[str, str]) -> dict[str, set[str]]:
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from .x import y` inside package p is p.x
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name} | ({name} & set(targets))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a circle in them (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
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
                    if len(comp) > 1 or v in graph[v]:
                        out.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def test_the_cycle_finder_finds_circles():
    # a known graph: a -> b -> c -> a is one circle, d imports itself, e -> a is no circle
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_submodule_imports_become_edges():
    mods = modules()
    graph = edges(mods)
    assert "minilora.quant.nf4" in graph["minilora.kernels.nf4_dequant"]  # absolute `from ... import`
    assert "minilora.kernels.common" in graph["minilora.kernels.nf4_dequant"]  # `from .common import`
    assert "minilora.quant.linear" in graph["minilora.quant"]  # a package's re-export


def test_no_import_circles():
    found = cycles(edges(modules()))
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)
