"""Finding seqio tasks and mixtures by name (t5x's `MIXTURE_OR_TASK_MODULE`).

t5x gin files name a python module that registers seqio Tasks when imported
(`MIXTURE_OR_TASK_MODULE = "my_project.tasks"`) and a task or mixture name
(`MIXTURE_OR_TASK_NAME`). `import_task_module` imports the former with a
one-line error; `get_task_or_mixture` looks the latter up, naming close matches
when it is unknown. No tensors here, so no einsum letters are used.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Optional, Sequence, Union

import gin


class TaskModuleError(ValueError):
  """The task module named in gin cannot be imported."""


class UnknownTaskError(ValueError):
  """No seqio Task or Mixture has the requested name."""


@gin.configurable(module="phatgoose_jax.data")
def import_task_module(name: Optional[Union[str, Sequence[str]]]) -> list[str]:
  """Imports module(s) that register seqio tasks; None or "" imports nothing.

  Returns:
    The imported module names.

  Raises:
    TaskModuleError: naming the module (MIXTURE_OR_TASK_MODULE) that is missing
      or that raised while registering.
  """
  if not name:
    return []
  names = [name] if isinstance(name, str) else list(name)
  done = []
  for mod in names:
    try:
      importlib.import_module(mod)
    except ModuleNotFoundError as e:
      if e.name and (mod == e.name or mod.startswith(e.name + ".")):
        raise TaskModuleError(
            f"MIXTURE_OR_TASK_MODULE: no module named {mod!r} (is it on "
            "PYTHONPATH?)") from e
      raise TaskModuleError(
          f"MIXTURE_OR_TASK_MODULE {mod!r} failed to import: missing module "
          f"{e.name!r}") from e
    except Exception as e:  # Registration errors inside the user module.
      raise TaskModuleError(
          f"MIXTURE_OR_TASK_MODULE {mod!r} raised while importing: "
          f"{type(e).__name__}: {e}") from e
    done.append(mod)
  return done


def registered_names() -> list[str]:
  """All registered seqio task and mixture names, sorted."""
  import seqio  # pylint: disable=g-import-not-at-top
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_task_or_mixture(name: str):
  """Returns the seqio Task or Mixture `name`.

  Raises:
    UnknownTaskError: naming `name` and listing up to 5 close registered names.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  if not isinstance(name, str) or not name:
    raise UnknownTaskError(f"task/mixture name must be a non-empty string, got {name!r}")
  if name in seqio.MixtureRegistry.names():
    return seqio.get_mixture_or_task(name)
  if name in seqio.TaskRegistry.names():
    return seqio.get_mixture_or_task(name)
  names = registered_names()
  close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
  hint = (f"; did you mean {', '.join(repr(c) for c in close)}?" if close
          else f"; {len(names)} names are registered (did MIXTURE_OR_TASK_MODULE "
               "import the module that registers it?)")
  raise UnknownTaskError(f"unknown seqio task or mixture {name!r}{hint}")


# Decoding budgets of generative tasks (steps), set where a task is registered (e.g. BIG-bench's
# per-task ``max_gen_length``) and read by `evaluation.run_seqio_evaluation`.
_DECODE_LENGTHS: dict = {}


def set_decode_length(task_name: str, steps: Optional[int]) -> None:
  """Records (or with None clears) the greedy-decoding budget of ``task_name``."""
  if steps is None:
    _DECODE_LENGTHS.pop(task_name, None)
    return
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"set_decode_length({task_name!r}): steps must be a positive int, got "
                     f"{steps!r}")
  _DECODE_LENGTHS[task_name] = steps


def decode_length(task_name: str) -> Optional[int]:
  """The task's recorded decoding budget, or None (decode the targets length)."""
  return _DECODE_LENGTHS.get(task_name)
