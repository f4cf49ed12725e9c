"""The one exception type for a user's mistake (a bad argument, an unusable file or folder).

The CLI prints it as one line, `dsi-jax <command>: error: <what> (<where>)`, and exits with 2;
anything else is a bug and stays a traceback.
"""

from __future__ import annotations

import errno
import os
import tempfile

# What a disk says when it cannot take a write, as errno codes and as libraries word it.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EDQUOT}
_WRITE_PHRASES = (
  "No space left",
  "File too large",
  "Read-only file system",
  "Permission denied",
  "Disk quota exceeded",
)


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


def write_failure(error: BaseException) -> str | None:
  """The disk's reason if `error` (or an error it was raised from) is a failed write: a full,
  read-only or quota-limited disk, a file over its size limit, a folder not writable; else
  None (a bug, which stays a traceback)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
      return error.strerror or os.strerror(error.errno)
    for phrase in _WRITE_PHRASES:
      if phrase in str(error):
        return phrase
    error = error.__cause__ or error.__context__
  return None
