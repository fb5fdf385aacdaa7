#!/usr/bin/env python3
"""Lists cycles of `use crate::…` / `super::` imports between the modules of src/ (one
module per file; comments and `mod tests` are left out). Run: python3 scripts/import_cycles.py src
Issue 14 asks for none; it prints each cycle with its edges and exits 1 if there is one."""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else 'src'
mods = {}
for dirpath, _, files in os.walk(root):
    for f in files:
        if not f.endswith('.rs'): continue
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, root)[:-3].replace(os.sep, '::')
        if rel.endswith('::mod'): rel = rel[:-5]
        if rel in ('lib', 'main'): continue
        mods[rel] = open(path).read()
def resolve(name):
    parts = name.split('::')
    while parts:
        cand = '::'.join(parts)
        if cand in mods: return cand
        parts.pop()
    return None
edges = {m: set() for m in mods}
for m, text in mods.items():
    text = re.sub(r'#\[cfg\(test\)\]\s*mod tests \{.*', '', text, flags=re.S)
    text = re.sub(r"//.*", "", text)
    names = re.findall(r'crate::([A-Za-z_][A-Za-z0-9_:]*)', text)
    for group in re.findall(r'crate::\{([^}]*)\}', text):
        names += [n.strip().split('::')[0] for n in group.split(',') if n.strip()]
    for use in names:
        t = resolve(use.rstrip(':'))
        if t and t != m and not m.startswith(t + '::') :
            edges[m].add(t)
    # super:: imports
    supers = re.findall(r'\bsuper::([A-Za-z_][A-Za-z0-9_:]*)', text)
    for group in re.findall(r'\bsuper::\{([^}]*)\}', text):
        supers += [n.strip().split('::')[0] for n in group.split(',') if n.strip()]
    for use in supers:
        base = m.rsplit('::', 1)[0] if '::' in m else ''
        t = resolve((base + '::' if base else '') + use)
        if t and t != m and not m.startswith(t + '::'):
            edges[m].add(t)
# Tarjan SCC
index = {}; low = {}; stack = []; on = set(); sccs = []; i = [0]
sys.setrecursionlimit(10000)
def strong(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index: strong(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
for v in edges:
    if v not in index: strong(v)
for comp in sccs:
    print('cycle:', ', '.join(comp))
    for a in comp:
        for b in sorted(edges[a]):
            if b in comp: print(f'    {a} -> {b}')
print(f'{len(sccs)} cycle(s) among {len(mods)} modules')
sys.exit(1 if sccs else 0)
