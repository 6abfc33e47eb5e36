#!/usr/bin/env python3
"""Fails if the library's modules import each other in a circle.

An edge A -> B is any path from A that names B: `use crate::b::..`, `use super::..`,
`crate::b::item` in code or in a doc link, and, from a module's own file, a path into
one of its children (`child::item`). Splitting one type's `impl` over a parent and its
children (the parent calls methods defined below it) leaves no path, so it is no edge.
The binary (`src/main.rs`, `src/cli/`) and unit tests are left out. `-v` prints the graph.
"""
import os
import re
import sys

ROOT = "src"


def modules():
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".rs") or path == "src/main.rs" or path.startswith("src/cli/"):
                continue
            parts = os.path.relpath(path, ROOT)[:-3].split("/")
            if parts[-1] in ("mod", "lib"):
                parts = parts[:-1]
            found["::".join(parts)] = path
    return found


def resolve(mods, current, path):
    """The deepest module a `crate::`/`super::`/`self::` path names, or None."""
    parts = path.split("::")
    here = current.split("::") if current else []
    if parts[0] == "crate":
        base, parts = [], parts[1:]
    elif parts[0] == "self":
        base, parts = here, parts[1:]
    elif parts[0] == "super":
        base = here
        while parts and parts[0] == "super":
            base, parts = base[:-1], parts[1:]
    else:
        return None
    best = None
    for i in range(len(parts) + 1):
        candidate = "::".join(base + parts[:i])
        if candidate in mods:
            best = candidate
    return best


def expand(use):
    """`a::{b, c::d}` -> [`a::b`, `a::c::d`] (one level of braces is enough here)."""
    use = re.sub(r"\s+", "", use)
    group = re.match(r"(.*?)::\{(.*)\}$", use)
    if not group:
        return [use]
    items = re.split(r",(?![^{]*\})", group.group(2))
    return [group.group(1) + "::" + re.sub(r"::\{.*", "", item) for item in items if item]


def graph(mods):
    edges = {m: set() for m in mods}
    for module, path in mods.items():
        text = open(path, encoding="utf-8").read()
        text = re.sub(r"#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", text, flags=re.S)
        paths = []
        for use in re.finditer(r"\buse\s+((?:crate|super|self)::[^;]*);", text):
            paths += [p.split(" as ")[0] for p in expand(use.group(1))]
        paths += re.findall(r"(?<![\w:])((?:crate|super)(?:::\w+)+)", text)
        for p in paths:
            target = resolve(mods, module, p)
            if target is not None and target != module:
                edges[module].add(target)
        depth = module.count("::") + 1 if module else 0
        for child in mods:
            is_child = child.startswith(module + "::" if module else "") and child.count("::") + 1 == depth + 1
            if child and is_child and re.search(r"(?<![\w:])" + child.split("::")[-1] + r"::", text):
                edges[module].add(child)
    return edges


def cycles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return found


def main():
    edges = graph(modules())
    if "-v" in sys.argv:
        for module in sorted(edges):
            print(module or "<lib>", "->", ", ".join(sorted(t or "<lib>" for t in edges[module])))
    found = cycles(edges)
    for component in found:
        print("modules importing in a circle:", ", ".join(m or "<lib>" for m in component))
    if found:
        sys.exit(1)
    print(f"{len(edges)} modules, no import circles")


if __name__ == "__main__":
    main()
