#!/usr/bin/env python3
"""Dependency cycles among the files of a crate's src/, counted per file.

    scripts/dev/file-cycles.py [SRC_DIR]   (default api/src)

A file depends on another when it names it in a path: `crate::a::b`, `super::x`, `self::y` (in
`use` declarations and in expressions alike). A folder module (`a/mod.rs`) is its own file; a
path to an item inside a file counts as that file. Prints the files of every strongly connected
component of more than one file (a cycle), the largest files by lines, and exits 1 when there
is a cycle."""
import os
import re
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "api/src"


def module_of(path: str) -> tuple[str, ...]:
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return tuple(rel)


files = {}
for d, _, names in os.walk(SRC):
    for n in names:
        if n.endswith(".rs"):
            p = os.path.join(d, n)
            files[module_of(p)] = p


def resolve(parts: tuple[str, ...]) -> tuple[str, ...] | None:
    """The longest prefix of `parts` that is a file module."""
    for i in range(len(parts), 0, -1):
        if parts[:i] in files:
            return parts[:i]
    return None


PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}", re.S)
deps: dict[tuple[str, ...], set[tuple[str, ...]]] = {m: set() for m in files}
for mod, path in files.items():
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"//[^\n]*", "", text)
    # `#[cfg(test)] mod tests { ... }` at the end of a file: its paths are the tests'.
    text = text.split("#[cfg(test)]\nmod tests")[0]
    # `self` is the file's own module, `super` its parent (for `a/mod.rs` too: its module is a).

    def base(kind: str) -> tuple[str, ...]:
        return {"crate": (), "self": mod, "super": mod[:-1]}[kind]

    paths = []
    for m in GROUP.finditer(text):
        prefix = m.group(2).split("::")[1:] if m.group(2) else []
        for item in re.split(r",(?![^{]*\})", m.group(3)):
            item = item.strip()
            if not item:
                continue
            head = re.split(r"::|\s", item)[0]
            if head in ("self", "{"):
                paths.append((m.group(1), prefix))
            else:
                paths.append((m.group(1), prefix + [p for p in item.split("{")[0].split("::") if p]))
    for m in PATH.finditer(text):
        paths.append((m.group(1), m.group(2).split("::")[1:]))
    for kind, rest in paths:
        b = base(kind)
        target = resolve(tuple(b) + tuple(x.strip() for x in rest if x.strip()))
        if target is not None and target != mod and target != ():
            deps[mod].add(target)

# Tarjan's strongly connected components.
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in deps[v]:
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        sccs.append(comp)


for v in deps:
    if v not in index:
        visit(v)

cycles = [sorted(c) for c in sccs if len(c) > 1]
name = lambda m: os.path.relpath(files[m], SRC)
print(f"{len(files)} files, {sum(len(d) for d in deps.values())} file-to-file dependencies")
for c in sorted(cycles, key=len, reverse=True):
    print(f"cycle of {len(c)} files:")
    for m in c:
        inside = sorted(name(d) for d in deps[m] if d in c)
        print(f"  {name(m)} -> {', '.join(inside)}")
sizes = sorted(((sum(1 for _ in open(p, encoding='utf-8')), os.path.relpath(p, SRC)) for p in files.values()), reverse=True)
print("largest files: " + ", ".join(f"{p} {n}" for n, p in sizes[:6]))
sys.exit(1 if cycles else 0)
