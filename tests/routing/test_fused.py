"""`routing.fused`: one router matmul for several gate tables equals per-site `phatgoose_route`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import routing as rt
from phatgoose_jax.routing import fused

D, K = 13, 2


def _gates(seed, sizes):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(e, D)).astype(np.float32) * (1 + i))
          for i, e in enumerate(sizes)]


@pytest.mark.parametrize("prepared", [False, True])
def test_fused_equals_per_site_route(prepared):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, D)).astype(np.float32) * 3 + 1)
  gates = _gates(1, (5, 7, 3))  # different E per site
  tables = [fused.standardized_gates(g) for g in gates] if prepared else gates
  got = fused.fused_phatgoose_route(x, tables, K, prepared=prepared)
  assert len(got) == len(gates)
  for g, r in zip(gates, got):
    want = rt.phatgoose_route(x, g, K)
    np.testing.assert_array_equal(np.asarray(r.indices), np.asarray(want.indices))
    np.testing.assert_allclose(np.asarray(r.weights), np.asarray(want.weights), rtol=1e-5,
                               atol=1e-6)
    assert r.weights.shape == (2, 5, K) and r.weights.dtype == jnp.float32


def test_fused_router_is_float32_for_bfloat16_input():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(6, D)), jnp.bfloat16)
  (r,) = fused.fused_phatgoose_route(x, _gates(3, (4,)), K)
  want = rt.phatgoose_route(x, _gates(3, (4,))[0], K)
  assert r.weights.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(r.indices), np.asarray(want.indices))


def test_standardized_gates_are_zero_mean_scaled():
  (g,) = _gates(4, (5,))
  s = np.asarray(fused.standardized_gates(g))
  np.testing.assert_allclose(s.mean(-1), 0.0, atol=1e-6)
  np.testing.assert_allclose((s ** 2).sum(-1), 1.0, rtol=1e-4)  # unit variance / sqrt(D)


def test_bad_gates_raise():
  x = jnp.ones((3, D))
  with pytest.raises(rt.RoutingError, match="gates"):
    fused.fused_phatgoose_route(x, [], K)
  with pytest.raises(rt.RoutingError, match=r"gates\[1\]"):
    fused.fused_phatgoose_route(x, [jnp.ones((4, D)), jnp.ones((4, D + 1))], K)
  with pytest.raises(rt.RoutingError, match="standardized_gates"):
    fused.standardized_gates(jnp.ones((D,)))
