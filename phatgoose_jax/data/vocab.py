"""SentencePiece vocabularies with T5's special ids (pad=0, eos=1, unk=2).

T5 / T5.1.1 (Raffel et al. 2020; t5x's `VOCABULARY` gin macro) use a
SentencePiece model whose ids 0, 1, 2 are PAD, EOS and UNK and which has no BOS.
`build_sentencepiece_model` trains a tiny model with exactly these ids for the
offline demo and tests; `get_vocabulary` wraps any such model file as a
`seqio.SentencePieceVocabulary` and is gin-configurable, so a gin file can say

  VOCABULARY = @phatgoose_jax.data.get_vocabulary()
  phatgoose_jax.data.get_vocabulary.path = "/path/to/spiece.model"

No tensors here, so no einsum letters are used.
"""

from __future__ import annotations

import io
import os
from typing import Any, Iterable, Optional

import gin
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class VocabularyError(ValueError):
  """A vocabulary file is missing or is not a usable SentencePiece model."""


def build_sentencepiece_model(
    texts: Iterable[str],
    model_path: Optional[str | os.PathLike[str]],
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> bytes:
  """Trains a small SentencePiece model with T5 special ids, deterministically.

  Training runs on one thread with sentence shuffling off and a fixed random
  seed, so the same `texts` (in the same order) give the same model bytes.

  Args:
    texts: training sentences (one string each; empty strings are skipped).
    model_path: where to write the `.model` file (parent dirs are created); None
      to only return the bytes.
    vocab_size: requested vocabulary size (a soft limit: tiny corpora may give
      fewer pieces).
    model_type: "unigram" (T5's choice) or "bpe".
    character_coverage: fraction of characters covered by the model.
    seed: seed of SentencePiece's random generator.
    **trainer_kwargs: extra `spm.SentencePieceTrainer.train` flags (override).

  Returns:
    The serialized model proto.
  """
  if model_type not in ("unigram", "bpe"):
    raise VocabularyError(
        f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
  if vocab_size < 8:
    raise VocabularyError(f"vocab_size must be >= 8, got {vocab_size}")
  sentences = [t for t in texts if t and t.strip()]
  if not sentences:
    raise VocabularyError("texts is empty: nothing to train the vocabulary on")
  writer = io.BytesIO()
  options = dict(
      model_type=model_type,
      vocab_size=vocab_size,
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      bos_id=-1,
      character_coverage=character_coverage,
      num_threads=1,
      shuffle_input_sentence=False,
      input_sentence_size=0,
      hard_vocab_limit=False,
      minloglevel=2,
  )
  options.update(trainer_kwargs)
  spm.set_random_generator_seed(seed)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=writer, **options)
  model = writer.getvalue()
  if model_path is not None:
    model_path = os.fspath(model_path)
    parent = os.path.dirname(model_path)
    if parent:
      os.makedirs(parent, exist_ok=True)
    tmp = model_path + ".tmp"
    with open(tmp, "wb") as f:
      f.write(model)
    os.replace(tmp, model_path)
  return model


def check_sentencepiece_model(path: str | os.PathLike[str]) -> spm.SentencePieceProcessor:
  """Loads `path` and checks it is a SentencePiece model with T5 ids.

  Raises:
    VocabularyError: naming `path` if the file is missing, unreadable, or its
      pad/eos/unk ids are not 0/1/2.
  """
  path = os.fspath(path)
  if not path:
    raise VocabularyError("vocabulary path is empty (set get_vocabulary.path)")
  if not os.path.isfile(path):
    raise VocabularyError(f"vocabulary file not found: {path}")
  sp = spm.SentencePieceProcessor()
  try:
    with open(path, "rb") as f:
      sp.LoadFromSerializedProto(f.read())
  except Exception as e:  # sentencepiece raises RuntimeError/OSError.
    raise VocabularyError(
        f"{path} is not a SentencePiece model ({type(e).__name__}: {e})") from e
  ids = (sp.pad_id(), sp.eos_id(), sp.unk_id())
  if ids != (PAD_ID, EOS_ID, UNK_ID):
    raise VocabularyError(
        f"{path}: expected T5 ids pad/eos/unk = 0/1/2, got {ids[0]}/{ids[1]}/"
        f"{ids[2]}")
  return sp


@gin.configurable(module="phatgoose_jax.data")
def get_vocabulary(path: str = gin.REQUIRED, extra_ids: int = 0):
  """Returns a `seqio.SentencePieceVocabulary` for a T5-id SentencePiece model.

  Args:
    path: the `.model` file (gin: `get_vocabulary.path`).
    extra_ids: number of T5 sentinel ids appended after the model's pieces.

  Raises:
    VocabularyError: naming `path` when it is missing or not a valid model.
  """
  if path is gin.REQUIRED or path is None:
    raise VocabularyError("get_vocabulary.path is not set")
  if extra_ids < 0:
    raise VocabularyError(f"extra_ids must be >= 0, got {extra_ids}")
  check_sentencepiece_model(path)
  import seqio  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  return seqio.SentencePieceVocabulary(os.fspath(path), extra_ids=extra_ids)
