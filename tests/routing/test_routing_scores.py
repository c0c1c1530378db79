"""PHATGOOSE scores, top-k, uniform and one-hot routing against plain numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import routing as rt

D, E, K = 13, 5, 2


def _np_ln(v, eps=1e-5):
  v = np.asarray(v, np.float64)
  mu = v.mean(-1, keepdims=True)
  var = ((v - mu) ** 2).mean(-1, keepdims=True)
  return (v - mu) / np.sqrt(var + eps)


def _np_phatgoose(x, gates, k, eps_topk=1e-6):
  """Independent reference: LN both, scaled dot, softmax over E, top-k, /(sum + eps)."""
  logits = _np_ln(x) @ _np_ln(gates).T / np.sqrt(x.shape[-1])
  z = np.exp(logits - logits.max(-1, keepdims=True))
  p = z / z.sum(-1, keepdims=True)
  idx = np.argsort(-p, axis=-1, kind="stable")[..., :k]
  top = np.take_along_axis(p, idx, -1)
  return idx, top / (top.sum(-1, keepdims=True) + eps_topk), top


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, D)).astype(np.float32) * 3.0 + 0.5
  gates = rng.normal(size=(E, D)).astype(np.float32)
  return x, gates


def test_phatgoose_route_matches_numpy(data):
  x, gates = data
  r = rt.phatgoose_route(jnp.asarray(x), jnp.asarray(gates), K)
  idx, w, top = _np_phatgoose(x, gates, K)
  np.testing.assert_array_equal(np.asarray(r.indices), idx)
  np.testing.assert_allclose(np.asarray(r.weights), w, rtol=1e-5)
  assert r.indices.dtype == jnp.int32 and r.weights.dtype == jnp.float32
  # Official renormalisation: sum(w) = s / (s + 1e-6) with s the kept softmax mass (< 1).
  s = top.sum(-1)
  np.testing.assert_allclose(np.asarray(r.weights).sum(-1), s / (s + 1e-6), rtol=1e-6)
  assert np.all(np.asarray(r.weights).sum(-1) < 1.0)


def test_phatgoose_route_leading_dims_and_jit(data):
  x, gates = data
  rng = np.random.default_rng(1)
  x3 = rng.normal(size=(2, 3, D)).astype(np.float32)
  r = jax.jit(rt.phatgoose_route, static_argnums=2)(x3, gates, K)
  idx, w, _ = _np_phatgoose(x3, gates, K)
  assert r.indices.shape == (2, 3, K)
  np.testing.assert_array_equal(np.asarray(r.indices), idx)
  np.testing.assert_allclose(np.asarray(r.weights), w, rtol=1e-5)


def test_phatgoose_route_bf16_input_routes_in_float32(data):
  x, gates = data
  xb = jnp.asarray(x, jnp.bfloat16)
  r = rt.phatgoose_route(xb, jnp.asarray(gates), K)
  assert r.weights.dtype == jnp.float32
  # Reference on the bf16-rounded values, computed in float64: float32 math keeps rtol 1e-5.
  idx, w, _ = _np_phatgoose(np.asarray(xb.astype(jnp.float32)), gates, K)
  np.testing.assert_array_equal(np.asarray(r.indices), idx)
  np.testing.assert_allclose(np.asarray(r.weights), w, rtol=1e-5)


def test_gate_standardisation_makes_routing_shift_and_scale_invariant(data):
  x, gates = data
  r1 = rt.phatgoose_route(x, gates, K)
  r2 = rt.phatgoose_route(x * 4.0 - 2.0, gates * 0.25 + 7.0, K)
  np.testing.assert_array_equal(np.asarray(r1.indices), np.asarray(r2.indices))
  np.testing.assert_allclose(np.asarray(r1.weights), np.asarray(r2.weights), rtol=1e-4)


def test_top_k_routing_renormalisation_options():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, E)).astype(np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  idx = np.argsort(-p, -1, kind="stable")[:, :3]
  top = np.take_along_axis(p, idx, -1)
  raw = rt.top_k_routing(logits, 3, renormalize_eps=None)
  np.testing.assert_allclose(np.asarray(raw.weights), top, rtol=1e-5)
  exact = rt.top_k_routing(logits, 3, renormalize_eps=0.0)
  np.testing.assert_allclose(np.asarray(exact.weights).sum(-1), 1.0, rtol=1e-6)
  default = rt.top_k_routing(logits, 3)
  np.testing.assert_allclose(np.asarray(default.weights),
                             top / (top.sum(-1, keepdims=True) + 1e-6), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(default.indices), idx)


def test_top_k_routing_is_differentiable():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(3, E)), jnp.float32)
  g = jax.grad(lambda l: jnp.sum(rt.top_k_routing(l, K).weights[:, 0]))(logits)
  assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).sum() > 0


def test_standardize_matches_numpy():
  x = np.random.default_rng(4).normal(size=(3, D)) * 5 + 1
  out = rt.standardize(jnp.asarray(x, jnp.float32))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), _np_ln(x), rtol=1e-5, atol=1e-6)
  out2 = rt.standardize(jnp.asarray(x, jnp.float32), eps=1.0)
  np.testing.assert_allclose(np.asarray(out2), _np_ln(x, eps=1.0), rtol=1e-5, atol=1e-6)


def test_uniform_and_one_hot_routing():
  u = rt.uniform_routing((2, 3), E)
  assert u.indices.shape == (2, 3, E) and u.weights.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(u.indices[1, 2]), np.arange(E))
  np.testing.assert_allclose(np.asarray(u.weights), 1.0 / E)
  o = rt.one_hot_routing(jnp.asarray([[3], [1]]), (2, 4))
  assert o.indices.shape == (2, 4, 1)
  np.testing.assert_array_equal(np.asarray(o.indices[..., 0]), [[3] * 4, [1] * 4])
  np.testing.assert_array_equal(np.asarray(o.weights), 1.0)
  s = rt.one_hot_routing(2, (3,))
  np.testing.assert_array_equal(np.asarray(s.indices[:, 0]), [2, 2, 2])


def test_routing_is_a_pytree():
  r = rt.uniform_routing((2,), 3)
  leaves = jax.tree_util.tree_leaves(r)
  assert len(leaves) == 2
  r2 = jax.tree_util.tree_map(lambda a: a, r)
  assert isinstance(r2, rt.Routing) and r2.top_k == 3 and r2.batch_shape == (2,)


def test_bad_inputs_raise_clear_errors(data):
  x, gates = data
  with pytest.raises(rt.RoutingError, match="gates"):
    rt.phatgoose_route(x, gates[:, :-1], K)
  with pytest.raises(rt.RoutingError, match="top_k"):
    rt.phatgoose_route(x, gates, E + 1)
  with pytest.raises(rt.RoutingError, match="top_k"):
    rt.top_k_routing(x[:, :E], 0)
  with pytest.raises(rt.RoutingError, match="num_experts"):
    rt.uniform_routing((2,), 0)
  with pytest.raises(rt.RoutingError, match="expert_index"):
    rt.one_hot_routing(jnp.asarray([0.5]), (2,))
  with pytest.raises(rt.RoutingError, match="expert_index"):
    rt.one_hot_routing(jnp.asarray([0, 1, 2]), (2,))
