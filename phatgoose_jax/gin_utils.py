"""Gin flag parsing shared by the entry points (t5x conventions, one-line errors).

Accepted flags (t5x's spelling):
  --gin_file=PATH             repeatable; resolved against ``--gin_search_paths`` (default: the
                              repository's ``gin/`` folder), so ``runs/train_expert.gin`` works;
  --gin.NAME=VALUE            one binding, e.g. ``--gin.MODEL_DIR="'/tmp/run'"`` or
                              ``--gin.train.batch_size=32`` (the value is a gin/Python literal);
  --gin_bindings=BINDING      repeatable, a full binding string;
  --gin_search_paths=A,B      comma-separated folders searched for gin files and includes.

Gin files may declare required macros with ``NAME = %gin.REQUIRED``; `parse_gin` reports the first
one left unset as ``required gin macro NAME is not set``, and a ``%NAME`` reference to a macro that
no file or flag defines (e.g. ``INITIAL_CHECKPOINT_PATH`` without a model preset that sets it) as
``gin macro NAME is not defined``. Every configuration problem raises
`GinConfigError` (a ValueError) with a one-line message; `run_main` prints it and exits with 2.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import gin

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


class GinConfigError(ValueError):
  """A gin file, binding or required macro problem (one line, names the culprit)."""


def one_line(error: BaseException) -> str:
  """Collapses a (multi-line) gin error message to one line (gin's call-site suffixes dropped)."""
  from phatgoose_jax.errors import clean_message  # pylint: disable=g-import-not-at-top
  return clean_message(error)


def split_flags(argv: Sequence[str]) -> Tuple[List[str], List[str], List[str], List[str]]:
  """argv -> (gin files, gin bindings, search paths, remaining args)."""
  files, bindings, paths, rest = [], [], [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--") and "=" not in arg and i + 1 < len(args) and (
        arg in ("--gin_file", "--gin_bindings", "--gin_search_paths") or arg.startswith("--gin.")):
      arg = f"{arg}={args[i + 1]}"
      i += 1
    i += 1
    if arg.startswith("--gin_file="):
      files.append(arg.split("=", 1)[1])
    elif arg.startswith("--gin_bindings="):
      bindings.append(arg.split("=", 1)[1])
    elif arg.startswith("--gin_search_paths="):
      paths.extend(p for p in arg.split("=", 1)[1].split(",") if p)
    elif arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep or not name:
        raise GinConfigError(f"flag {arg!r} must look like --gin.NAME=VALUE")
      bindings.append(f"{name}={value}")
    else:
      rest.append(arg)
  return files, bindings, paths, rest


def required_macros_unset() -> List[str]:
  """Names of macros still bound to ``%gin.REQUIRED`` in the parsed config."""
  missing = []
  for (scope, selector), values in gin.config._CONFIG.items():  # pylint: disable=protected-access
    if selector == "gin.macro" and repr(values.get("value")) == "%gin.REQUIRED":
      missing.append(scope)
  return sorted(missing)


# Every module that declares gin configurables, except the entry points (phatgoose_jax.train and
# phatgoose_jax.eval run as __main__ and must not be imported twice). `parse_gin` imports them
# before it finalizes the config: a module imported lazily later (e.g. the P3 / FLAN readers import
# `data.sources` when they first read a file) would otherwise register a configurable into the
# locked config ("Attempted to add a new configurable after the config was locked").
# tests/test_gin_modules.py checks that the list names every such module.
CONFIGURABLE_MODULES = (
    "phatgoose_jax.adapters.factory", "phatgoose_jax.data.bigbench_tasks",
    "phatgoose_jax.data.flan_tasks", "phatgoose_jax.data.p3_tasks",
    "phatgoose_jax.data.pipeline", "phatgoose_jax.data.registry",
    "phatgoose_jax.data.sources", "phatgoose_jax.data.synthetic",
    "phatgoose_jax.data.t0_tasks", "phatgoose_jax.data.vocab",
    "phatgoose_jax.methods.average_activation", "phatgoose_jax.methods.dfwe",
    "phatgoose_jax.methods.oracle", "phatgoose_jax.methods.polytropon",
    "phatgoose_jax.methods.retrieval", "phatgoose_jax.methods.task_moe",
    "phatgoose_jax.models.config", "phatgoose_jax.training.optimizer",
    "phatgoose_jax.training.partitioning",
)


def import_configurable_modules() -> None:
  """Imports `CONFIGURABLE_MODULES` (`data.sources` imports seqio, hence TensorFlow: its C++
  start-up lines are silenced first)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from phatgoose_jax import errors  # pylint: disable=g-import-not-at-top
  errors.quiet_tensorflow_import()
  for name in CONFIGURABLE_MODULES:
    importlib.import_module(name)


def _macro_references(value, found: List[str]) -> None:
  """Appends the names of the ``%NAME`` macro references inside a bound value (nested too)."""
  if isinstance(value, gin.config.ConfigurableReference):
    selector = value.scoped_selector
    if selector.endswith("/gin.macro"):
      found.append(selector[:-len("/gin.macro")])
  elif isinstance(value, (list, tuple, set)):
    for item in value:
      _macro_references(item, found)
  elif isinstance(value, dict):
    for item in value.values():
      _macro_references(item, found)


def undefined_macros() -> List[str]:
  """Names of macros that a configurable binding uses (directly, or through other macros) as
  ``%NAME`` but that no file or flag defines. A macro only another unused macro refers to (e.g.
  ``CHECKPOINT_PATH = %INITIAL_CHECKPOINT_PATH`` once the evaluate binding is overridden) is not
  reported: gin never evaluates it."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  macros = {scope: values.get("value") for (scope, selector), values in config.items()
            if selector == "gin.macro"}
  pending: List[str] = []
  for (_, selector), values in config.items():
    if selector != "gin.macro":
      for value in values.values():
        _macro_references(value, pending)
  seen, missing = set(), set()
  while pending:
    name = pending.pop()
    if name in seen:
      continue
    seen.add(name)
    if name in macros:
      _macro_references(macros[name], pending)
    else:
      missing.add(name)
  return sorted(missing)


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str] = (),
              search_paths: Sequence[str] = (), finalize: bool = True) -> None:
  """Parses gin files then bindings (bindings override), checking required macros.

  Raises:
    GinConfigError: unreadable/unknown file, unknown configurable or parameter, syntax error,
      a required macro left unset, or a referenced macro that is never defined (its name in the
      message).
  """
  for path in list(search_paths) + [REPO_GIN_DIR, os.getcwd()]:
    if os.path.isdir(path) and path not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
      gin.add_config_file_search_path(path)
  if not gin_files:
    raise GinConfigError("no --gin_file given (e.g. --gin_file=runs/train_expert.gin)")
  # gin logs "Path not found" (level ERROR) for every search-path prefix it tries before the one
  # that holds an included file; a missing file still raises below, so silence those logs.
  previous = logging.root.manager.disable
  logging.disable(logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
  except (IOError, OSError) as e:
    raise GinConfigError(f"gin file not found: {one_line(e)}") from None
  except (ValueError, SyntaxError, TypeError, KeyError) as e:
    loc = next((a for a in getattr(e, "args", ())[1:] if hasattr(a, "line_content")), None)
    line = getattr(loc, "line_content", None)  # gin's SyntaxError: (message, Location)
    where = f" in {line.strip()!r}" if line and line.strip() else ""
    hint = (" (string values need inner quotes: --gin.NAME=\"'value'\")"
            if where and "parse value" in str(e) else "")
    raise GinConfigError(one_line(e) + where + hint) from None
  finally:
    logging.disable(previous)
  missing = required_macros_unset()
  if missing:
    raise GinConfigError(f"required gin macro {missing[0]} is not set (pass "
                         f"--gin.{missing[0]}=...)" + (f"; also unset: {', '.join(missing[1:])}"
                                                       if len(missing) > 1 else ""))
  undefined = undefined_macros()
  if undefined:
    raise GinConfigError(f"gin macro {undefined[0]} is not defined (pass --gin.{undefined[0]}=... "
                         "or a gin file that sets it)" + (
                             f"; also undefined: {', '.join(undefined[1:])}"
                             if len(undefined) > 1 else ""))
  if finalize:
    import_configurable_modules()
    gin.finalize()


def run_main(main_fn: Callable[[List[str]], int], argv: Optional[Sequence[str]] = None) -> None:
  """Calls ``main_fn(argv)``; configuration errors become one stderr line and exit code 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help") for a in argv):  # the entry point's module docstring is its usage
    module = sys.modules.get(getattr(main_fn, "__module__", ""), None)
    print(((module.__doc__ if module is not None else None) or "").strip() or
          "usage: --gin_file=FILE ... --gin.NAME=VALUE ...")
    sys.exit(0)
  try:
    code = main_fn(argv)
  except GinConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except ValueError as e:  # Our configuration checks (ValueError subclasses) name the culprit.
    print(f"error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # a path that cannot be read or written (names the file)
    print(f"error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # Ctrl-C before the training loop took over SIGINT
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)
