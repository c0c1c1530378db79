"""A single LoRA expert equals a merged base kernel; the PHATGOOSE gate scales it per token."""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import adapters as ad
from phatgoose_jax.models import Transformer, tiny_config

R = 3
CFG = tiny_config()
ENC = jnp.array([[5, 7, 9, 3, 0], [4, 8, 2, 0, 0]], jnp.int32)
DEC_IN = jnp.array([[0, 6, 7, 3], [0, 9, 5, 2]], jnp.int32)
DEC_TGT = jnp.array([[6, 7, 3, 1], [9, 5, 2, 0]], jnp.int32)
SITES = ("decoder/layers_1/encoder_decoder_attention/key", "encoder/layers_0/mlp/wi_1")


def _logits(model, variables):
  return model.apply(variables, ENC, DEC_IN, DEC_TGT, enable_dropout=False)


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _with(tree, updates):
  """Copy of nested dict ``tree`` with ``{'a/b/c': value}`` replaced."""
  flat = traverse_util.flatten_dict(dict(tree), sep="/")
  for k, v in updates.items():
    assert k in flat, k
    flat[k] = v
  return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def lora():
  model = ad.build_model(CFG, ad.AdapterConfig(rank=R))
  return model, ad.init_variables(model, jax.random.PRNGKey(0))


def test_zero_b_equals_base_model_exactly(lora):
  model, v = lora
  a = _get(v["adapters"], SITES[0] + "/lora_a")
  assert np.any(a)  # the A side is random, only B is zero
  base = _logits(Transformer(CFG), {"params": v["params"]})
  np.testing.assert_array_equal(_logits(model, v), base)


def test_random_lora_equals_merged_kernel(lora):
  model, v = lora
  rng = np.random.default_rng(0)
  adapter_updates, kernel_updates = {}, {}
  for site in SITES:
    w = np.asarray(_get(v["params"], site + "/kernel"))
    a = rng.normal(size=(w.shape[0], R)).astype(np.float32) * 0.5
    b = rng.normal(size=(R, w.shape[1])).astype(np.float32) * 0.5
    adapter_updates[site + "/lora_a"] = jnp.asarray(a)
    adapter_updates[site + "/lora_b"] = jnp.asarray(b)
    merged = w.astype(np.float64) + (a.astype(np.float64) @ b) / R  # scale = 1/R by default
    kernel_updates[site + "/kernel"] = jnp.asarray(merged, jnp.float32)
  adapted = _logits(model, {**v, "adapters": _with(v["adapters"], adapter_updates)})
  merged = _logits(Transformer(CFG), {"params": _with(v["params"], kernel_updates)})
  base = _logits(Transformer(CFG), {"params": v["params"]})
  assert np.max(np.abs(np.asarray(adapted) - np.asarray(base))) > 1e-2  # the update matters
  np.testing.assert_allclose(adapted, merged, rtol=1e-5, atol=1e-5)


def _site_vars(module, x, rng, **updates):
  variables = module.init({"params": jax.random.PRNGKey(1)}, x)
  return variables, {**variables, "adapters": {**variables["adapters"], **updates}}


def test_lora_site_explicit_scale_and_dtype():
  d, f = 13, 7
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, d)), jnp.float32)
  rng = np.random.default_rng(2)
  a = rng.normal(size=(d, R)).astype(np.float32)
  b = rng.normal(size=(R, f)).astype(np.float32)
  site = ad.LoraSite(features=f, kernel_axes=("embed", "mlp"), site="s", rank=R, scale=0.7)
  v0, v = _site_vars(site, x, rng, lora_a=jnp.asarray(a), lora_b=jnp.asarray(b))
  w = np.asarray(v0["params"]["kernel"], np.float64)
  x64 = np.asarray(x, np.float64)
  expected = x64 @ w + 0.7 * (x64 @ a @ b)
  np.testing.assert_allclose(site.apply(v, x), expected, rtol=1e-5, atol=1e-5)
  half = ad.LoraSite(features=f, kernel_axes=("embed", "mlp"), site="s", rank=R,
                     dtype=jnp.bfloat16)
  assert half.apply(v, x).dtype == jnp.bfloat16


def test_gate_site_is_base_plus_sigmoid_times_delta():
  d, f = 13, 7
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 5, d)), jnp.float32)
  site = ad.GatedLoraSite(features=f, kernel_axes=("embed", "joined_kv"), site="s", rank=R)
  v0 = site.init({"params": jax.random.PRNGKey(1)}, x)
  assert v0["adapters"]["gate"].shape == (d,) and not np.any(v0["adapters"]["gate"])
  a = rng.normal(size=(d, R)).astype(np.float32)
  b = rng.normal(size=(R, f)).astype(np.float32)
  g = rng.normal(size=(d,)).astype(np.float32)
  w = np.asarray(v0["params"]["kernel"], np.float64)
  x64 = np.asarray(x, np.float64)
  delta = (x64 @ a @ b) / R
  base = x64 @ w
  for gate in (np.zeros_like(g), g):
    v = {**v0, "adapters": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b),
                            "gate": jnp.asarray(gate)}}
    prob = 1.0 / (1.0 + np.exp(-(x64 @ gate.astype(np.float64))))  # [2, 5] per token
    expected = base + prob[..., None] * delta
    np.testing.assert_allclose(site.apply(v, x), expected, rtol=1e-5, atol=1e-5)
  # The gate really varies per token (else this would not test per-token gating).
  assert np.ptp(1.0 / (1.0 + np.exp(-(x64 @ g)))) > 0.3
