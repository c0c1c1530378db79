"""Permissions of files and directories written atomically through a temporary sibling.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 files and 0700 directories; renamed into place,
checkpoints, libraries and reports would be unreadable to the rest of a team's group whatever
its umask. `ordinary_mode` gives them the mode ``open`` / ``os.makedirs`` would have.
"""
from __future__ import annotations

import os


def _umask_by_swap() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


# Read once at import (single-threaded) for systems without /proc: swapping the umask while
# checkpoint threads create files could give them the wrong mode.
_IMPORT_UMASK = _umask_by_swap()


def current_umask() -> int:
  """The process umask (from /proc on Linux; elsewhere the umask at import time)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  return _IMPORT_UMASK


def ordinary_mode(path: str) -> None:
  """chmod ``path`` to 0666 (files) or 0777 (directories) minus the umask."""
  base = 0o777 if os.path.isdir(path) else 0o666
  os.chmod(path, base & ~current_umask())


__all__ = ["current_umask", "ordinary_mode"]
