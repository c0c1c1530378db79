"""Tests for phatgoose_jax.data.vocab."""

import gin
import pytest
import sentencepiece as spm

from phatgoose_jax.data import synthetic
from phatgoose_jax.data import vocab as vocab_lib


def test_training_is_deterministic(tmp_path, corpus, sp_model_path):
  a = vocab_lib.build_sentencepiece_model(corpus, tmp_path / "a.model", 96)
  b = vocab_lib.build_sentencepiece_model(list(corpus), None, 96)
  assert a == b
  assert (tmp_path / "a.model").read_bytes() == a
  with open(sp_model_path, "rb") as f:
    assert f.read() == a  # The session fixture used the same texts/flags.
  c = vocab_lib.build_sentencepiece_model(corpus[:-50], None, 96)
  assert c != a  # Different texts -> different model (so the check can fail).


def test_t5_special_ids(sp_model_path, vocabulary):
  sp = spm.SentencePieceProcessor(model_file=sp_model_path)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.id_to_piece(0) == "<pad>" and sp.id_to_piece(1) == "</s>"
  assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)


def test_round_trip_and_lexicon_covered(vocabulary):
  words = [w for ws in synthetic.FAMILIES.values() for w in ws]
  words += list(synthetic.SKILLS) + [synthetic.SEPARATOR]
  text = " ".join(words)
  ids = vocabulary.encode(text)
  assert vocabulary.unk_id not in ids
  assert vocabulary.decode(ids) == text
  ex = synthetic.generate_examples("compose2_gen", "test", 3, seed=1)[0]
  assert vocabulary.decode(vocabulary.encode(ex["inputs"])) == ex["inputs"]


def test_extra_ids(sp_model_path):
  base = vocab_lib.get_vocabulary(sp_model_path)
  more = vocab_lib.get_vocabulary(sp_model_path, extra_ids=4)
  assert more.vocab_size == base.vocab_size + 4


def test_missing_and_invalid_files_name_the_path(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(vocab_lib.VocabularyError, match="nope.model"):
    vocab_lib.get_vocabulary(str(missing))
  bad = tmp_path / "garbage.model"
  bad.write_bytes(b"not a sentencepiece proto")
  with pytest.raises(ValueError, match="garbage.model"):
    vocab_lib.get_vocabulary(str(bad))
  with pytest.raises(vocab_lib.VocabularyError, match="vocab_size"):
    vocab_lib.build_sentencepiece_model(["a b"], None, vocab_size=2)


def test_wrong_special_ids_rejected(tmp_path, corpus):
  path = tmp_path / "bos.model"
  vocab_lib.build_sentencepiece_model(corpus, path, 96, pad_id=3, bos_id=0)
  with pytest.raises(vocab_lib.VocabularyError, match="bos.model"):
    vocab_lib.get_vocabulary(str(path))


def test_gin_vocabulary_macro(sp_model_path):

  @gin.configurable
  def consume_vocab(vocabulary=gin.REQUIRED):
    return vocabulary

  with gin.unlock_config():
    gin.parse_config([
        f"phatgoose_jax.data.get_vocabulary.path = '{sp_model_path}'",
        "VOCABULARY = @phatgoose_jax.data.get_vocabulary()",
        "consume_vocab.vocabulary = %VOCABULARY",
    ])
  try:
    v = consume_vocab()
    assert v.eos_id == 1
    assert v.decode(v.encode("red cat")) == "red cat"
  finally:
    gin.clear_config()
