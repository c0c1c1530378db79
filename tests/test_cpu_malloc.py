"""`phatgoose_jax.cpu_malloc`: heap mode is applied in a fresh process (glibc) and validated."""
import os
import subprocess
import sys

import pytest

from phatgoose_jax import cpu_malloc

_CHILD = r"""
import ctypes, ctypes.util, json, os, sys
from phatgoose_jax import cpu_malloc
mode = cpu_malloc.configure_from_env()
# With M_MMAP_MAX = 0 a 64 MB malloc comes from the heap (brk), not from a fresh mmap: the
# program break moves past it.
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
libc.malloc.restype = ctypes.c_void_p
before = libc.sbrk(0)
ptr = libc.malloc(64 << 20)
after = libc.sbrk(0)
print(json.dumps({"mode": mode, "grew": int(after) - int(before)}))
"""


def _run(env_value):
  env = dict(os.environ)
  env.pop(cpu_malloc.ENV_VAR, None)
  if env_value is not None:
    env[cpu_malloc.ENV_VAR] = env_value
  return subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.skipif(cpu_malloc._glibc() is None, reason="glibc only")
@pytest.mark.parametrize("value, mode, on_heap", [("heap", "heap", True), (None, "system", False),
                                                  ("system", "system", False)])
def test_heap_mode_serves_large_buffers_from_the_heap(value, mode, on_heap):
  import json  # pylint: disable=g-import-not-at-top
  proc = _run(value)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["mode"] == mode
  assert (out["grew"] >= 32 << 20) == on_heap  # an mmap-ed block leaves the break alone


def test_bad_mode_names_the_variable():
  with pytest.raises(ValueError, match=cpu_malloc.ENV_VAR):
    cpu_malloc.configure("fast", source=f"environment variable {cpu_malloc.ENV_VAR}")
  argv = [sys.executable, "-m", "phatgoose_jax.cli", "library", "list", "/nonexistent"]
  env = dict(os.environ, **{cpu_malloc.ENV_VAR: "fast"})
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert cpu_malloc.ENV_VAR in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("module", ["phatgoose_jax.train", "phatgoose_jax.eval"])
def test_entry_points_refuse_a_bad_mode_in_one_line(module):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{cpu_malloc.ENV_VAR: "fast"})
  proc = subprocess.run([sys.executable, "-m", module, "--gin_file=runs/train_expert.gin"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert cpu_malloc.ENV_VAR in lines[-1] and "'fast'" in lines[-1]
  assert "Traceback" not in proc.stderr
