"""Structure and numerics of the Transformer beyond fixture parity: sites, dtypes, dropout."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax.models import Transformer, layers, tiny_config


def _tokens(seed, shape, vocab=96):
  rng = np.random.RandomState(seed)
  return jnp.asarray(rng.randint(2, vocab, size=shape), jnp.int32)


def test_site_factory_sees_every_linear_site_by_name():
  seen = []

  def recording_factory(spec, name):
    seen.append((spec.site, spec.features, spec.kernel_axes))
    return layers.dense_site(spec, name)

  cfg = tiny_config()
  model = Transformer(cfg, site_factory=recording_factory)
  tok = _tokens(0, (1, 4))
  variables = model.init(jax.random.PRNGKey(0), tok, tok, tok, enable_dropout=False)
  sites = {s for s, _, _ in seen}
  # encoder: 4 attention + 3 mlp per layer; decoder: 4 self + 4 cross + 3 mlp per layer.
  assert len(sites) == 2 * 7 + 3 * 11
  assert "decoder/layers_2/encoder_decoder_attention/key" in sites
  assert "encoder/layers_1/mlp/wi_0" in sites
  # Every site name is the path of a kernel in the base tree.
  from flax import traverse_util
  kernels = {"/".join(k[:-1]) for k in traverse_util.flatten_dict(variables["params"])
             if k[-1] == "kernel"}
  assert sites == kernels - {"decoder/logits_dense"}
  feats = {s: f for s, f, _ in seen}
  assert feats["encoder/layers_0/mlp/wi_1"] == 40 and feats["encoder/layers_0/mlp/wo"] == 24


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = tiny_config(dtype="bfloat16")
  model = Transformer(cfg)
  tok = _tokens(1, (2, 5))
  variables = model.init(jax.random.PRNGKey(0), tok, tok, tok, enable_dropout=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables["params"]))
  logits = model.apply(variables, tok, tok, tok, enable_dropout=False)
  assert logits.dtype == jnp.float32  # logits_dense runs in float32 as in t5x
  ref = Transformer(tiny_config()).apply(variables, tok, tok, tok, enable_dropout=False)
  assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.25  # bf16 close, not equal
  assert not np.array_equal(np.asarray(logits), np.asarray(ref))


def test_dropout_only_when_enabled():
  cfg = tiny_config(dropout_rate=0.3)
  model = Transformer(cfg)
  tok = _tokens(2, (2, 6))
  variables = model.init(jax.random.PRNGKey(0), tok, tok, tok, enable_dropout=False)
  a = model.apply(variables, tok, tok, tok, enable_dropout=False)
  b = model.apply(variables, tok, tok, tok, enable_dropout=False)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = model.apply(variables, tok, tok, tok, enable_dropout=True,
                  rngs={"dropout": jax.random.PRNGKey(1)})
  d = model.apply(variables, tok, tok, tok, enable_dropout=True,
                  rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(np.asarray(c), np.asarray(a))
  assert not np.allclose(np.asarray(c), np.asarray(d))


def test_padding_does_not_change_unpadded_outputs():
  cfg = tiny_config()
  model = Transformer(cfg)
  enc = _tokens(3, (1, 6))
  dec = _tokens(4, (1, 4))
  variables = model.init(jax.random.PRNGKey(0), enc, dec, dec, enable_dropout=False)
  short = model.apply(variables, enc, dec, dec, enable_dropout=False)
  enc_p = jnp.pad(enc, ((0, 0), (0, 3)))
  dec_p = jnp.pad(dec, ((0, 0), (0, 2)))
  long = model.apply(variables, enc_p, dec_p, dec_p, enable_dropout=False)
  np.testing.assert_allclose(np.asarray(long)[:, :4], np.asarray(short), rtol=1e-5, atol=1e-5)


def test_config_rejects_bad_fields():
  with pytest.raises(ValueError, match="emb_dim"):
    tiny_config(emb_dim=0)
  with pytest.raises(ValueError, match="mlp_activations"):
    from phatgoose_jax.models.layers import activation
    activation("gelu2")
