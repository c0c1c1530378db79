"""The native XLA:CPU routed-LoRA kernel (`phatgoose_jax.routing.cpu_kernel`).

Its scalar-rank path (R=3) runs in every test of test_routing_backends.py; here the vector paths
(R a multiple of 16), several expert ranges (phase 1) and output-column ranges (phase 2) once a
call has enough flops to use the thread pool, register blocks of every row count 1-8, output
widths that are not a multiple of 16, accumulation into ``add_to``, gradients, vmap, errors and
the build cache.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import routing as rt
from phatgoose_jax.routing import cpu_kernel

pytestmark = pytest.mark.skipif(cpu_kernel._compiler() is None,  # pylint: disable=protected-access
                                reason="no C++ compiler: the kernel cannot be built")


def _problem(t, d, f, e, r, k=2, seed=0, skew=False):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
  a = jnp.asarray(rng.normal(size=(e, d, r)).astype(np.float32) * 0.1)
  b = jnp.asarray(rng.normal(size=(e, r, f)).astype(np.float32) * 0.1)
  if skew:  # most tokens on expert 0: one expert with many register blocks
    idx = np.stack([np.zeros(t), rng.integers(1, e, size=t)], -1)
  else:
    idx = rng.integers(0, e, size=(t, k))
  w = jnp.asarray(rng.random((t, k)).astype(np.float32))
  scale = jnp.asarray(np.linspace(0.5, 1.5, e), jnp.float32)
  return x, a, b, rt.Routing(jnp.asarray(idx, jnp.int32), w), scale


def test_kernel_builds():
  assert cpu_kernel.available(), cpu_kernel.status()
  assert os.path.exists(cpu_kernel._STATE["path"])  # pylint: disable=protected-access


@pytest.mark.parametrize("t,d,f,e,r,skew", [
    (130, 13, 37, 5, 16, False),   # 5 expert ranges, 2 column ranges (a 5-column tail)
    (301, 48, 16, 7, 32, True),    # two vectors per row, one expert with ~300 rows
    (200, 21, 19, 5, 48, False),   # three vectors per row
    (150, 17, 40, 3, 64, False),   # four vectors per row
    (9, 13, 11, 5, 20, False),     # scalar path, on the calling thread
    (1, 13, 11, 5, 16, False),     # a single token (decoding)
])
def test_forward_equals_oracle(t, d, f, e, r, skew):
  x, a, b, routing, scale = _problem(t, d, f, e, r, skew=skew)
  base = jnp.asarray(np.random.default_rng(1).normal(size=(t, f)), jnp.float32)
  want = rt.routed_lora(x, a, b, routing, scale, backend="oracle")
  got = jax.jit(lambda *o: rt.routed_lora(*o, backend="cpu_kernel"))(x, a, b, routing, scale)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  got = jax.jit(lambda *o: rt.routed_lora(*o[:-1], backend="cpu_kernel", add_to=o[-1]))(
      x, a, b, routing, scale, base)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want + base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [16, 32])
def test_every_register_block_row_count(r):
  """Expert j gets j+1 rows (shuffled over the tokens): blocks of 1..8 rows, and 9 rows = 8 + 1."""
  counts = np.arange(1, 10)
  rng = np.random.default_rng(r)
  idx = rng.permutation(np.repeat(np.arange(9), counts))[:, None]  # [45, 1]
  t, d, f = idx.shape[0], 97, 83  # enough flops for the thread pool; odd widths
  x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
  a = jnp.asarray(rng.normal(size=(9, d, r)).astype(np.float32) * 0.1)
  b = jnp.asarray(rng.normal(size=(9, r, f)).astype(np.float32) * 0.1)
  routing = rt.Routing(jnp.asarray(idx, jnp.int32), jnp.asarray(rng.random((t, 1)), jnp.float32))
  scale = jnp.asarray(np.linspace(0.5, 1.5, 9), jnp.float32)
  got = rt.routed_lora(x, a, b, routing, scale, backend="cpu_kernel")
  want = rt.routed_lora(x, a, b, routing, scale, backend="oracle")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,k,e", [(0, 2, 5), (70, 1, 1), (130, 3, 5), (200, 4, 7)])
def test_other_top_k_single_expert_and_no_tokens(t, k, e):
  x, a, b, routing, scale = _problem(t, 13, 33, e, 16, k=k, seed=5)
  got = rt.routed_lora(x, a, b, routing, scale, backend="cpu_kernel")
  assert got.shape == (t, 33)
  want = rt.routed_lora(x, a, b, routing, scale, backend="oracle")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_gradients_equal_oracle_including_add_to():
  x, a, b, routing, scale = _problem(140, 13, 21, 5, 16, seed=3)
  base = jnp.asarray(np.random.default_rng(2).normal(size=(140, 21)), jnp.float32)

  def loss(backend, x, a, b, w, base):
    out = rt.routed_lora(x, a, b, rt.Routing(routing.indices, w), scale, backend=backend,
                         add_to=base)
    return jnp.sum(jnp.sin(out))

  args = (x, a, b, routing.weights, base)
  want = jax.grad(lambda *o: loss("oracle", *o), argnums=(0, 1, 2, 3, 4))(*args)
  got = jax.jit(jax.grad(lambda *o: loss("cpu_kernel", *o), argnums=(0, 1, 2, 3, 4)))(*args)
  for name, g, w in zip(("x", "lora_a", "lora_b", "weights", "add_to"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5,
                               err_msg=name)


def test_vmap_and_leading_dims():
  x, a, b, routing, scale = _problem(3 * 40, 13, 11, 5, 16, seed=4)
  x3 = x.reshape(3, 40, 13)
  r3 = rt.Routing(routing.indices.reshape(3, 40, 2), routing.weights.reshape(3, 40, 2))
  want = rt.routed_lora(x3, a, b, r3, scale, backend="oracle")
  got = jax.vmap(lambda x, i, w: rt.routed_lora(x, a, b, rt.Routing(i, w), scale,
                                                backend="cpu_kernel"))(x3, r3.indices,
                                                                       r3.weights)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_auto_uses_the_kernel_for_float32_on_one_cpu_device():
  x, a, b, routing, scale = _problem(64, 13, 11, 5, 16)
  text = jax.jit(lambda *o: rt.routed_lora(*o)).lower(x, a, b, routing, scale).as_text()
  assert ("phatgoose_routed_lora_f32" in text) == (jax.device_count() == 1)
  text = jax.jit(lambda *o: rt.routed_lora(*o)).lower(
      x.astype(jnp.bfloat16), a, b, routing, scale).as_text()
  assert "phatgoose_routed_lora_f32" not in text  # bfloat16 compute keeps the JAX paths


def test_bad_inputs_raise_clear_errors():
  x, a, b, routing, scale = _problem(8, 13, 11, 5, 16)
  with pytest.raises(rt.RoutingError, match="float32 only, x is bfloat16"):
    rt.routed_lora(x.astype(jnp.bfloat16), a, b, routing, scale, backend="cpu_kernel")
  with pytest.raises(rt.RoutingError, match="add_to shape"):
    rt.routed_lora(x, a, b, routing, scale, backend="cpu_kernel", add_to=jnp.zeros((8, 12)))
  bad = rt.Routing(routing.indices.at[3, 1].set(5), routing.weights)
  with pytest.raises(rt.RoutingError, match="indices must be in"):  # concrete: checked up front
    rt.routed_lora(x, a, b, bad, scale, backend="cpu_kernel")
  with pytest.raises(Exception, match="expert id out of range"):  # traced: the kernel refuses
    jax.block_until_ready(jax.jit(lambda r: rt.routed_lora(x, a, b, r, scale,
                                                           backend="cpu_kernel"))(bad))


_SCRIPT = """
import jax.numpy as jnp, numpy as np
from phatgoose_jax import routing as rt
from phatgoose_jax.routing import cpu_kernel
x = jnp.ones((4, 13)); a = jnp.ones((5, 13, 16)); b = jnp.ones((5, 16, 11))
r = rt.Routing(jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2)))
print("available", cpu_kernel.available(), cpu_kernel.status())
print("auto_text", "phatgoose_routed_lora_f32" in __import__("jax").jit(
    lambda *o: rt.routed_lora(*o)).lower(x, a, b, r, 1.0).as_text())
