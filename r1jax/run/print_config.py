"""`print_config` mode: every field of a config with its value and its comment.

The comment of a field is the `# ...` comment on the line of the defaults' source that sets it
(experiment.base_config and the `*_defaults()` functions it calls, followed through their
own calls), with the comment lines right below it at the same column as its continuation.
Fields print as their command-line names (`grpo.optimizer.lr`), the leaves of a sub-config
before its sub-configs, each group sorted by name, so the order is stable.
"""
from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize

import ml_collections

from r1jax.run import experiment


def _comments_by_line(source: str) -> dict[int, tuple[int, str, bool]]:
  """line -> (column, comment text, whether the line holds only the comment)."""
  out = {}
  code_lines = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      out[tok.start[0]] = (tok.start[1], tok.string[1:].strip())
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  return {line: (col, text, line not in code_lines) for line, (col, text) in out.items()}


def _target_path(node) -> tuple[str, list[str]] | None:
  """('c', ['sft', 'seq_len']) for the assignment target `c.sft.seq_len`, else None."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name) or not parts:
    return None
  return node.id, parts[::-1]


def _called_function(call, fn):
  """The function a call like `sft.sft_defaults()` names, looked up in fn's globals."""
  if not isinstance(call, ast.Call) or call.args or call.keywords:
    return None
  node, names = call.func, []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  obj = fn.__globals__.get(node.id)
  for name in reversed(names):
    obj = getattr(obj, name, None)
  return obj if inspect.isfunction(obj) else None


def field_comments(fn=experiment.base_config, prefix: str = "") -> dict[str, str]:
  """Dotted field name -> comment, from the source of `fn` (a function that builds a
  ConfigDict in a local and returns it) and of the defaults functions it assigns."""
  source = textwrap.dedent(inspect.getsource(fn))
  comments = _comments_by_line(source)
  out: dict[str, str] = {}
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    target = _target_path(node.targets[0])
    if target is None:
      continue
    name = prefix + ".".join(target[1])
    sub = _called_function(node.value, fn)
    if sub is not None:
      for k, v in field_comments(sub, name + ".").items():
        out.setdefault(k, v)
    line = node.lineno if node.lineno in comments else node.end_lineno
    if line not in comments or comments[line][2]:
      continue
    col, text, _ = comments[line]
    more = line + 1
    while more in comments and comments[more][2] and comments[more][0] == col:
      text += " " + comments[more][1]
      more += 1
    out[name] = text  # the caller's comment on `c.x = f()`-style lines wins over f's own
  return out


def lines(cfg, comments: dict[str, str] | None = None) -> list[str]:
  """`name = value  # comment` for every field of cfg, in tree order (module docstring)."""
  comments = field_comments() if comments is None else comments
  rows = []

  def walk(node, prefix):
    keys = sorted(node.keys())
    subs = [k for k in keys if isinstance(node[k], ml_collections.ConfigDict)]
    for k in keys:
      if k not in subs:
        rows.append((prefix + k, repr(node[k])))
    for k in subs:
      walk(node[k], f"{prefix}{k}.")

  walk(cfg, "")
  width = max((len(n) + len(v) + 3 for n, v in rows), default=0)
  out = []
  for name, value in rows:
    text = f"{name} = {value}"
    note = comments.get(name)
    out.append(f"{text:<{width}}  # {note}" if note else text)
  return out


def run(cfg, workdir: str | None = None) -> str:
  """Prints every field of cfg (see `lines`); workdir is unused."""
  del workdir
  text = "\n".join(lines(cfg))
  print(text)
  return text
