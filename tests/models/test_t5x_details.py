"""Details where the T5 follows t5x: encoder-output dropout, attention init, tied logits dtype,
out-of-range ids, masked -100 targets, packed-input checks."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax.models import Transformer, cross_entropy_loss, tiny_config
from phatgoose_jax.models import layers
from phatgoose_jax.models.scoring import sequence_scores

ENC = jnp.array([[5, 7, 9, 3, 0], [4, 8, 2, 6, 1]], jnp.int32)
DEC = jnp.array([[0, 6, 7, 3], [0, 9, 5, 2]], jnp.int32)


def _model(**kw):
  cfg = dataclasses.replace(tiny_config(), **kw)
  model = Transformer(cfg)
  variables = model.init(jax.random.PRNGKey(0), ENC, DEC, DEC, enable_dropout=False)
  return cfg, model, variables


def test_encoder_output_dropout_is_not_broadcast_over_length():
  _, model, variables = _model(dropout_rate=0.5)
  enc = model.apply(variables, ENC, enable_dropout=True, method=model.encode,
                    rngs={"dropout": jax.random.PRNGKey(3)})
  zeros = np.asarray(enc[0]) == 0  # [L, D]
  assert zeros.any() and not all((zeros[i] == zeros[0]).all() for i in range(1, zeros.shape[0]))


def test_attention_kernels_use_a_plain_normal_init():
  z = layers.attention_kernel_init(jax.random.PRNGKey(0), (512, 512), jnp.float32) * np.sqrt(512)
  assert float(jnp.max(jnp.abs(z))) > 2.5  # a truncated normal stops at ~2.27
  _, _, variables = _model()
  assert "kernel" in variables["params"]["encoder"]["layers_0"]["attention"]["query"]


def test_tied_logits_are_float32_under_bfloat16_compute():
  _, model, variables = _model(logits_via_embedding=True, dtype="bfloat16")
  logits = model.apply(variables, ENC, DEC, DEC, enable_dropout=False)
  assert logits.dtype == jnp.float32


def test_out_of_range_ids_and_masked_minus_100_targets_stay_finite():
  cfg, model, variables = _model()
  bad = ENC.at[0, 1].set(cfg.vocab_size + 5)  # embeds to zeros, as t5x's one-hot lookup
  assert np.isfinite(np.asarray(model.apply(variables, bad, DEC, DEC, enable_dropout=False))).all()
  logits = model.apply(variables, ENC, DEC, DEC, enable_dropout=False)
  targets = DEC.at[:, -1].set(-100)
  weights = (targets > 0).astype(jnp.float32)
  loss, count = cross_entropy_loss(logits, targets, weights)
  want, _ = cross_entropy_loss(logits[:, :-1], DEC[:, :-1], weights[:, :-1])
  assert np.isfinite(loss) and float(count) == float(weights.sum())
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  scores = sequence_scores(logits, targets, weights)
  assert np.isfinite(np.asarray(scores["sum"])).all()


def test_packed_inputs_are_checked_as_t5x():
  _, model, variables = _model()
  seg = jnp.ones_like(ENC)
  with pytest.raises(ValueError, match="decoder_segment_ids"):
    model.apply(variables, ENC, DEC, DEC, seg, None, enable_dropout=False)
  with pytest.raises(ValueError, match="decode=True"):
    model.apply(variables, ENC, DEC, DEC, seg, jnp.ones_like(DEC), enable_dropout=False,
                decode=True, mutable=["cache"])
