"""Errors a user can act on: the CLI prints them as one line (no traceback) and exits non-zero.

Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os

_FULL = ('the disk is full', 'free space on it')
_DENIED = ('it is not writable', 'make it writable')
_FILE = ('a regular file is where a folder must be', 'move that file away')
# errno -> (what happened, what to do) for the workdir problems a user fixes by hand.
_WRITE_ERRORS = {
  errno.ENOSPC: _FULL,
  errno.EDQUOT: ('the disk quota is exceeded', 'free space on it'),
  errno.EROFS: ('the file system is read-only', 'make it writable'),
  errno.EACCES: _DENIED,
  errno.EPERM: _DENIED,
  errno.EEXIST: _FILE,
  errno.ENOTDIR: _FILE,
}


class UserError(Exception):
  """An error whose message tells the user what is wrong and what to do."""


class WorkdirError(UserError):
  """The workdir cannot be written: read-only, a regular file, or a full disk."""


def workdir_error(e: BaseException, workdir: str | None) -> WorkdirError | None:
  """The WorkdirError an OSError in `e`'s cause chain amounts to, or None if it is not one.

  Libraries (orbax, tensorstore) re-raise write failures under their own types, so the chain
  is searched, and a message naming ENOSPC counts too. An error on a path outside `workdir`
  (a dataset file, say) is not one; workdir=None accepts any path.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    found = None
    if isinstance(e, OSError) and e.errno in _WRITE_ERRORS and _inside(e.filename, workdir):
      found = _WRITE_ERRORS[e.errno]
    elif 'No space left on device' in str(e):
      found = _FULL
    if found:
      what, todo = found
      path = getattr(e, 'filename', None) or workdir
      return WorkdirError(
        f'cannot write {path}: {what}. {todo.capitalize()} (--workdir={workdir}) or pass another '
        '--workdir; rerunning the same command resumes from the last checkpoint.'
      )
    e = e.__cause__ or e.__context__
  return None


def _inside(path: str | None, workdir: str | None) -> bool:
  if path is None or workdir is None:
    return True
  path, workdir = os.path.abspath(str(path)), os.path.abspath(workdir)
  return path == workdir or path.startswith(workdir + os.sep)
