"""The one exception type for a user's mistake (a bad argument, an unusable file or folder).

The CLI prints it as one line, `dsi-jax <command>: error: <what> (<where>)`, and exits with 2;
anything else is a bug and stays a traceback.
"""

from __future__ import annotations

import os
import tempfile


class UserError(Exception):
  """Something the user can fix; the message says what and where, in one line."""


def writable_folder(path: str, what: str = "output folder") -> str:
  """Creates `path` if needed and checks a file can be written there; returns it.

  Raises UserError (nothing written) where `path` is a file, or not creatable or writable.
  """
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{path}: the {what} is a file, not a folder")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
      pass
  except OSError as e:
    raise UserError(f"{path}: cannot write to the {what} ({e.strerror or e})") from None
  return path
