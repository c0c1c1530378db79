"""The CPU 'sorted' backend's capacity fast path, its exact fallback and its token chunking all
equal the oracle, forward and backward."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import routing as rt
from phatgoose_jax.routing import backends as bk
from phatgoose_jax.routing import cpu_grouped as cg

D, F, E, R, K = 13, 11, 5, 3, 2


def _problem(t, seed=0, skew=False):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(t, D)).astype(np.float32))
  a = jnp.asarray(rng.normal(size=(E, D, R)).astype(np.float32))
  b = jnp.asarray(rng.normal(size=(E, R, F)).astype(np.float32))
  if skew:  # expert 0 in every token, twice in every other one: over the capacity
    second = np.where(np.arange(t) % 2 == 0, 0, rng.integers(1, E, size=t))
    idx = np.stack([np.zeros(t, np.int64), second], -1)
  else:
    idx = np.argsort(rng.random((t, E)), axis=-1)[:, :K]
  w = jnp.asarray(rng.random((t, K)).astype(np.float32))
  return x, a, b, rt.Routing(jnp.asarray(idx, jnp.int32), w)


# (capacity_factor, chunk_tokens): one chunk, several chunks with a padded last one.
CASES = {"one_chunk": (1.5, None), "chunks_padded": (1.5, 16), "tiny_capacity": (0.01, 6)}


def _overflows(r, cf, chunk):
  """Whether some chunk has an expert over its capacity (so the exact fallback runs)."""
  idx = np.asarray(r.indices)
  chunk = chunk or idx.shape[0]
  cap = bk.sorted_capacity(chunk * K, E, cf)
  return any(np.bincount(idx[i:i + chunk].ravel(), minlength=E).max() > cap
             for i in range(0, idx.shape[0], chunk))


@pytest.mark.parametrize("fallback", bk.SORTED_FALLBACKS)
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_capacity_path_equals_oracle(case, skew, fallback):
  cf, chunk = CASES[case]
  x, a, b, r = _problem(37, seed=1, skew=skew)
  assert _overflows(r, cf, chunk) == skew  # both the fast path and the fallback are exercised
  scale = jnp.linspace(0.5, 1.5, E)
  got = rt.routed_lora(x, a, b, r, scale, backend="sorted", use_ragged_dot=False,
                       capacity_factor=cf, chunk_tokens=chunk, fallback=fallback)
  want = rt.routed_lora(x, a, b, r, scale, backend="oracle")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fallback", ["blocked", "chunked_gather"])
@pytest.mark.parametrize("skew", [False, True])
def test_capacity_path_gradients_equal_oracle(skew, fallback):
  x, a, b, r = _problem(21, seed=2, skew=skew)

  def loss(backend, x, a, b, w, **kw):
    out = rt.routed_lora(x, a, b, rt.Routing(r.indices, w), 0.7, backend=backend, **kw)
    return jnp.sum(jnp.sin(out))

  want = jax.grad(functools.partial(loss, "oracle"), argnums=(0, 1, 2, 3))(x, a, b, r.weights)
  assert _overflows(r, 1.5, 16) == skew
  fast = functools.partial(loss, "sorted", use_ragged_dot=False, capacity_factor=1.5,
                           chunk_tokens=16, fallback=fallback)
  got = jax.jit(jax.grad(fast, argnums=(0, 1, 2, 3)))(x, a, b, r.weights)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_capacity_and_chunk_sizes():
  # Mean rows per expert 8192/166 ~ 49: capacity above the mean plus a margin, within [8, N].
  c = bk.sorted_capacity(8192, 166, 1.5)
  assert 1.5 * 8192 / 166 < c < 3 * 8192 / 166
  assert bk.sorted_capacity(4, 100, 1.5) == 4  # never more than N
  assert bk.sorted_capacity(64, 64, 1.0) == 8  # at least 8
  tc = bk.sorted_chunk_tokens(4096, 2, 2048, 1.5)
  assert tc & (tc - 1) == 0 and 128 <= tc < 4096
  assert bk.sorted_chunk_tokens(100, 2, 768, 1.5) == 100  # small T: one chunk


def test_fallback_choice_by_shape_and_bad_name():
  # Measured: blocked wins at E=36, chunked_gather at E=166 (skewed routings).
  assert bk.sorted_fallback(36) == "blocked"
  assert bk.sorted_fallback(166) == "chunked_gather"
  x, a, b, r = _problem(9)
  with pytest.raises(rt.RoutingError, match="fallback must be one of"):
    rt.routed_lora(x, a, b, r, backend="sorted", use_ragged_dot=False, fallback="nope")


def test_padding_of_the_last_chunk_is_spread_over_the_experts():
  # 130 tokens in chunks of 128: the last chunk has 2 tokens and 126 padding tokens; with all
  # padding on one expert it would overflow the capacity (C=106 at E=5) and take the fallback.
  padded = np.asarray(cg._pad_ids(jnp.zeros((2, K), jnp.int32), 126, E))
  assert padded.shape == (128, K)
  counts = np.bincount(padded.ravel(), minlength=E)
  assert counts.max() <= bk.sorted_capacity(128 * K, E, 1.5)
  filler = np.bincount(padded[2:].ravel(), minlength=E)
  assert filler.max() - filler.min() <= 1


@pytest.mark.parametrize("heap", [False, True])
def test_chunk_budget_follows_the_allocator_mode(heap, monkeypatch):
  from phatgoose_jax import cpu_malloc
  monkeypatch.setitem(cpu_malloc._state, "mode", "heap" if heap else "system")
  assert bk.chunk_byte_budget() == (48 << 20 if heap else 16 << 20)
  # E=36, 768->2048: 256-token chunks under 16 MB, 1024 under 48 MB (measured faster there).
  assert bk.sorted_chunk_tokens(1024, 2, 2048, 1.5, 36) == (1024 if heap else 256)
