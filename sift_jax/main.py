"""Entry point: `python -m sift_jax.main --config=configs/<file>.py[:arg] [--workdir=DIR]`.

Any config key can be overridden on the command line, e.g. `--config.optim.lr=0.05`.
`configs/<file>.py` loads from any working directory (the configs ship with the package).
With `--workdir=DIR` of an earlier run and no --config, the run's own DIR/config.json is used:
`--mode=eval --workdir=DIR` evaluates it, `--workdir=DIR` alone resumes it (run-length keys such
as --config.total_steps may still be overridden).
"""

from __future__ import annotations

import datetime
import os
import sys

from absl import app, flags, logging

from sift_jax import config_lib, errors, plugins, train

_WORKDIR = flags.DEFINE_string(
  'workdir',
  None,
  'Run folder; rerunning with the same folder resumes. Default: a new runs/<name>. '
  'Without --config, the config is read from DIR/config.json.',
)
_MODE = flags.DEFINE_enum(
  'mode', 'train', train.MODES, 'train, or eval: evaluate the latest checkpoint of --workdir.'
)
flags.DEFINE_multi_string(
  'import',
  [],
  'Module to import before the config is read (registers models, rules, members); repeatable. '
  f'Recorded in the workdir ({plugins.IMPORTS_FILE}) for --mode=eval and resuming.',
)
# Set by `run` (config_lib.define_config_flag): the --config value as given.
_CONFIG_SPEC = ''
# Set by `run`: the --import modules, recorded in the workdir.
_IMPORTS: list[str] = []


def default_workdir(config_arg: str) -> str:
  """runs/<config name>[_<arg>]_<UTC time>: a fresh folder for a run given no --workdir."""
  path, _, arg = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += '_' + arg.replace(',', '_').replace('=', '-')
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{name}_{stamp}')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = default_workdir(_CONFIG_SPEC)
    print(f'workdir: {workdir}', flush=True)
  if not flags.FLAGS['verbosity'].present:
    # orbax and jax log every save and compile at INFO; the progress line is what people read.
    logging.set_verbosity(logging.WARNING)
  logging.info('config:\n%s', config)
  try:
    train.train_and_evaluate(config, workdir, mode=_MODE.value, imports=_IMPORTS)
  except train.Preempted as e:
    print(str(e), flush=True)
    sys.exit(0)
  except (ValueError, FileNotFoundError, errors.UserError) as e:
    config_lib.fail(str(e))


def run(argv: list[str]) -> None:
  """The command line `argv` (argv[0] the program name): defines --config from it, then runs."""
  global _CONFIG_SPEC, _IMPORTS
  try:
    _IMPORTS = plugins.load_for_command_line(argv)
  except errors.UserError as e:
    config_lib.fail(str(e))
  _CONFIG_SPEC, rest = config_lib.define_config_flag(argv, from_workdir=True)
  app.run(main, argv=rest)


if __name__ == '__main__':
  run(sys.argv)
