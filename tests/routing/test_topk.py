"""`routing.top_k` equals `jax.lax.top_k` (values, indices, order, ties, -inf, NaN, gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax.routing import top_k
from phatgoose_jax.routing.topk import SMALL_K


def _check(x, k):
  want_v, want_i = jax.lax.top_k(x, k)
  got_v, got_i = jax.jit(top_k, static_argnums=1)(x, k)
  assert got_i.dtype == jnp.int32 and got_v.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
  np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))


@pytest.mark.parametrize("k", [1, 2, 3, SMALL_K, SMALL_K + 1])
def test_matches_lax_top_k_on_random_values_with_leading_dims(k):
  x = jax.random.normal(jax.random.PRNGKey(k), (3, 7, 13))
  _check(x, k)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ties_go_to_the_lowest_index_like_lax_top_k(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 3, size=(64, 5)), dtype)  # many ties
  for k in (1, 2, 3, 5):
    _check(x, k)


def test_infinities_and_nans_follow_lax_top_k():
  nan, inf = jnp.nan, jnp.inf
  x = jnp.array([[1., nan, 3., 2., -inf],
                 [-inf, -inf, -inf, -inf, -inf],
                 [nan, nan, 0., 1., inf],
                 [inf, 2., inf, -inf, 0.]], jnp.float32)
  for k in (1, 2, 3, 4):
    _check(x, k)


def test_gradient_reaches_the_selected_entries_only_like_lax_top_k():
  x = jax.random.normal(jax.random.PRNGKey(3), (6, 13))
  coeff = jnp.arange(1.0, 3.0)

  def loss(fn, v):
    return jnp.sum(fn(v, 2)[0] * coeff)

  got = jax.grad(lambda v: loss(top_k, v))(x)
  want = jax.grad(lambda v: loss(jax.lax.top_k, v))(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_k_outside_the_axis_is_refused():
  with pytest.raises(ValueError, match="k must be in"):
    top_k(jnp.zeros((2, 3)), 4)
