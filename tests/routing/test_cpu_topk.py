"""The native router softmax + top-k (`cpu_kernel.top_k_softmax_et`) and the routing fast path.

Oracle: `scores.top_k_routing` (pure JAX: softmax, `lax.top_k` semantics, renormalisation) on
the same logits, and `phatgoose_route` / `fused_phatgoose_route` with the fast path switched off.
Odd dims (E=5/7/13, T not a multiple of the kernel's 16 lanes) so a transposed axis cannot pass.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import routing as rt
from phatgoose_jax.routing import cpu_kernel
from phatgoose_jax.routing import fused
from phatgoose_jax.routing import scores

pytestmark = pytest.mark.skipif(cpu_kernel._compiler() is None,  # pylint: disable=protected-access
                                reason="no C++ compiler: the kernel cannot be built")


def _reference(logits_et, k, scale, eps):
  r = scores.top_k_routing(jnp.asarray(logits_et).T * scale, k, renormalize_eps=eps)
  return np.asarray(r.weights), np.asarray(r.indices)


@pytest.mark.parametrize("e,t,k,eps", [(5, 37, 2, 1e-6), (13, 20, 4, None), (7, 1, 1, 0.0),
                                       (3, 33, 3, 1e-6), (166, 70, 2, 1e-6), (2, 0, 2, 1e-6)])
def test_equals_top_k_routing(e, t, k, eps):
  logits = np.random.default_rng(e * 100 + t).normal(size=(e, t)).astype(np.float32) * 3
  w, i = jax.jit(lambda l: cpu_kernel.top_k_softmax_et(l, k, 0.7, eps))(jnp.asarray(logits))
  want_w, want_i = _reference(logits, k, 0.7, eps)
  assert w.shape == (t, k) and i.shape == (t, k) and i.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(i), want_i)
  np.testing.assert_allclose(np.asarray(w), want_w, rtol=2e-6, atol=1e-7)


def test_ties_nan_inf_and_underflow_follow_lax_top_k():
  lg = np.zeros((6, 19), np.float32)  # column 0: all equal -> experts 0, 1
  lg[:, 1] = [1, 3, 3, 2, 3, 0]  # a three-way tie for the top: lowest indices 1, 2
  lg[2, 2] = np.nan  # NaN logit: NaN softmax, indices 0, 1
  lg[:, 3] = np.inf
  lg[:, 4] = -np.inf
  lg[0, 5] = np.inf
  lg[:, 6] = [-200, -200, 5, -300, -200, -200]  # second probability underflows to 0: index 0
  w, i = cpu_kernel.top_k_softmax_et(jnp.asarray(lg), 2, 1.0, 1e-6)
  want_w, want_i = _reference(lg, 2, 1.0, 1e-6)
  np.testing.assert_array_equal(np.asarray(i), want_i)
  np.testing.assert_allclose(np.asarray(w), want_w, rtol=2e-6, atol=1e-7)  # NaN == NaN here
  assert np.isnan(np.asarray(w)[2:6]).all() and np.asarray(i)[1].tolist() == [1, 2]


def test_gradient_is_the_jax_paths():
  lg = jnp.asarray(np.random.default_rng(0).normal(size=(9, 11)).astype(np.float32))
  probe = jnp.arange(22.0).reshape(11, 2)
  got = jax.grad(lambda l: jnp.sum(cpu_kernel.top_k_softmax_et(l, 2, 0.5)[0] * probe))(lg)
  want = jax.grad(lambda l: jnp.sum(
      scores.top_k_routing(l.T * 0.5, 2).weights * probe))(lg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(rt.RoutingError, match=r"k must be in 1..4"):
    cpu_kernel.top_k_softmax_et(jnp.zeros((7, 3)), 5)
  with pytest.raises(rt.RoutingError, match=r"k must be in 1..2"):
    cpu_kernel.top_k_softmax_et(jnp.zeros((2, 3)), 3)
  with pytest.raises(rt.RoutingError, match="float32"):
    cpu_kernel.top_k_softmax_et(jnp.zeros((7, 3), jnp.bfloat16), 2)


def _without_fast_path(monkeypatch, fn):
  monkeypatch.setattr(scores, "native_router", lambda *a: False)
  monkeypatch.setattr(fused, "native_router", lambda *a: False)
  return fn()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_phatgoose_route_fast_path_equals_the_jax_path(monkeypatch, k):
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.normal(size=(3, 21, 13)).astype(np.float32))  # leading dims [B, L]
  gates = jnp.asarray(rng.normal(size=(5, 13)).astype(np.float32))
  assert scores.native_router(jnp.float32, k, 5) == (jax.device_count() == 1)
  got = jax.jit(lambda x, g: rt.phatgoose_route(x, g, k))(x, gates)
  text = jax.jit(lambda x, g: rt.phatgoose_route(x, g, k)).lower(x, gates).as_text()
  assert ("phatgoose_top_k_softmax_f32" in text) == (jax.device_count() == 1)
  want = _without_fast_path(monkeypatch, lambda: rt.phatgoose_route(x, gates, k))
  np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
  np.testing.assert_allclose(np.asarray(got.weights), np.asarray(want.weights), rtol=2e-6,
                             atol=1e-7)
  # Gradients through the routing weights (to x and gates) are the JAX path's.
  loss = lambda x, g: jnp.sum(jnp.cos(rt.phatgoose_route(x, g, k).weights))
  got_g = jax.grad(loss, argnums=(0, 1))(x, gates)
  want_g = _without_fast_path(monkeypatch, lambda: jax.grad(loss, argnums=(0, 1))(x, gates))
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_fused_route_fast_path_equals_separate_jax_routes(monkeypatch):
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(37, 13)).astype(np.float32))
  gates = [jnp.asarray(rng.normal(size=(e, 13)).astype(np.float32)) for e in (5, 7, 3)]
  got = jax.jit(lambda x, gs: fused.fused_phatgoose_route(x, gs, 2))(x, gates)
  want = _without_fast_path(monkeypatch, lambda: [rt.phatgoose_route(x, g, 2) for g in gates])
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g.indices), np.asarray(w.indices))
    np.testing.assert_allclose(np.asarray(g.weights), np.asarray(w.weights), rtol=2e-6,
                               atol=1e-7)


def test_vmap_and_bfloat16_inputs():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(4, 19, 13)).astype(np.float32))
  gates = jnp.asarray(rng.normal(size=(5, 13)).astype(np.float32))
  got = jax.vmap(lambda xi: rt.phatgoose_route(xi, gates, 2).weights)(x)
  want = rt.phatgoose_route(x, gates, 2).weights
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=1e-7)
  # bfloat16 activations: the router still runs in float32 (and may take the fast path).
  r = rt.phatgoose_route(x.astype(jnp.bfloat16), gates, 2)
  assert r.weights.dtype == jnp.float32 and r.indices.shape == (4, 19, 2)
