"""The error types that the command line turns into one line `error: ...` (or `stopped: ...`) and
an exit status, never a traceback."""


class UserError(Exception):
  """A problem the user can fix (bad file, missing model, bad flag): reported in one line, exit 2."""


class BitstreamError(UserError):
  """A compressed file that is not ours, truncated, corrupted, or made by another model."""


class DecodeTimeout(BitstreamError):
  """Entropy decoding of a crafted file that did not finish in time. Its thread cannot be stopped,
  so a command line program reports it and exits at once."""


class Interrupted(Exception):
  """Training stopped by a signal after saving a checkpoint; the program exits with 128 + signal."""

  def __init__(self, message, signum):
    super().__init__(message)
    self.exit_status = 128 + signum