try:
  rt.routed_lora(x, a, b, r, 1.0, backend="cpu_kernel")
except rt.RoutingError as e:
  print("error", e)
"""


def _run_script(tmp_path, **env):
  full = dict(os.environ, JAX_PLATFORMS="cpu", PHATGOOSE_JAX_KERNEL_CACHE=str(tmp_path), **env)
  full.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=full, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_build_into_a_fresh_cache_leaves_one_whole_library(tmp_path):
  out = _run_script(tmp_path)
  assert "available True" in out and "auto_text True" in out
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 1 and files[0].startswith("routed_lora_cpu-") and files[0].endswith(".so")
  _run_script(tmp_path)  # second process: loads the cached library, builds nothing new
  assert sorted(os.listdir(tmp_path)) == files


def test_disabled_by_environment(tmp_path):
  out = _run_script(tmp_path, PHATGOOSE_JAX_CPU_KERNEL="0")
  assert "available False disabled by PHATGOOSE_JAX_CPU_KERNEL" in out
  assert "auto_text False" in out  # auto keeps the JAX paths
  assert "error routed_lora: backend 'cpu_kernel' is unavailable" in out
  assert os.listdir(tmp_path) == []


def test_failed_build_reports_the_compiler_error(tmp_path):
  out = _run_script(tmp_path, CXX="/bin/false")
  assert "available False build or load failed" in out and "auto_text False" in out
  assert os.listdir(tmp_path) == []  # no half-written library left behind


def test_cache_key_includes_the_cpu(tmp_path, monkeypatch):
  """A cache directory shared by hosts with other CPUs never hands one host another's build."""
  monkeypatch.setenv("PHATGOOSE_JAX_KERNEL_CACHE", str(tmp_path))
  compiler = cpu_kernel._compiler()  # pylint: disable=protected-access
  here = cpu_kernel._build(compiler)  # pylint: disable=protected-access
  assert cpu_kernel._build(compiler) == here  # pylint: disable=protected-access
  monkeypatch.setattr(cpu_kernel, "_cpu_identity", lambda: "x86_64 flags: sse2")
  other = cpu_kernel._build(compiler)  # pylint: disable=protected-access
  assert other != here and sorted(os.listdir(tmp_path)) == sorted(
      [os.path.basename(here), os.path.basename(other)])
