"""`python -m sift_jax.config_keys [--config=<file>.py[:arg]]`: every config key, its value, its meaning.

The meanings are the comments beside the keys in `config_lib.base_config` (one source: the
defaults and what they mean are written once, together); a key with no comment of its own is
described by the comment lines just above it. Without --config the values are base_config's
defaults; with it, that config's values, and the keys a config file adds (a model's own keys)
are listed with the model that reads them.
"""

from __future__ import annotations

import ast
import inspect
import io
import sys
import textwrap
import tokenize
from typing import Any

import ml_collections

from sift_jax import config_lib


def _dotted(node: ast.expr) -> str | None:
  """'model.name' for the target `c.model.name`; None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return '.'.join(reversed(parts)) if isinstance(node, ast.Name) and parts else None


def descriptions() -> dict[str, str]:
  """{dotted key: meaning} from the comments of config_lib.base_config, leaves and groups."""
  source = textwrap.dedent(inspect.getsource(config_lib.base_config))
  comments: dict[int, str] = {}  # line -> comment text
  code_lines = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip('#').strip()
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
      code_lines.add(tok.start[0])
  out = {}
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    key = _dotted(node.targets[0])
    if key is None:
      continue
    inline = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
    above, line = [], node.lineno - 1
    while line in comments and line not in code_lines:  # a block of whole-line comments
      above.insert(0, comments[line])
      line -= 1
    if inline or above:
      out[key] = ' '.join(inline or above)
  return out


def rows(config: ml_collections.ConfigDict) -> list[tuple[str, Any, str]]:
  """(key, value, meaning) for every leaf key of config, in config order."""
  meaning = descriptions()
  out = []
  for key, value in config_lib.flatten(config).items():
    text = meaning.get(key)
    if text is None and key.startswith('model.'):
      text = f'a key of model {config.model.name!r} (sift_jax/models: register_model)'
    out.append((key, value, text or ''))
  return out


def table(config: ml_collections.ConfigDict) -> str:
  """One line per key: `key = value  # meaning`, values aligned."""
  lines = [(f'{k} = {v!r}', m) for k, v, m in rows(config)]
  width = max(len(a) for a, _ in lines)
  return '\n'.join(f'{a:{width}}  # {m}' if m else a for a, m in lines)


def main(argv: list[str]) -> None:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config if 'config' in flags.FLAGS else config_lib.base_config()
  print(table(config))


if __name__ == '__main__':
  from absl import app

  _argv = sys.argv
  if any(a == '--config' or a.startswith('--config=') for a in _argv):
    _argv = config_lib.define_config_flag(_argv)[1]
  app.run(main, argv=_argv)
