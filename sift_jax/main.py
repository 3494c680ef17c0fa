"""Entry point: `python -m sift_jax.main --config=configs/<file>.py[:arg] [--workdir=DIR]`.

Any config key can be overridden on the command line, e.g. `--config.optim.lr=0.05`.
"""

from __future__ import annotations

import datetime
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sift_jax import errors, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Run folder; rerunning with the same folder resumes. Default: a new runs/<name>.'
)
_MODE = flags.DEFINE_enum(
  'mode', 'train', train.MODES, 'train, or eval: evaluate the latest checkpoint of --workdir.'
)
flags.mark_flags_as_required(['config'])


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
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = default_workdir(config_flags.get_config_filename(flags.FLAGS['config']))
    print(f'workdir: {workdir}', flush=True)
  if not flags.FLAGS['verbosity'].present:
    # orbax and jax log every save and compile at INFO; the progress line is what people read.
    logging.set_verbosity(logging.WARNING)
  logging.info('config:\n%s', _CONFIG.value)
  try:
    train.train_and_evaluate(_CONFIG.value, workdir, mode=_MODE.value)
  except train.Preempted as e:
    print(str(e), flush=True)
    sys.exit(0)
  except (ValueError, FileNotFoundError, errors.UserError) as e:
    # Bad input: one clear line, no traceback, non-zero exit.
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
