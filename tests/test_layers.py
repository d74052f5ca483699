"""The package's import layers: every module of ``softlm_jax`` sits in one layer of :data:`LAYERS`, and
imports only modules of its own layer or below, never in a circle, and never inside a function.

The graph is read from the source with :mod:`ast` (nothing is imported, no jax): every ``import
softlm_jax.x``, ``from softlm_jax import x``, ``from softlm_jax.x import y`` and relative import, at
module level and inside functions. Imports inside functions are allowed only for other packages
(heavy or optional ones: transformers, orbax, matplotlib, ...); an import of the package's own modules
inside a function hides a circle from the reader (Python only runs it later), so it is an error here.

A new module gets a row in :data:`LAYERS`. Run alone: ``python tests/test_layers.py`` prints the
problems (nothing when there are none).
"""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

PACKAGE = "softlm_jax"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

#: Layer ``i`` may import layers ``0..i``. Names are relative to the package (``"config"`` is
#: ``softlm_jax.config``); a subpackage's name places all its modules (``"cli"``: ``softlm_jax.cli`` and
#: ``softlm_jax.cli.*``) unless a longer name places one of them; ``"softlm_jax"`` is the package's
#: ``__init__`` (the public API).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation: configuration, registries, tree walks, numerics, files, data",
     ("_version", "registry", "config", "tree", "threshold", "linalg", "serial", "interrupt", "files", "data",
      "metrics", "hooks", "distributed")),
    ("selection-rule registry, counting, losses",
     ("rules", "budget", "losses")),
    ("decompositions, the built-in rules, compression, export, interception, optimizers, sharding",
     ("svd", "builtin_rules", "compress", "export", "intercept", "optim", "shard")),
    ("whole-model algorithms and model families",
     ("calib", "blocks", "propagate", "refit", "allocate", "stream", "nnx_bridge", "models")),
    ("training, tasks, checkpoints, reports",
     ("train", "tasks", "checkpoint", "report")),
    ("runs: the comparison pipeline and its presets",
     ("run", "presets")),
    ("public API and benchmarks",
     ("softlm_jax", "api", "bench")),
    ("command line",
     ("cli",)),
]


# --- the checker (pure ast) ------------------------------------------------------------------------------


def find_modules(package_dir: Path, package: str) -> dict[str, Path]:
  """``{dotted module name: file}`` of every ``.py`` file under ``package_dir`` (``__init__.py`` is the
  package itself)."""
  out = {}
  for root, dirs, files in os.walk(package_dir):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for f in sorted(files):
      if not f.endswith(".py"):
        continue
      rel = Path(root, f).relative_to(package_dir).with_suffix("")
      parts = [package, *rel.parts]
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = Path(root, f)
  return out


def _nearest(name: str, modules: dict) -> str | None:
  """``name`` if it is a module, else its nearest enclosing module (``pkg.mod.func`` -> ``pkg.mod``)."""
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def _targets(node: ast.AST, module: str, modules: dict) -> list[str]:
  """The package modules an import statement in ``module`` names."""
  if isinstance(node, ast.Import):
    return [t for t in (_nearest(a.name, modules) for a in node.names) if t]
  if node.level:  # relative: resolved against the importing module's package
    here = module.split(".") if modules[module].name == "__init__.py" else module.split(".")[:-1]
    here = here[:len(here) - (node.level - 1)]
    base = ".".join(here + ([node.module] if node.module else []))
  else:
    base = node.module or ""
  # ``from pkg import mod`` names the module ``pkg.mod``; ``from mod import name`` names ``mod``
  out = [_nearest(base if a.name == "*" else f"{base}.{a.name}", modules) for a in node.names]
  return [t for t in out if t]


def import_graph(package_dir: Path, package: str) -> tuple[dict, list]:
  """``(edges, local)``: ``edges[module] = {imported module: (file, line)}`` over all imports of the
  package's own modules, and ``local`` the ``(module, imported, file, line)`` of those made inside a
  function."""
  modules = find_modules(package_dir, package)
  edges: dict[str, dict[str, tuple]] = {m: {} for m in modules}
  local = []

  def visit(node, module, path, in_function):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        for t in _targets(child, module, modules):
          if t == module:
            continue
          edges[module].setdefault(t, (path, child.lineno))
          if in_function:
            local.append((module, t, path, child.lineno))
      visit(child, module, path, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                   ast.Lambda)))

  for module, path in modules.items():
    visit(ast.parse(path.read_text(), str(path)), module, path, False)
  return edges, local


def layer_of(module: str, package: str, layers) -> int | None:
  """The index of the layer that places ``module`` (its longest listed name), or None."""
  rel = module[len(package) + 1:] if module != package else package
  placed = {name: i for i, (_, names) in enumerate(layers) for name in names}
  while rel:
    if rel in placed:
      return placed[rel]
    rel = rel.rpartition(".")[0]
  return None


def cycles(edges: dict) -> list[tuple[list[str], list[str]]]:
  """``(circle [a, b, ..., a], its component's modules)`` per strongly connected component of more than one
  module (Tarjan); the circle is a shortest one through the component's first module."""
  index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = set()
      while True:
        w = stack.pop()
        on.discard(w)
        comp.add(w)
        if w == v:
          break
      if len(comp) > 1:
        comps.append(comp)

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for v in sorted(edges):
    if v not in index:
      strong(v)
  out = []
  for comp in comps:  # a shortest way back to the component's first module, for the message
    start = min(comp)
    paths, queue = {start: [start]}, [start]
    while queue:
      v = queue.pop(0)
      for w in sorted(edges[v]):
        if w == start:
          queue = []
          out.append((paths[v] + [start], sorted(comp)))
          break
        if w in comp and w not in paths:
          paths[w] = paths[v] + [w]
          queue.append(w)
  return out


