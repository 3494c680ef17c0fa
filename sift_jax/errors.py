"""The error type of bad user input (configs, flags, data files, workdirs)."""


class UserError(Exception):
  """An error in the user's input: main prints its message as one line and exits 2."""
