"""Batched generation equals greedy_decode; detokenisation stops at EOS."""
import jax.numpy as jnp
import numpy as np

from phatgoose_jax.evaluation import generation
from phatgoose_jax.models import greedy_decode


def test_generate_tokens_equals_greedy_decode_per_example(routed):
  model, variables = routed
  rng = np.random.default_rng(3)
  enc = np.zeros((5, 20), np.int32)  # long padded width: trimmed to a bucket inside
  for i, n in enumerate((3, 6, 2, 5, 4)):
    enc[i, :n] = rng.integers(3, 90, size=n)
    enc[i, n] = 1
  got = generation.generate_tokens(model, variables, enc, 6, batch_size=3)  # odd: padded batch
  assert got.shape == (5, 6)
  want = np.asarray(greedy_decode(model, {k: variables[k] for k in ("params", "adapters")},
                                  jnp.asarray(enc), max_decode_length=6))
  np.testing.assert_array_equal(got, want)
  assert np.any(got != 0)


class _ToyVocab:
  """Decodes ids as letters (2 -> 'c', ...), to check EOS handling without sentencepiece."""
  eos_id = 1

  def decode(self, ids):
    assert 0 not in ids and 1 not in ids
    return "".join(chr(ord("a") + i) for i in ids)


def test_detokenize_stops_at_eos_and_drops_pads():
  tokens = np.asarray([[3, 4, 1, 5, 0], [2, 0, 2, 0, 0], [1, 3, 3, 0, 0]])
  assert generation.detokenize(_ToyVocab(), tokens) == ["de", "cc", ""]


TEXTS = ["reverse red blue", "next cat dog owl", "skip fig"]  # same shapes as above: no recompile


def test_generate_texts_roundtrip(routed, sp_processor):
  model, variables = routed
  texts = generation.generate_texts(model, variables, sp_processor,
                                    TEXTS, input_length=20, max_decode_length=6, batch_size=3)
  ids = [sp_processor.encode(t) + [1] for t in TEXTS]
  tokens = generation.generate_tokens(model, variables, generation.pad_batch(ids, 20), 6)
  size = sp_processor.GetPieceSize()
  want = [sp_processor.decode([i if i < size else 2 for i in generation.strip_after_eos(t)])
          for t in tokens]
  assert texts == want
