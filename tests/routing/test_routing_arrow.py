"""Arrow prototypes against np.linalg.svd of the explicit dW, and Arrow routing against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import routing as rt

D, F, E, R, K = 13, 11, 5, 3, 2


def _lora(seed, rank=R):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(E, D, rank)).astype(np.float32),
          rng.normal(size=(E, rank, F)).astype(np.float32))


def _np_top_input_direction(a, b):
  """Top right-singular vector of dW^T = B^T A^T [F, D], straight from numpy."""
  out = []
  for e in range(a.shape[0]):
    delta_t = (a[e].astype(np.float64) @ b[e].astype(np.float64)).T  # [F, D]
    _, _, vt = np.linalg.svd(delta_t)
    out.append(vt[0])
  return np.stack(out)


@pytest.mark.parametrize("method", ["qr", "explicit"])
@pytest.mark.parametrize("rank", [1, R, 12])
def test_prototypes_are_top_input_singular_vectors(method, rank):
  a, b = _lora(0, rank)
  got = np.asarray(rt.arrow_prototypes(a, b, method=method))
  want = _np_top_input_direction(a, b)
  assert got.shape == (E, D)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)
  for e in range(E):
    sign = np.sign(got[e] @ want[e])
    np.testing.assert_allclose(got[e], sign * want[e], atol=2e-5, err_msg=f"expert {e}")
  # Documented sign convention: the largest-magnitude entry is positive.
  assert np.all(got[np.arange(E), np.argmax(np.abs(got), -1)] > 0)


def test_prototype_direction_is_the_most_amplified_input():
  a, b = _lora(1)
  p = np.asarray(rt.arrow_prototypes(a, b))
  rng = np.random.default_rng(2)
  for e in range(E):
    dw = a[e] @ b[e]
    gain = np.linalg.norm(p[e] @ dw)
    probes = rng.normal(size=(50, D))
    probes /= np.linalg.norm(probes, axis=-1, keepdims=True)
    assert gain >= np.linalg.norm(probes @ dw, axis=-1).max() - 1e-4


def _np_arrow(x, p, k, temperature):
  logits = np.abs(x.astype(np.float64) @ p.T.astype(np.float64)) / temperature
  idx = np.argsort(-logits, -1, kind="stable")[..., :k]
  top = np.take_along_axis(logits, idx, -1)
  z = np.exp(top - top.max(-1, keepdims=True))
  return idx, z / z.sum(-1, keepdims=True)


def _np_phatgoose_arrow(x, p, k, temperature=10.0):
  logits = np.abs(x.astype(np.float64) @ p.T.astype(np.float64) / temperature)
  logits = logits * np.sqrt(1.0 / x.shape[-1])
  z = np.exp(logits - logits.max(-1, keepdims=True))
  probs = z / z.sum(-1, keepdims=True)
  idx = np.argsort(-probs, -1, kind="stable")[..., :k]
  top = np.take_along_axis(probs, idx, -1)
  return idx, top / (top.sum(-1, keepdims=True) + 1e-6)


def test_arrow_route_matches_numpy():
  a, b = _lora(3)
  p = np.asarray(rt.arrow_prototypes(a, b))
  x = np.random.default_rng(4).normal(size=(2, 3, D)).astype(np.float32) * 4
  r = jax.jit(rt.arrow_route, static_argnums=(2, 3, 4))(x, p, K, 0.7, "arrow")
  idx, w = _np_arrow(x, p, K, 0.7)
  np.testing.assert_array_equal(np.asarray(r.indices), idx)
  np.testing.assert_allclose(np.asarray(r.weights), w, rtol=1e-5)
  assert r.weights.dtype == jnp.float32
  # Sign of a prototype never matters.
  r_flip = rt.arrow_route(x, -p, K, 0.7)
  np.testing.assert_array_equal(np.asarray(r_flip.indices), idx)
  np.testing.assert_allclose(np.asarray(r_flip.weights), np.asarray(r.weights), rtol=1e-6)


def test_phatgoose_baseline_variant_matches_numpy():
  a, b = _lora(5)
  p = np.asarray(rt.arrow_prototypes(a, b))
  x = np.random.default_rng(6).normal(size=(7, D)).astype(np.float32) * 30
  r = rt.arrow_route(jnp.asarray(x, jnp.bfloat16), p, K, variant="phatgoose_baseline")
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  idx, w = _np_phatgoose_arrow(xb, p, K)
  assert r.weights.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(r.indices), idx)
  np.testing.assert_allclose(np.asarray(r.weights), w, rtol=1e-5)
  # Documented equivalence: softmax over all E then top-k renormalised equals a softmax over
  # the kept k, so the baseline is plain Arrow at temperature 10*sqrt(D), up to the 1e-6 eps.
  plain = rt.arrow_route(xb, p, K, temperature=10.0 * np.sqrt(D))
  np.testing.assert_array_equal(np.asarray(plain.indices), idx)
  np.testing.assert_allclose(np.asarray(plain.weights), np.asarray(r.weights), rtol=1e-5)
  assert np.all(np.asarray(r.weights).sum(-1) < np.asarray(plain.weights).sum(-1))


def test_bad_inputs_raise_clear_errors():
  a, b = _lora(7)
  p = np.asarray(rt.arrow_prototypes(a, b))
  x = np.ones((2, D), np.float32)
  with pytest.raises(rt.RoutingError, match="variant"):
    rt.arrow_route(x, p, K, variant="mttl")
  with pytest.raises(rt.RoutingError, match="temperature"):
    rt.arrow_route(x, p, K, temperature=0.0)
  with pytest.raises(rt.RoutingError, match="prototypes"):
    rt.arrow_route(x[:, :-1], p, K)
  with pytest.raises(rt.RoutingError, match="lora_a"):
    rt.arrow_prototypes(a, b[:, :-1])
  with pytest.raises(rt.RoutingError, match="method"):
    rt.arrow_prototypes(a, b, method="power")
