"""The Flax T5.1.1 reproduces HF transformers' outputs on the HF fixture (safetensors import)."""
import jax.numpy as jnp
import numpy as np
import pytest

import phatgoose_jax
from phatgoose_jax.models import Transformer, sequence_scores

FIX = "hf_t5_1_1_tiny"


@pytest.fixture(scope="module")
def loaded(testdata):
  config, params = phatgoose_jax.load_checkpoint(testdata / FIX / "model")
  return config.replace(dtype="float32"), {"params": params}


def _run(config, variables, batch):
  model = Transformer(config)
  mask = batch["attention_mask"]
  # HF's labels use 0 for pads, like t5x's decoder_target_tokens.
  logits = model.apply(variables, batch["input_ids"] * mask, batch["decoder_input_ids"],
                       batch["labels"], enable_dropout=False)
  encoded = model.apply(variables, batch["input_ids"] * mask, enable_dropout=False,
                        method=model.encode)
  return np.asarray(logits), np.asarray(encoded)


def test_config_inferred_from_hf_json(loaded):
  config, _ = loaded
  assert (config.vocab_size, config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim,
          config.num_encoder_layers, config.num_decoder_layers) == (96, 24, 3, 8, 40, 2, 3)
  assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding


@pytest.mark.parametrize("suffix", ["", "_long"])
def test_logits_and_encoder_match_hf(loaded, testdata, suffix):
  config, variables = loaded
  batch = dict(np.load(testdata / FIX / f"batch{suffix}.npz"))
  expected = np.load(testdata / FIX / f"expected{suffix}.npz")
  logits, encoded = _run(config, variables, batch)
  dec_mask = batch["labels"] > 0
  enc_mask = batch["attention_mask"] > 0
  assert np.abs(logits - expected["base_logits"])[dec_mask].max() <= 1e-5
  assert np.abs(encoded - expected["encoder_last_hidden_state"])[enc_mask].max() <= 1e-5


def test_mean_nll_matches_hf(loaded, testdata):
  config, variables = loaded
  batch = dict(np.load(testdata / FIX / "batch.npz"))
  expected = np.load(testdata / FIX / "expected.npz")
  logits, _ = _run(config, variables, batch)
  scores = sequence_scores(jnp.asarray(logits), jnp.asarray(batch["labels"]))
  np.testing.assert_allclose(-np.asarray(scores["mean"]), expected["nll_base"], rtol=1e-5)
