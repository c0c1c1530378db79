"""Runs many CLI invocations in one process (no tests here): ``python cli_driver.py CASES OUT``.

CASES is a JSON list of ``{"id", "entry", "argv", "cwd"}``; ``entry`` is one of
  'cli'   -> ``phatgoose_jax.cli.main(argv)``        (the ``phatgoose-jax`` console script)
  'train' -> ``gin_utils.run_main(train.main, argv)`` (``python -m phatgoose_jax.train``)
  'eval'  -> ``phatgoose_jax.eval.main(argv)``        (``python -m phatgoose_jax.eval``)
Each call runs with file descriptors 1 and 2 redirected to files (so C-level writes from
TensorFlow / XLA are captured too), in ``cwd``, with gin cleared before and after. An exception
escaping the entry point is printed with its traceback into the captured stderr, as the
interpreter would, and recorded with exit status 1. OUT receives ``{id: {"rc", "stdout",
"stderr"}}``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import traceback


@contextlib.contextmanager
def _captured():
  """Redirects fds 1 and 2 (and sys.stdout / sys.stderr) to temporary files."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  files = tempfile.TemporaryFile(), tempfile.TemporaryFile()
  os.dup2(files[0].fileno(), 1)
  os.dup2(files[1].fileno(), 2)
  out = {}
  try:
    yield out
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])
    for key, f in zip(("stdout", "stderr"), files):
      f.seek(0)
      out[key] = f.read().decode("utf-8", "replace")
      f.close()


def _call(entry: str, argv):
  import gin  # pylint: disable=g-import-not-at-top
  if entry == "cli":
    from phatgoose_jax import cli  # pylint: disable=g-import-not-at-top
    return cli.main(list(argv))
  if entry == "train":
    from phatgoose_jax import gin_utils, train  # pylint: disable=g-import-not-at-top
    gin_utils.run_main(train.main, list(argv))
    return 0
  if entry == "eval":
    from phatgoose_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
    return eval_lib.main(list(argv))
  raise ValueError(f"unknown entry {entry!r}")
  del gin


def run_case(case) -> dict:
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  cwd = os.getcwd()
  os.chdir(case.get("cwd") or cwd)
  try:
    with _captured() as out:
      try:
        rc = _call(case["entry"], case["argv"])
      except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
        rc = 1
    return {"rc": rc, **out}
  finally:
    os.chdir(cwd)
    gin.clear_config()


def main(cases_path: str, out_path: str) -> None:
  # Python-level streams bound to fds 1 and 2 themselves, so they follow every dup2 above.
  sys.stdout = io.TextIOWrapper(io.FileIO(1, "wb", closefd=False), write_through=True)
  sys.stderr = io.TextIOWrapper(io.FileIO(2, "wb", closefd=False), write_through=True)
  with open(cases_path) as f:
    cases = json.load(f)
  results = {}
  for case in cases:
    results[case["id"]] = run_case(case)
    with open(out_path, "w") as f:  # Written after every case: partial results survive a crash.
      json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
