"""Keep XLA:CPU's large buffers on the malloc heap instead of fresh mmap regions (glibc only).

XLA:CPU takes its buffers from ``malloc``. glibc serves requests above its mmap threshold
(dynamic, at most 32 MB on 64-bit Linux, and ``M_MMAP_THRESHOLD`` cannot be raised past that)
with a fresh ``mmap`` and unmaps them on ``free``, so a jitted program that needs a > 32 MB
buffer page-faults on every 4 KB page it touches, on every call. On the 2-core development
machine (docs/benchmarks.md) writing a 64 MB array cost 25 ms instead of ~4 ms, and the CPU
``sorted`` routed-LoRA path of one T5-base site at T=4096, E=166 measured 19.6 ms with the
default allocator and 15.7 ms with `keep_buffers_on_heap` (its ``lax.cond`` fallback's buffers
no longer fault when they are not used).

`keep_buffers_on_heap` sets ``M_MMAP_MAX = 0`` (no mmap-ed chunks: every buffer comes from the
heap and is reused after ``free``) and raises ``M_TRIM_THRESHOLD`` (freed memory at the top of
the heap is kept instead of returned to the OS and faulted in again). The price is that the
process keeps its peak heap size (as with tcmalloc or jemalloc, the allocators often
``LD_PRELOAD``-ed for the same reason). It affects the whole process, so it is opt-in: call it
once at start-up, or set ``PHATGOOSE_JAX_MALLOC=heap`` for the ``phatgoose-jax`` CLI,
``python -m phatgoose_jax.train`` / ``.eval`` (`configure_from_env`). The benchmark script takes
``--malloc heap|system``. On non-glibc platforms nothing changes and False is returned.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Keep up to 1 GiB of freed memory at the top of the heap instead of trimming it.
_TRIM_THRESHOLD_BYTES = 1 << 30

ENV_VAR = "PHATGOOSE_JAX_MALLOC"
MODES = ("system", "heap")

_state = {"mode": "system"}


def _glibc():
  """The process's glibc handle, or None where ``mallopt`` is not glibc's."""
  if platform.system() != "Linux":
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    return libc
  except (OSError, AttributeError):
    return None


def keep_buffers_on_heap() -> bool:
  """Serve every allocation from the heap and keep freed memory (see the module docstring).

  Idempotent. Affects allocations made after the call.

  Returns:
    True when glibc accepted both settings, False on other platforms (nothing changed).
  """
  libc = _glibc()
  if libc is None:
    return False
  ok = (libc.mallopt(_M_MMAP_MAX, 0) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1)
  if ok:
    _state["mode"] = "heap"
  return ok


def mode() -> str:
  """``'heap'`` after a successful `keep_buffers_on_heap` in this process, else ``'system'``."""
  return _state["mode"]


def configure(requested: str, source: str = "--malloc") -> str:
  """Applies ``'heap'`` or leaves the ``'system'`` allocator; returns the mode in effect.

  Args:
    requested: one of ``MODES``.
    source: the flag or variable it came from, for the error message.

  Raises:
    ValueError: naming ``source`` when ``requested`` is not one of ``MODES``.
  """
  if requested not in MODES:
    raise ValueError(f"{source} must be one of {MODES}, got {requested!r}")
  if requested == "heap":
    keep_buffers_on_heap()
  return mode()


def configure_from_env() -> str:
  """`configure` from ``$PHATGOOSE_JAX_MALLOC`` (unset or empty: ``'system'``)."""
  requested = os.environ.get(ENV_VAR, "").strip() or "system"
  return configure(requested, source=f"environment variable {ENV_VAR}")
