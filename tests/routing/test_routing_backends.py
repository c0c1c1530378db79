"""Every routed-LoRA backend equals the oracle (forward and gradients), and the oracle equals a
plain numpy loop."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import routing as rt
from phatgoose_jax.routing import backends as bk
from phatgoose_jax.routing import cpu_grouped as cg

T, D, F, E, R, K = 7, 13, 11, 5, 3, 2

# name -> (backend, extra kwargs). Both 'sorted' implementations are exercised on CPU; a small
# block size forces several padded blocks per expert in the fallback.
VARIANTS = {
    "dense": ("dense", {}),
    "gather": ("gather", {}),
    "sorted_blocked": ("sorted", {"use_ragged_dot": False, "block_rows": 2}),
    "sorted_ragged": ("sorted", {"use_ragged_dot": True}),
    "chunked_gather": ("chunked_gather", {}),
    # 3 assignments per chunk: several chunks, a padded last one, experts split across chunks.
    "chunked_gather_3": ("chunked_gather", {"chunk_assignments": 3}),
    # The native XLA:CPU custom call (R=3: its scalar-rank path; tests/routing/test_cpu_kernel.py
    # covers the vector path).
    "cpu_kernel": ("cpu_kernel", {}),
    "auto": ("auto", {}),
}


def _problem(seed=0, lead=(T,), dtype=np.float32, duplicates=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=lead + (D,)).astype(dtype)
  a = rng.normal(size=(E, D, R)).astype(dtype)
  b = rng.normal(size=(E, R, F)).astype(dtype)
  if duplicates:
    idx = rng.integers(0, E, size=lead + (K,)).astype(np.int32)
  else:
    idx = np.argsort(rng.random(lead + (E,)), axis=-1)[..., :K].astype(np.int32)
  w = rng.random(lead + (K,)).astype(dtype)
  return x, a, b, rt.Routing(jnp.asarray(idx), jnp.asarray(w))


def _numpy_reference(x, a, b, routing, scale):
  idx = np.asarray(routing.indices)
  w = np.asarray(routing.weights, np.float64)
  s = np.broadcast_to(np.asarray(scale, np.float64), (E,))
  x2 = np.asarray(x, np.float64).reshape(-1, D)
  idx2, w2 = idx.reshape(-1, K), w.reshape(-1, K)
  out = np.zeros((x2.shape[0], F))
  for t in range(x2.shape[0]):
    for k in range(K):
      e = idx2[t, k]
      out[t] += w2[t, k] * s[e] * (x2[t] @ np.asarray(a[e], np.float64) @ np.asarray(b[e],
                                                                                    np.float64))
  return out.reshape(x.shape[:-1] + (F,))


def _run(name, x, a, b, routing, scale):
  backend, kw = VARIANTS[name]
  return rt.routed_lora(x, a, b, routing, scale, backend=backend, **kw)


@pytest.mark.parametrize("duplicates", [False, True])
def test_oracle_matches_numpy(duplicates):
  x, a, b, r = _problem(duplicates=duplicates)
  scale = np.linspace(0.5, 2.0, E).astype(np.float32)
  out = rt.routed_lora(x, a, b, r, jnp.asarray(scale), backend="oracle")
  np.testing.assert_allclose(np.asarray(out), _numpy_reference(x, a, b, r, scale),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("duplicates", [False, True])
def test_forward_equals_oracle(name, duplicates):
  x, a, b, r = _problem(seed=1, duplicates=duplicates)
  want = rt.routed_lora(x, a, b, r, 0.5, backend="oracle")
  got = _run(name, x, a, b, r, 0.5)
  assert got.shape == (T, F) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_leading_dims_and_per_expert_scale(name):
  x, a, b, r = _problem(seed=2, lead=(2, 3))
  scale = jnp.asarray([0.1, 1.0, 2.0, 0.5, 3.0], jnp.float32)
  want = _numpy_reference(x, a, b, r, np.asarray(scale))
  got = _run(name, x, a, b, r, scale)
  assert got.shape == (2, 3, F)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "auto"])
def test_gradients_equal_oracle(name):
  x, a, b, r = _problem(seed=3, lead=(2, 4), duplicates=True)
  probe = jnp.asarray(np.random.default_rng(9).normal(size=(2, 4, F)), jnp.float32)
  scale = jnp.asarray(np.linspace(0.3, 1.7, E), jnp.float32)

  def loss(runner, x, a, b, w):
    return jnp.sum(probe * runner(x, a, b, rt.Routing(r.indices, w), scale))

  oracle = functools.partial(rt.routed_lora, backend="oracle")
  backend = lambda *args: _run(name, *args)
  args = (jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), r.weights)
  want = jax.grad(functools.partial(loss, oracle), argnums=(0, 1, 2, 3))(*args)
  got = jax.grad(functools.partial(loss, backend), argnums=(0, 1, 2, 3))(*args)
  for g_name, g, w in zip(("x", "lora_a", "lora_b", "weights"), got, want):
    assert np.abs(np.asarray(w)).sum() > 0, g_name
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5,
                               err_msg=g_name)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_jit(name):
  x, a, b, r = _problem(seed=4)
  backend, kw = VARIANTS[name]
  fn = jax.jit(functools.partial(rt.routed_lora, backend=backend, **kw))
  got = fn(x, a, b, r, jnp.asarray(0.7))
  want = rt.routed_lora(x, a, b, r, 0.7, backend="oracle")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["oracle", "dense", "gather", "sorted", "chunked_gather",
                                     "cpu_kernel"])
def test_single_expert_is_plain_lora(backend):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 3, D)).astype(np.float32)
  a = rng.normal(size=(1, D, R)).astype(np.float32)
  b = rng.normal(size=(1, R, F)).astype(np.float32)
  r = rt.one_hot_routing(0, (2, 3))
  got = rt.routed_lora(x, a, b, r, 0.25, backend=backend)
  np.testing.assert_allclose(np.asarray(got), x @ a[0] @ b[0] * 0.25, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_dtype():
  x, a, b, r = _problem(seed=6)
  xb = jnp.asarray(x, jnp.bfloat16)
  want = rt.routed_lora(x, a, b, r, 1.0, backend="oracle")
  for backend in ("oracle", "dense", "gather", "sorted", "chunked_gather"):
    got = rt.routed_lora(xb, a, b, r, 1.0, backend=backend)
    assert got.dtype == jnp.bfloat16, backend
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=0.1,
                               atol=0.3, err_msg=backend)


def test_auto_picks_a_valid_backend():
  for shape in [(1, 13, 5, 3, 2), (4096, 1024, 500, 16, 2), (4096, 4096, 8, 16, 2),
                (4096, 1024, 500, 16, 2)]:
    for platform in ("cpu", "gpu", "tpu"):
      assert rt.choose_backend(*shape, platform=platform) in ("dense", "gather", "sorted",
                                                              "chunked_gather")
  assert rt.choose_backend(1, 1024, 500, 16, 2, platform="gpu") == "gather"
  assert rt.choose_backend(4096, 4096, 8, 16, 2, platform="gpu") == "dense"
  assert rt.choose_backend(4096, 1024, 500, 16, 2, platform="gpu") == "sorted"


def test_uniform_routing_equals_average_of_experts():
  x, a, b, _ = _problem(seed=7)
  got = rt.routed_lora(x, a, b, rt.uniform_routing((T,), E), 1.0, backend="sorted")
  want = np.mean([x @ a[e] @ b[e] for e in range(E)], axis=0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
  x, a, b, r = _problem(seed=8)
  with pytest.raises(rt.RoutingError, match="backend"):
    rt.routed_lora(x, a, b, r, 1.0, backend="fast")
  with pytest.raises(rt.RoutingError, match="scale"):
    rt.routed_lora(x, a, b, r, jnp.ones((E + 1,)), backend="dense")
  with pytest.raises(rt.RoutingError, match="lora_b"):
    rt.routed_lora(x, a, b[:, :-1], r, 1.0)
  with pytest.raises(rt.RoutingError, match="x last dim"):
    rt.routed_lora(x[:, :-1], a, b, r, 1.0)
  with pytest.raises(rt.RoutingError, match="routing.indices leading dims"):
    rt.routed_lora(x[:-1], a, b, r, 1.0)
  with pytest.raises(rt.RoutingError, match="routing.weights shape"):
    rt.routed_lora(x, a, b, rt.Routing(r.indices, r.weights[:, :1]), 1.0)
  with pytest.raises(rt.RoutingError, match="integer"):
    rt.routed_lora(x, a, b, rt.Routing(r.weights, r.weights), 1.0)
  with pytest.raises(rt.RoutingError, match="takes no options"):
    rt.routed_lora(x, a, b, r, 1.0, backend="dense", block_rows=4)
  with pytest.raises(rt.RoutingError, match="chunk_assignments"):
    rt.routed_lora(x, a, b, r, 1.0, backend="sorted", chunk_assignments=4)
  with pytest.raises(rt.RoutingError, match="takes no options"):
    rt.routed_lora(x, a, b, r, 1.0, backend="chunked_gather", block_rows=4)
  with pytest.raises(rt.RoutingError, match="chunk_size"):
    rt.routed_lora(x, a, b, r, 1.0, backend="auto", chunk_size=4)
  for bad in (E, -1):  # out of range: the backends would disagree (nothing / NaN / wrap)
    idx = r.indices.at[0, 0].set(bad)
    for backend in ("oracle", "gather", "dense"):
      with pytest.raises(rt.RoutingError, match=rf"indices must be in \[0, num_experts={E}\)"):
        rt.routed_lora(x, a, b, rt.Routing(idx, r.weights), 1.0, backend=backend)
  assert set(bk.BACKENDS) == {"auto", "oracle", "dense", "gather", "sorted", "chunked_gather",
                              "cpu_kernel"}


@pytest.fixture
def enable_x64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("name", ["dense", "gather", "sorted_blocked", "sorted_ragged",
                                  "chunked_gather", "chunked_gather_3"])
def test_float64_matches_numpy_tightly(enable_x64, name):
  x, a, b, r = _problem(seed=10, lead=(2, 3), dtype=np.float64, duplicates=True)
  assert r.weights.dtype == jnp.float64
  scale = np.linspace(0.5, 1.5, E)
  got = _run(name, jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), r, jnp.asarray(scale))
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), _numpy_reference(x, a, b, r, scale), rtol=1e-10,
                             atol=1e-10)


def test_chunked_gather_gradients_with_one_expert_in_every_chunk():
  """Expert 0 is in every token, so its A/B gradients sum scatter-adds from every chunk."""
  rng = np.random.default_rng(11)
  t = 37
  x = jnp.asarray(rng.normal(size=(t, D)).astype(np.float32))
  a = jnp.asarray(rng.normal(size=(E, D, R)).astype(np.float32))
  b = jnp.asarray(rng.normal(size=(E, R, F)).astype(np.float32))
  idx = jnp.asarray(np.stack([np.zeros(t), rng.integers(0, E, size=t)], -1), jnp.int32)
  w = jnp.asarray(rng.random((t, K)).astype(np.float32))
  scale = jnp.linspace(0.5, 1.5, E)

  def loss(backend, x, a, b, w, **kw):
    out = rt.routed_lora(x, a, b, rt.Routing(idx, w), scale, backend=backend, **kw)
    return jnp.sum(jnp.sin(out))

  want = jax.grad(functools.partial(loss, "oracle"), argnums=(0, 1, 2, 3))(x, a, b, w)
  fn = functools.partial(loss, "chunked_gather", chunk_assignments=8)
  got = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))(x, a, b, w)
  for g_name, g, ref in zip(("x", "lora_a", "lora_b", "weights"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-4,
                               err_msg=g_name)


def test_gather_chunk_assignments_keeps_the_byte_budget():
  for d, f in [(768, 768), (768, 2048), (2048, 768), (13, 11)]:
    nc = bk.gather_chunk_assignments(1 << 20, d, f, 16)
    assert nc & (nc - 1) == 0 and nc >= 8
    assert nc * 16 * (d + f) * 4 <= cg._GATHER_CHUNK_BYTES or nc == 8
    assert 2 * nc * 16 * (d + f) * 4 > cg._GATHER_CHUNK_BYTES  # the largest power of two
  assert bk.gather_chunk_assignments(5, 768, 768, 16) == 5  # never more than N


def test_sorted_chunk_tokens_grows_with_experts():
  # Per-expert overhead: >= 8 assignments per expert (16 before rounding down to a power of
  # two; capped at 1024 tokens); memory: the
  # [E, C, dim] grid within 16 MB otherwise.
  assert bk.sorted_chunk_tokens(4096, 2, 2048, 1.5, 166) == 1024
  assert bk.sorted_chunk_tokens(4096, 2, 2048, 1.5, 36) == 256
  assert bk.sorted_chunk_tokens(4096, 2, 768, 1.5, 36) == 1024
  assert bk.sorted_chunk_tokens(100, 2, 768, 1.5, 166) == 100
  for e in (36, 100, 166):
    tc = bk.sorted_chunk_tokens(8192, 2, 2048, 1.5, e)
    c = bk.sorted_capacity(tc * 2, e, 1.5)
    assert tc & (tc - 1) == 0
    assert e * c * 2048 * 4 <= cg._CHUNK_BYTES or tc * 2 >= 8 * e or tc == 128


def test_auto_on_cpu_follows_the_measured_table():
  # docs/benchmarks.md "Backend choice on CPU": few rows per expert -> chunked_gather, few
  # experts -> dense, else sorted (whose overflow fallback is chunked_gather at large E).
  cpu = functools.partial(rt.choose_backend, platform="cpu")
  assert cpu(1024, 768, 1000, 16, 2) == "chunked_gather"
  assert cpu(4096, 768, 1000, 16, 2) == "chunked_gather"
  assert cpu(128, 768, 1000, 16, 2) == "chunked_gather"
  assert cpu(128, 768, 166, 16, 2) == "chunked_gather"  # ~1.5 rows per expert
  assert cpu(1024, 768, 500, 16, 2) == "chunked_gather"  # ~4 rows per expert
  assert cpu(1024, 768, 300, 16, 2) == "sorted"  # ~6.8 rows per expert
  assert cpu(4096, 768, 166, 16, 2) == "sorted"  # ~12 rows per expert in 1024-token chunks
  assert cpu(1024, 2048, 166, 16, 2) == "sorted"
  assert cpu(1024, 768, 100, 16, 2) == "sorted"  # 1024-token chunks, ~20 rows per expert
  assert cpu(1024, 2048, 36, 16, 2) == "sorted"  # was 'dense' (E*R <= D/2), measured slower
  assert cpu(128, 768, 36, 16, 2) == "sorted"  # decoder sites, ~7 rows per expert
  assert cpu(1024, 768, 10, 16, 2) == "dense"
  assert cpu(8, 768, 1000, 16, 2) == "gather"  # decoding step
  # Accelerators never get the CPU-only backend.
  assert rt.choose_backend(1024, 768, 1000, 16, 2, platform="gpu") == "sorted"


def test_eager_calls_compile_one_program_per_backend_and_options():
  """Un-jitted calls run each backend as one cached jitted function (not op by op: op-by-op
  compilation of the CPU 'sorted' path's lax.cond crashed XLA's compiler in eager model runs)."""
  x, a, b, r = _problem(seed=12)
  want = rt.routed_lora(x, a, b, r, 0.5, backend="oracle")
  bk._jitted_impl.cache_clear()
  for _ in range(2):
    got = rt.routed_lora(x, a, b, r, 0.5, backend="sorted", use_ragged_dot=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  info = bk._jitted_impl.cache_info()
  assert (info.misses, info.hits) == (1, 1)  # built on the first call, reused on the second


@pytest.mark.parametrize("backend", ["oracle", "dense", "gather", "sorted", "chunked_gather",
                                     "cpu_kernel", "auto"])
def test_no_tokens_gives_an_empty_output_and_zero_gradients(backend):
  x = jnp.zeros((2, 0, D))
  a = jnp.ones((E, D, R))
  b = jnp.ones((E, R, F))
  r = rt.Routing(jnp.zeros((2, 0, K), jnp.int32), jnp.zeros((2, 0, K)))
  assert rt.routed_lora(x, a, b, r, 1.0, backend=backend).shape == (2, 0, F)
  g = jax.grad(lambda a: rt.routed_lora(x, a, b, r, 1.0, backend=backend).sum())(a)
  assert float(jnp.abs(g).sum()) == 0.0
