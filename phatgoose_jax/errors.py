"""Helpers shared by the entry points for clean, one-line failures.

* `quiet_tensorflow_import`: imports TensorFlow (and seqio) with file descriptor 2 pointed at
  /dev/null, so the C++ start-up lines that TensorFlow prints before its logging is initialised
  ("All log messages before absl::InitializeLog() ...", "Could not find cuda drivers ...") do not
  precede an entry point's one-line error. Python exceptions still propagate.
* `clean_message`: an exception's message on one line, without gin's "In call to configurable"
  suffixes.

No tensors here, so no einsum letters are used.
"""
from __future__ import annotations

import os
import re
import sys

_REPEATED_SCOPE = re.compile(r"(\s+in scope '[^']*')(?:\s+in scope '[^']*')+")
_GIN_SUFFIX = re.compile(r"\s*\|?\s*In call to configurable '[^']*' \(<[^>]*>\)")


def quiet_tensorflow_import() -> None:
  """Imports tensorflow and seqio once, silencing their C++ start-up output on stderr."""
  if "tensorflow" in sys.modules and "seqio" in sys.modules:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    import seqio  # pylint: disable=g-import-not-at-top,unused-import
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def clean_message(error: BaseException) -> str:
  """``str(error)`` on one line (' | '-joined), gin's call-site suffixes removed."""
  text = _GIN_SUFFIX.sub("", str(error))
  # gin appends "in scope 'X'" once per enclosing scope evaluation: keep the first of a run
  text = _REPEATED_SCOPE.sub(r"\1", text)
  parts = [p.strip() for p in text.strip().strip('"').splitlines() if p.strip()]
  return " | ".join(parts) if parts else type(error).__name__