def problems(package_dir: Path = PACKAGE_DIR, package: str = PACKAGE, layers=None) -> list[str]:
  """Every violation, one line each: a module no layer places, an import circle, an upward import, an
  import of the package's own modules inside a function, a layer name that matches no module."""
  layers = LAYERS if layers is None else layers
  edges, local = import_graph(Path(package_dir), package)
  out = []
  for m in sorted(edges):
    if layer_of(m, package, layers) is None:
      out.append(f"{m} is in no layer: add it to LAYERS in tests/test_layers.py")
  for circle, comp in cycles(edges):
    out.append("import circle: " + " -> ".join(circle) + (f" (one of the circles among {', '.join(comp)})"
                                                          if len(comp) > len(circle) - 1 else ""))
  for m in sorted(edges):
    lm = layer_of(m, package, layers)
    for t, (path, line) in sorted(edges[m].items()):
      lt = layer_of(t, package, layers)
      if lm is not None and lt is not None and lt > lm:
        out.append(f"upward import {m} -> {t} ({path}:{line}): layer {lm} ({layers[lm][0]}) imports layer "
                   f"{lt} ({layers[lt][0]})")
  for m, t, path, line in sorted(local):
    out.append(f"function-local import {m} -> {t} ({path}:{line}): import it at the top of the module (only "
               "other packages' heavy or optional imports may wait for their use)")
  names = {m[len(package) + 1:] if m != package else package for m in edges}
  for _, listed in layers:
    for name in listed:
      if not any(n == name or n.startswith(name + ".") for n in names):
        out.append(f"LAYERS names {name!r}, which is no module of {package}")
  return out


# --- the package ------------------------------------------------------------------------------------------


def test_every_module_has_a_layer_and_every_layer_name_a_module():
  found = [p for p in problems() if " is in no layer" in p or "LAYERS names" in p]
  assert not found, "\n".join(found)


def test_no_import_circle():
  found = [p for p in problems() if p.startswith("import circle")]
  assert not found, "\n".join(found)


def test_no_upward_import():
  found = [p for p in problems() if p.startswith("upward import")]
  assert not found, "\n".join(found)


def test_no_function_local_import_of_the_package():
  found = [p for p in problems() if p.startswith("function-local import")]
  assert not found, "\n".join(found)


def test_the_graph_sees_the_known_edges():
  edges, _ = import_graph(PACKAGE_DIR, PACKAGE)
  assert "softlm_jax.registry" in edges["softlm_jax.config"]  # from softlm_jax import registry
  assert "softlm_jax.linalg" in edges["softlm_jax.svd"]  # from softlm_jax.linalg import ...
  assert "softlm_jax.run" in edges["softlm_jax.cli.train"]  # from softlm_jax import run as pipeline
  assert "softlm_jax" in edges["softlm_jax.cli.export"]  # import softlm_jax as sl
  assert "softlm_jax.models.hf" in edges["softlm_jax.models.mamba"]  # from softlm_jax.models import family, hf


# --- the checker on a synthetic package: it can fail ------------------------------------------------------


def _write(root: Path, files: dict) -> Path:
  for rel, text in files.items():
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
  return root


TOY_LAYERS = [("low", ("base", "sub")), ("high", ("top", "toy"))]


def test_checker_reports_an_upward_edge_a_circle_and_a_local_import(tmp_path):
  pkg = _write(tmp_path / "toy", {
      "__init__.py": "from toy import top\n",
      "base.py": "import os\nfrom toy.top import thing\n",  # low -> high
      "top.py": "from toy import base\nthing = 1\n",  # and back: a circle
      "sub/__init__.py": "",
      "sub/a.py": "from . import b\n\ndef f():\n  from ..top import thing\n  import json\n  return thing\n",
      "sub/b.py": "x = 1\n",
  })
  found = problems(pkg, "toy", TOY_LAYERS)
  assert "upward import toy.base -> toy.top" in "\n".join(found)
  assert any(p.startswith("upward import toy.base -> toy.top") and "layer 0 (low) imports layer 1 (high)" in p
             for p in found), found
  assert any(p.startswith("upward import toy.sub.a -> toy.top") for p in found), found  # relative, ..top
  assert "import circle: toy.base -> toy.top -> toy.base" in found, found
  assert cycles(import_graph(pkg, "toy")[0]) == [(["toy.base", "toy.top", "toy.base"], ["toy.base", "toy.top"])]
  assert any(p.startswith("function-local import toy.sub.a -> toy.top") for p in found), found
  assert len(found) == 4, found  # nothing about os, json (other packages) or sub.a -> sub.b (same layer)
  edges, local = import_graph(pkg, "toy")
  assert {m: set(e) for m, e in edges.items()} == {
      "toy": {"toy.top"}, "toy.base": {"toy.top"}, "toy.top": {"toy.base"}, "toy.sub": set(),
      "toy.sub.a": {"toy.sub.b", "toy.top"}, "toy.sub.b": set()}
  assert [(m, t) for m, t, _, _ in local] == [("toy.sub.a", "toy.top")]


def test_checker_reports_unplaced_modules_and_stale_names(tmp_path):
  pkg = _write(tmp_path / "toy", {"__init__.py": "", "base.py": "", "stray.py": "import toy.base\n", "top.py": ""})
  found = problems(pkg, "toy", TOY_LAYERS)
  assert "toy.stray is in no layer: add it to LAYERS in tests/test_layers.py" in found
  assert "LAYERS names 'sub', which is no module of toy" in found
  assert problems(pkg, "toy", [("low", ("base", "stray", "toy")), ("high", ("top",))]) == []


if __name__ == "__main__":
  print("\n".join(problems()))
