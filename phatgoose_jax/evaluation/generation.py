"""Batched greedy generation and detokenisation (generative held-out tasks, exact match).

Decoding is `phatgoose_jax.models.greedy_decode` (t5x's ``predict_batch`` with temperature 0: key/value
cache, start token 0, argmax per step, tokens after the first EOS set to 0), which PHATGOOSE's
generative evaluations (BIG-bench, FLAN held-out; official code: HF ``generate`` with
``num_beams=1``) also use. Batches are padded to one fixed batch size and encoder inputs trimmed to a
power-of-two bucket, so a dataset compiles the decoder loop a handful of times at most; trimming
trailing pads is exact (pad keys are masked).

Letters: N examples, B batch, L encoder length, T decoded tokens.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from phatgoose_jax.evaluation import scoring
from phatgoose_jax.models.decoding import greedy_decode
from phatgoose_jax.training import partitioning


def generate_tokens(model: nn.Module, variables: Mapping[str, Any], encoder_input_tokens: Any,
                    max_decode_length: int, *, batch_size: Optional[int] = None, eos_id: int = 1,
                    site_inputs: scoring.SiteInputs = None, trim: bool = True) -> np.ndarray:
  """Greedy tokens [N, T] for ``encoder_input_tokens`` [N, L].

  Args:
    model: a `Transformer` (any site factory).
    variables: model variables (axes / cache / intermediates collections are ignored).
    encoder_input_tokens: [N, L] int, EOS-terminated, 0 = pad.
    max_decode_length: T.
    batch_size: rows per decoding call (default N); the last batch is zero-padded.
    eos_id: EOS id; positions after the first EOS are 0.
    site_inputs: per-example extras, leaves [N, ...].
    trim: cut trailing pad columns of the inputs to a power-of-two bucket (per dataset).

  Returns:
    numpy int32 [N, T].
  """
  enc = np.asarray(encoder_input_tokens).astype(np.int32)
  if enc.ndim != 2:
    raise scoring.ScoringError(f"generate_tokens: encoder_input_tokens must be [N, L], got "
                               f"{enc.shape}")
  if not isinstance(max_decode_length, int) or max_decode_length < 1:
    raise scoring.ScoringError(f"generate_tokens: max_decode_length must be a positive int, got "
                               f"{max_decode_length!r}")
  n = enc.shape[0]
  inputs = scoring.check_site_inputs(site_inputs, n, "generate_tokens")
  bsz = n if batch_size is None else int(batch_size)
  if bsz < 1:
    raise scoring.ScoringError(f"generate_tokens: batch_size must be >= 1, got {batch_size}")
  bsz = min(bsz, max(n, 1))
  bsz = partitioning.round_up_to_active_batch_shards(bsz)  # under a mesh: data-shard multiple
  if trim:
    enc = enc[:, :scoring.bucket_size(max(scoring.used_length(enc), 1), cap=enc.shape[1])]
  variables = scoring.model_variables(variables)
  out = np.zeros((n, max_decode_length), np.int32)
  for start in range(0, n, bsz):
    stop = min(start + bsz, n)
    batch = scoring.pad_rows(enc[start:stop], bsz)
    extra = {k: jnp.asarray(scoring.pad_rows(v[start:stop], bsz))
             for k, v in inputs.items()}
    tokens = greedy_decode(model, variables, jnp.asarray(batch), max_decode_length=max_decode_length,
                           eos_id=eos_id, site_inputs=extra or None)  # [B, T]
    out[start:stop] = np.asarray(tokens)[:stop - start]
  return out


def strip_after_eos(ids: Sequence[int], eos_id: int = 1) -> list[int]:
  """Ids before the first EOS, without pads (0)."""
  out = []
  for t in ids:
    t = int(t)
    if t == eos_id:
      break
    if t != 0:
      out.append(t)
  return out


def detokenize(vocabulary: Any, tokens: Any, eos_id: Optional[int] = None) -> list[str]:
  """Decodes each row of ``tokens`` [N, T] up to its first EOS with ``vocabulary``.

  Args:
    vocabulary: a seqio vocabulary or a ``sentencepiece.SentencePieceProcessor``.
    tokens: [N, T] ids.
    eos_id: default: the vocabulary's (1 for T5).
  """
  if eos_id is None:
    eos_id = getattr(vocabulary, "eos_id", 1)
    eos_id = int(eos_id() if callable(eos_id) else eos_id)
  decode = getattr(vocabulary, "decode", None)
  if decode is None:
    raise scoring.ScoringError(f"detokenize: {type(vocabulary).__name__} has no decode()")
  # A raw SentencePieceProcessor rejects ids past its pieces (the model's vocab is padded, e.g.
  # 32128 > 32100): map them to UNK as seqio's vocabularies do.
  size = vocabulary.GetPieceSize() if hasattr(vocabulary, "GetPieceSize") else None
  texts = []
  for row in np.asarray(tokens):
    ids = strip_after_eos(row, eos_id)
    if size is not None:
      ids = [i if i < size else vocabulary.unk_id() for i in ids]
    text = decode(ids)
    texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
  return texts


def encode_texts(vocabulary: Any, texts: Sequence[Any], max_length: Optional[int] = None,
                 eos_id: int = 1) -> list[list[int]]:
  """Tokenises strings (or passes id lists through), appending EOS; with ``max_length``, longer ones
  keep their first ``max_length - 1`` ids and EOS (seqio's ``append_eos_after_trim``)."""
  if max_length is not None and max_length < 1:
    raise scoring.ScoringError(f"encode_texts: max_length must be >= 1, got {max_length}")
  out = []
  for text in texts:
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    ids = [int(t) for t in vocabulary.encode(text)] if isinstance(text, str) else list(text)
    if max_length is not None:
      ids = ids[:max_length - 1]
    out.append(ids + [eos_id])
  return out


def pad_batch(rows: Sequence[Sequence[int]], length: Optional[int] = None) -> np.ndarray:
  """Zero-pads id lists into [N, length] (default: the longest row)."""
  length = max((len(r) for r in rows), default=1) if length is None else int(length)
  out = np.zeros((len(rows), max(length, 1)), np.int32)
  for i, r in enumerate(rows):
    if len(r) > length:
      raise scoring.ScoringError(f"pad_batch: row {i} has {len(r)} ids > length {length}")
    out[i, :len(r)] = r
  return out


def generate_texts(model: nn.Module, variables: Mapping[str, Any], vocabulary: Any,
                   inputs: Sequence[Any], *, input_length: int, max_decode_length: int,
                   batch_size: int = 16, site_inputs: scoring.SiteInputs = None) -> list[str]:
  """Greedy outputs, as text, for input strings.

  Args:
    model, variables: the model.
    vocabulary: encodes ``inputs`` and decodes outputs (T5 ids: pad 0, EOS 1).
    inputs: N strings (or id lists without EOS).
    input_length: L; longer inputs are truncated keeping EOS.
    max_decode_length: T.
    batch_size: examples per decoding call.
    site_inputs: per-example extras, leaves [N, ...].
  """
  ids = encode_texts(vocabulary, inputs, input_length)
  tokens = generate_tokens(model, variables, pad_batch(ids, input_length), max_decode_length,
                           batch_size=batch_size, site_inputs=site_inputs)
  return detokenize(vocabulary, tokens)
