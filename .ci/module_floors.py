#!/usr/bin/env python3
"""Fails if the library's modules import each other in a circle, or if one imports a
module on a floor above its own.

FLOORS lists the library's top-level modules from the bottom up. A module may import
modules of its own top-level group and of any floor below; never sideways to another
group of its floor (the broker plumbing and the store know nothing of each other) and
never up. Every top-level module must sit on a floor, so a new one is placed on purpose.

An edge A -> B is any path from A that names B: `use crate::b::..`, `use super::..`,
`crate::b::item` in code or in a doc link, and, from a module's own file, a path into
one of its children (`child::item`). Splitting one type's `impl` over a parent and its
children (the parent calls methods defined below it) leaves no path, so it is no edge.
The binary's `src/main.rs` (one call into `cli`) and unit tests are left out. `-v` prints the graph.
"""
import os
import re
import sys

ROOT = "src"

FLOORS = [
    # Words and numbers every layer speaks.
    ["clock", "caps", "state", "phases", "metrics"],
    ["retry", "config", "external"],
    ["protocol", "registry"],
    # The two kinds of plumbing, side by side.
    ["store", "amqp"],
    # The one error type, holding either kind of failure; the store handle users hold.
    ["error", "database"],
    # Services on the plumbing: the messages taskmill sends, pools, retention, schedules,
    # the parts of a large job, job summaries, the built-in task types.
    ["messages", "known_pools", "retention", "schedule", "parting", "summary", "builtin"],
    # What a producer or an operator does to a job.
    ["operations", "transactional"],
    ["client", "roles"],
    ["http"],
    ["pod"],
    [""],
    # The command line: it may use anything, and nothing uses it.
    ["cli"],
]


def modules():
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".rs") or path == "src/main.rs":
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


def floor_of(module):
    group = module.split("::")[0]
    for level, groups in enumerate(FLOORS):
        if group in groups:
            return level, group
    return None, group


def upward(edges):
    """Imports that go sideways or up a floor, and modules on no floor."""
    found = []
    for module in sorted(edges):
        level, group = floor_of(module)
        if level is None:
            found.append(f"{module} sits on no floor: add `{group}` to FLOORS")
            continue
        for target in sorted(edges[module]):
            target_level, target_group = floor_of(target)
            if target_group == group or (target_level is not None and target_level < level):
                continue
            found.append(f"{module or '<lib>'} imports {target or '<lib>'}, on its floor or above")
    return found


def main():
    edges = graph(modules())
    if "-v" in sys.argv:
        for module in sorted(edges):
            print(module or "<lib>", "->", ", ".join(sorted(t or "<lib>" for t in edges[module])))
    found = cycles(edges)
    for component in found:
        print("modules importing in a circle:", ", ".join(m or "<lib>" for m in component))
    wrong = upward(edges)
    for line in wrong:
        print(line)
    if found or wrong:
        sys.exit(1)
    print(f"{len(edges)} modules on {len(FLOORS)} floors: no import circles, none upward")


if __name__ == "__main__":
    main()
