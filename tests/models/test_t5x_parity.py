"""The Flax T5.1.1 reproduces t5x's own outputs on the t5x fixture (both checkpoint formats)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

import phatgoose_jax
from phatgoose_jax.models import Transformer, greedy_decode, score_batch

FIX = "t5x_t5_1_1_tiny"


def _variables(testdata, fmt):
  config, params = phatgoose_jax.load_checkpoint(testdata / FIX / fmt / "checkpoint_0")
  return config.replace(dtype="float32"), {"params": params}


@pytest.fixture(scope="module", params=["legacy", "orbax"])
def loaded(request, testdata):
  return _variables(testdata, request.param)


@pytest.mark.parametrize("suffix", ["", "_long"])
def test_logits_and_encoder_outputs_match_t5x(loaded, testdata, suffix):
  config, variables = loaded
  batch = dict(np.load(testdata / FIX / f"batch{suffix}.npz"))
  expected = np.load(testdata / FIX / f"expected{suffix}.npz")
  model = Transformer(config)
  logits = np.asarray(model.apply(variables, batch["encoder_input_tokens"],
                                  batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                                  enable_dropout=False))
  encoded = np.asarray(model.apply(variables, batch["encoder_input_tokens"], enable_dropout=False,
                                   method=model.encode))
  dec_mask = batch["decoder_loss_weights"] > 0
  enc_mask = batch["encoder_input_tokens"] > 0
  assert np.abs(logits - expected["logits"])[dec_mask].max() <= 1e-5
  assert np.abs(encoded - expected["encoder_outputs"])[enc_mask].max() <= 1e-5
  scores = score_batch(model, variables, {k: jnp.asarray(v) for k, v in batch.items()})
  np.testing.assert_allclose(np.asarray(scores["sum"]), expected["score"], rtol=1e-5, atol=1e-4)
  lengths = batch["decoder_loss_weights"].sum(-1)
  np.testing.assert_allclose(np.asarray(scores["mean"]), expected["score"] / lengths, rtol=1e-5)


def test_greedy_tokens_match_t5x(loaded, testdata):
  config, variables = loaded
  batch = np.load(testdata / FIX / "batch.npz")
  expected = np.load(testdata / FIX / "expected.npz")
  model = Transformer(config)
  tokens = greedy_decode(model, variables, jnp.asarray(batch["encoder_input_tokens"]),
                         max_decode_length=batch["decoder_input_tokens"].shape[1])
  np.testing.assert_array_equal(np.asarray(tokens), expected["greedy_tokens"])


def test_t5x_cache_protocol_decodes_the_real_inputs(loaded, testdata):
  """t5x's EncoderDecoderModel builds the cache on all-ones dummy inputs, then passes the real
  encoder output at every step: cross-attention must use that, not the dummy encoding."""
  config, variables = loaded
  batch = np.load(testdata / FIX / "batch.npz")
  expected = np.load(testdata / FIX / "expected.npz")
  model = Transformer(config)
  inputs = jnp.asarray(batch["encoder_input_tokens"])
  b, t = batch["decoder_input_tokens"].shape
  ones = jnp.ones((b, t), jnp.int32)
  _, state = model.apply(variables, jnp.ones_like(inputs), ones, ones, decode=True,
                         enable_dropout=False, mutable=["cache"])
  cache = state["cache"]
  encoded = model.apply(variables, inputs, enable_dropout=False, method=model.encode)
  prev, out = jnp.zeros((b, 1), jnp.int32), []
  for _ in range(t):  # t5x's _compute_logits_from_slice, greedy
    logits, state = model.apply({**variables, "cache": cache}, encoded, inputs, prev, prev,
                                enable_dropout=False, decode=True, max_decode_length=t,
                                mutable=["cache"], method=model.decode)
    cache = state["cache"]
    prev = logits.argmax(-1).astype(jnp.int32)
    out.append(np.asarray(prev[:, 0]))
  tokens = np.stack(out, 1)
  want = expected["greedy_tokens"]
  for row, ref in zip(tokens, want):  # equal up to the first EOS (t5x pads after it)
    stop = int(np.argmax(ref == 1)) + 1 if (ref == 1).any() else len(ref)
    np.testing.assert_array_equal(row[:stop], ref[:stop])


def test_cached_decoding_equals_teacher_forcing_on_long_inputs(loaded, testdata):
  """Greedy tokens are the argmax of teacher-forced logits on their own prefix (all buckets)."""
  config, variables = loaded
  batch = np.load(testdata / FIX / "batch_long.npz")
  model = Transformer(config)
  enc = jnp.asarray(batch["encoder_input_tokens"])
  tokens = np.asarray(greedy_decode(model, variables, enc, max_decode_length=40, eos_id=-1))
  dec_in = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
  logits = model.apply(variables, enc, dec_in, np.ones_like(tokens), enable_dropout=False)
  np.testing.assert_array_equal(np.asarray(logits).argmax(-1), tokens)


def test_parameter_shapes_and_axes_match_golden(testdata):
  """Golden = t5x's own params_manifest.json (names, shapes, logical axes from params_axes)."""
  from flax import traverse_util
  from phatgoose_jax.models import tiny_config
  import jax
  golden = json.loads((testdata / "golden_tiny_params.json").read_text())
  model = Transformer(tiny_config())
  tok = jnp.ones((1, 3), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tok, tok, tok,
                                                enable_dropout=False))
  shapes = {"/".join(k): list(v.shape)
            for k, v in traverse_util.flatten_dict(variables["params"]).items()}
  flat_axes = traverse_util.flatten_dict(variables["params_axes"],
                                         is_leaf=lambda k, v: hasattr(v, "names"))
  axes = {"/".join(k[:-1] + (k[-1][: -len("_axes")],)): list(v.names)
          for k, v in flat_axes.items()}
  assert shapes == {p["name"]: p["shape"] for p in golden["params"]}
  assert axes == {p["name"]: p["logical_axes"] for p in golden["params"]}
