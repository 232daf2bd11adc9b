"""The package layout's import rules, read from the source of every module (no imports run).

Arrows that must never exist (DESIGN.md): model/ -> anything in r1jax outside model/;
rollout/ -> train/ or run/; train/ -> run/; verify/ -> model code (or JAX); data/ and
tasks/ -> the model, rollout, training or run code; sharding -> rollout, train or run;
pallas_kernels/ -> r1jax; and no import circle, function-level imports included.
"""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (module prefix, forbidden import prefixes)
FORBIDDEN = [
    ("r1jax.model", ("r1jax.",), ("r1jax.model",)),
    ("r1jax.rollout", ("r1jax.train", "r1jax.run"), ()),
    ("r1jax.train", ("r1jax.run",), ()),
    ("r1jax.verify", ("r1jax.model", "r1jax.rollout", "r1jax.train", "r1jax.run",
                      "r1jax.sharding", "r1jax.data", "jax", "flax", "optax"), ()),
    ("r1jax.data", ("r1jax.model", "r1jax.rollout", "r1jax.train", "r1jax.run"), ()),
    ("r1jax.tasks", ("r1jax.model", "r1jax.rollout", "r1jax.train", "r1jax.run"), ()),
    ("r1jax.sharding", ("r1jax.rollout", "r1jax.train", "r1jax.run"), ()),
    ("pallas_kernels", ("r1jax",), ()),
]


def modules(root: str, packages=("r1jax", "pallas_kernels")) -> dict[str, str]:
  """{dotted module name: file path} of every .py file under root's packages."""
  out = {}
  for pkg in packages:
    for dirpath, _, files in os.walk(os.path.join(root, pkg)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
          out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def imports_of(name: str, path: str, known) -> set[str]:
  """Every module `name` imports (at any depth of the file), resolved to known modules
  where possible (`from pkg import mod` names the module pkg.mod)."""
  is_pkg = path.endswith("__init__.py")
  base = name if is_pkg else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      mod = node.module or ""
      if node.level:
        parts = base.split(".")[:len(base.split(".")) - node.level + 1]
        mod = ".".join(parts + ([mod] if mod else []))
      for a in node.names:
        full = f"{mod}.{a.name}"
        out.add(full if full in known else mod)
  return out


def violations(root: str) -> list[str]:
  """Every forbidden arrow and every import circle among root's modules, as messages."""
  mods = modules(root)
  graph = {}
  problems = []
  for name, path in sorted(mods.items()):
    deps = imports_of(name, path, mods)
    for prefix, forbidden, allowed in FORBIDDEN:
      if name != prefix and not name.startswith(prefix + "."):
        continue
      for dep in sorted(deps):
        if any(dep == a or dep.startswith(a + ".") for a in allowed):
          continue
        if any(dep == f.rstrip(".") or dep.startswith(f if f.endswith(".") else f + ".")
               for f in forbidden):
          problems.append(f"{name} imports {dep} ({prefix} must not import {', '.join(forbidden)})")
    # edges to modules (packages' __init__ re-exports are not edges of the graph)
    graph[name] = {d for d in deps if d in mods and d != name
                   and not mods[d].endswith("__init__.py")}
  state, stack = {}, []

  def visit(u):
    state[u] = 1
    stack.append(u)
    for v in sorted(graph.get(u, ())):
      if state.get(v) == 1:
        problems.append("import circle: " + " -> ".join(stack[stack.index(v):] + [v]))
      elif not state.get(v):
        visit(v)
    stack.pop()
    state[u] = 2

  for u in sorted(graph):
    if not state.get(u):
      visit(u)
  return problems


def test_the_repository_keeps_the_import_rules():
  assert violations(REPO) == []


def _tree(tmp_path, files: dict):
  for rel, text in files.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return str(tmp_path)


@pytest.mark.parametrize("files,expected", [
    ({"r1jax/model/mla.py": "from r1jax.train import optim\n", "r1jax/train/optim.py": ""},
     "r1jax.model.mla imports r1jax.train.optim"),
    ({"r1jax/model/mla.py": "def f():\n  from r1jax import sharding\n", "r1jax/sharding.py": ""},
     "r1jax.model.mla imports r1jax.sharding"),
    ({"r1jax/rollout/sampler.py": "from r1jax.run import experiment\n", "r1jax/run/experiment.py": ""},
     "r1jax.rollout.sampler imports r1jax.run.experiment"),
    ({"r1jax/train/rl.py": "from ..run import pipeline\n", "r1jax/run/pipeline.py": ""},
     "r1jax.train.rl imports r1jax.run.pipeline"),
    ({"r1jax/verify/math.py": "import jax.numpy as jnp\n"}, "r1jax.verify.math imports jax.numpy"),
    ({"pallas_kernels/gmm.py": "from r1jax.model import moe\n", "r1jax/model/moe.py": ""},
     "pallas_kernels.gmm imports r1jax.model.moe"),
    ({"r1jax/train/a.py": "from r1jax.train import b\n",
      "r1jax/train/b.py": "def f():\n  from r1jax.train import a\n"},
     "import circle: r1jax.train.a -> r1jax.train.b -> r1jax.train.a"),
])
def test_a_forbidden_import_is_reported(tmp_path, files, expected):
  found = violations(_tree(tmp_path, files))
  assert any(expected in p for p in found), found


def test_allowed_imports_are_not_reported(tmp_path):
  root = _tree(tmp_path, {
      "r1jax/model/mla.py": "from r1jax.model import rope\nimport jax\n",
      "r1jax/model/rope.py": "import numpy\n",
      "r1jax/rollout/sampler.py": "from r1jax.model import mla\nfrom r1jax import sharding\n",
      "r1jax/sharding.py": "from r1jax.model import mla\n",
      "r1jax/run/pipeline.py": "from r1jax.train import rl\n",
      "r1jax/train/rl.py": "from r1jax.rollout import sampler\n"})
  assert violations(root) == []
