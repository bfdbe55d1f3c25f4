"""The one error type that the command line turns into `error: ...` and exit status 2."""


class UserError(Exception):
  """A problem the user can fix (bad file, missing model, bad flag): reported in one line, no traceback."""


class BitstreamError(UserError):
  """A compressed file that is not ours, truncated, corrupted, or made by another model."""
