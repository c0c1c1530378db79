"""Batched rank classification: encode each input once, score every answer choice.

Rank classification (T0, Sanh et al. 2022; PHATGOOSE, Muqeeth et al. 2024, sec. 4.1) scores every
answer choice of an example by the model's log-likelihood of the choice's tokens given the input and
predicts the highest-scoring choice. As the official PHATGOOSE code
(``multiple_choice_by_perplexity(length_normalization=True)`` in r-three/phatgoose,
``src/models/interface_mixin.py``), the score is length-normalised: the mean token log-likelihood of
the choice INCLUDING its EOS token, pad positions excluded. (The official code divides by
``length + 1e-6``; we divide by ``max(length, 1)``, identical for any non-empty choice.) The summed
log-likelihood (t5x's ``score_batch`` convention) is returned too.

Efficiency: the encoder runs once per distinct input; its output (and the per-example
``site_inputs``, e.g. ``expert_weights`` [B, E]) is gathered for every (example, choice) row before
the teacher-forced decoder pass. Everything runs in one jitted function whose shapes are padded to
buckets (batch rows, unique inputs, encoder length, target length), so a dataset compiles a handful
of times at most, not once per batch. Trailing pads are trimmed to the bucket: this is exact because
pad positions are masked as attention keys and excluded from the scores.

Letters: B examples, C answer choices, N rows (example, choice), U distinct encoder inputs,
L encoder length, T target length, D model width, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax.models.scoring import sequence_scores
from phatgoose_jax.training import partitioning

Array = jax.Array
SiteInputs = Optional[Mapping[str, Any]]

# Collections never passed to the model when scoring/decoding.
_DROPPED_COLLECTIONS = ("cache", "intermediates")


class ScoringError(ValueError):
  """Bad shapes or arguments given to the choice scorer."""


def model_variables(variables: Mapping[str, Any]) -> dict:
  """The collections the model reads (drops ``*_axes``, ``cache`` and ``intermediates``)."""
  if "params" not in variables:
    raise ScoringError(f"variables must hold a 'params' collection, got {sorted(variables)}")
  return {k: v for k, v in variables.items()
          if not k.endswith("_axes") and k not in _DROPPED_COLLECTIONS}


def bucket_size(n: int, cap: Optional[int] = None, minimum: int = 8) -> int:
  """The smallest power of two >= max(n, minimum), capped at ``cap`` (which must be >= n)."""
  n = int(n)
  size = max(int(minimum), 1)
  while size < n:
    size *= 2
  if cap is not None:
    if n > cap:
      raise ScoringError(f"bucket_size: {n} exceeds the cap {cap}")
    size = min(size, int(cap))
  return size


def check_site_inputs(site_inputs: SiteInputs, rows: int, where: str) -> dict:
  """Site inputs as a dict of numpy arrays with leading dim ``rows``."""
  if not site_inputs:
    return {}
  out = {}
  for key, value in site_inputs.items():
    arr = np.asarray(value)
    if arr.ndim == 0 or arr.shape[0] != rows:
      raise ScoringError(f"{where}: site_inputs[{key!r}] must have leading dim {rows} (one row "
                         f"per example), got shape {tuple(arr.shape)}")
    out[key] = arr
  return out


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Zero-pads the leading dim of ``x`` to ``rows``."""
  if x.shape[0] == rows:
    return x
  pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
  return np.pad(x, pad)


def shift_right(targets: np.ndarray) -> np.ndarray:
  """Decoder inputs [..., T] for ``targets`` [..., T]: BOS (0) then targets[:-1] (t5x/seqio)."""
  out = np.zeros_like(targets)
  out[..., 1:] = targets[..., :-1]
  return out


def used_length(tokens: np.ndarray) -> int:
  """1 + the last non-pad position over all rows (0 when all pad)."""
  nonzero = np.nonzero(np.any(tokens != 0, axis=tuple(range(tokens.ndim - 1))))[0]
  return int(nonzero[-1]) + 1 if nonzero.size else 0


@functools.partial(jax.jit, static_argnames=("model",))
def _score_rows_jit(model: nn.Module, variables: Mapping[str, Any],
                    encoder_input_tokens: Array, row_source: Array,
                    decoder_input_tokens: Array, decoder_target_tokens: Array,
                    decoder_loss_weights: Array, site_inputs: Mapping[str, Array]) -> dict:
  """Encodes U inputs once, gathers them for N rows, scores the rows' targets.

  Args:
    model: a `Transformer`.
    variables: model collections.
    encoder_input_tokens: [U, L].
    row_source: [N] int, the input (row of ``encoder_input_tokens``) of each row.
    decoder_input_tokens, decoder_target_tokens, decoder_loss_weights: [N, T].
    site_inputs: per-input extras, leaves [U, ...].
  Returns:
    sequence_scores dict, leaves [N].
  """
  site_inputs = dict(site_inputs) if site_inputs else None
  encoded = model.apply(variables, encoder_input_tokens, enable_dropout=False,
                        site_inputs=site_inputs, method=model.encode)  # [U, L, D]
  take = lambda x: jnp.take(x, row_source, axis=0)
  row_inputs = jax.tree.map(take, site_inputs) if site_inputs else None
  logits = model.apply(variables, take(encoded), take(encoder_input_tokens), decoder_input_tokens,
                       decoder_target_tokens, enable_dropout=False, site_inputs=row_inputs,
                       method=model.decode)  # [N, T, V]
  return sequence_scores(logits, decoder_target_tokens, decoder_loss_weights)


def score_rows(model: nn.Module, variables: Mapping[str, Any], encoder_input_tokens: Any,
               decoder_target_tokens: Any, site_inputs: SiteInputs = None, *,
               decoder_loss_weights: Any = None, row_source: Any = None,
               pad_rows_to: Optional[int] = None, dedup: bool = True,
               trim: bool = True) -> dict[str, np.ndarray]:
  """Scores N (input, target) rows, running the encoder once per distinct input.

  Args:
    model: a `Transformer` (any site factory: base, LoRA, routed library).
    variables: ``{'params': ..., ['adapters': ...]}`` (axes / cache collections are ignored).
    encoder_input_tokens: [N, L] int (0 = pad), or [U, L] together with ``row_source``.
    decoder_target_tokens: [N, T] int, EOS-terminated, 0 = pad.
    site_inputs: per-row (or per-input, with ``row_source``) extras, leaves [N or U, ...].
    decoder_loss_weights: [N, T]; default ``targets > 0`` (EOS included, pads excluded).
    row_source: [N] int, the input of each row; None dedups identical rows of
      (``encoder_input_tokens``, ``site_inputs``) when ``dedup``, else one input per row.
    pad_rows_to: pad N to this many rows (a fixed batch size: one compilation for all batches).
    dedup: merge identical inputs (only when ``row_source`` is None).
    trim: cut trailing pad columns down to a power-of-two bucket (exact; fewer FLOPs). False keeps
      the given lengths, for callers that already fixed one shape for a whole dataset.

  Returns:
    {'sum', 'mean', 'length'}: numpy [N] float32 (summed / mean token log-likelihood, tokens).
  """
  targets = np.asarray(decoder_target_tokens).astype(np.int32)
  enc = np.asarray(encoder_input_tokens).astype(np.int32)
  if targets.ndim != 2 or enc.ndim != 2:
    raise ScoringError(f"score_rows: encoder_input_tokens and decoder_target_tokens must be 2-D, "
                       f"got {enc.shape} and {targets.shape}")
  n = targets.shape[0]
  if row_source is None:
    if enc.shape[0] != n:
      raise ScoringError(f"score_rows: {enc.shape[0]} encoder rows vs {n} target rows")
    inputs = check_site_inputs(site_inputs, n, "score_rows")
    if dedup:
      keys = [enc[i].tobytes() + b"".join(v[i].tobytes() for v in inputs.values())
              for i in range(n)]
      first: dict[bytes, int] = {}
      source = np.asarray([first.setdefault(k, len(first)) for k in keys], np.int32)
      uniq = np.zeros(len(first), np.int64)
      for i, k in enumerate(keys):
        uniq[first[k]] = i
      enc = enc[uniq]
      inputs = {k: v[uniq] for k, v in inputs.items()}
    else:
      source = np.arange(n, dtype=np.int32)
  else:
    source = np.asarray(row_source).astype(np.int32)
    if source.shape != (n,) or (n and (source.min() < 0 or source.max() >= enc.shape[0])):
      raise ScoringError(f"score_rows: row_source must be [N={n}] ints in [0, {enc.shape[0]})")
    inputs = check_site_inputs(site_inputs, enc.shape[0], "score_rows")
  weights = (targets > 0) if decoder_loss_weights is None else np.asarray(decoder_loss_weights)
  if weights.shape != targets.shape:
    raise ScoringError(f"score_rows: decoder_loss_weights shape {weights.shape} != targets "
                       f"{targets.shape}")
  rows = n if pad_rows_to is None else int(pad_rows_to)
  if rows < n:
    raise ScoringError(f"score_rows: pad_rows_to={rows} is smaller than the {n} rows")
  # Bucketed shapes: rows fixed, inputs and lengths rounded up to powers of two; under a
  # `partitioning_scope` both batch dims are multiples of the data shards (padding rows).
  u = bucket_size(enc.shape[0], cap=max(rows, enc.shape[0]), minimum=1)
  rows = partitioning.round_up_to_active_batch_shards(rows)
  u = partitioning.round_up_to_active_batch_shards(u)
  length_l, length_t = enc.shape[1], targets.shape[1]
  if trim:
    length_l = bucket_size(max(used_length(enc), 1), cap=length_l)
    length_t = bucket_size(max(used_length(targets), 1), cap=length_t)
  enc = pad_rows(enc[:, :length_l], u)
  inputs = {k: pad_rows(v, u) for k, v in inputs.items()}
  targets = pad_rows(targets[:, :length_t], rows)
  weights = pad_rows(weights[:, :length_t].astype(np.float32), rows)
  source = pad_rows(source, rows)
  out = _score_rows_jit(model, model_variables(variables), jnp.asarray(enc), jnp.asarray(source),
                        jnp.asarray(shift_right(targets)), jnp.asarray(targets),
                        jnp.asarray(weights), {k: jnp.asarray(v) for k, v in inputs.items()})
  return {k: np.asarray(v)[:n] for k, v in out.items()}


def score_choices(model: nn.Module, variables: Mapping[str, Any], encoder_input_tokens: Any,
                  choice_tokens: Any, site_inputs: SiteInputs = None,
                  choice_mask: Any = None, length_normalize: bool = True,
                  trim: bool = True) -> dict[str, np.ndarray]:
  """Scores C answer choices of B examples with one encoder pass per example.

  Args:
    model: a `Transformer`.
    variables: model variables.
    encoder_input_tokens: [B, L] int, EOS-terminated, 0 = pad.
    choice_tokens: [B, C, T] int, each choice EOS-terminated, 0 = pad.
    site_inputs: per-example extras, leaves [B, ...] (repeated for every choice).
    choice_mask: [B, C] bool, False for padding choices (default: choices with any token).
    length_normalize: predict by the mean (True, PHATGOOSE/T0) or summed log-likelihood.
    trim: see `score_rows`.

  Returns:
    {'sum', 'mean', 'length': [B, C] (masked choices: -inf scores, length 0),
     'scores': the one used ('mean' or 'sum'), 'prediction': [B] argmax over C}.
  """
  choices = np.asarray(choice_tokens).astype(np.int32)
  enc = np.asarray(encoder_input_tokens).astype(np.int32)
  if choices.ndim != 3 or enc.ndim != 2 or choices.shape[0] != enc.shape[0]:
    raise ScoringError(f"score_choices: expected encoder_input_tokens [B, L] and choice_tokens "
                       f"[B, C, T], got {enc.shape} and {choices.shape}")
  b, c, t = choices.shape
  mask = np.any(choices > 0, axis=-1) if choice_mask is None else np.asarray(choice_mask, bool)
  if mask.shape != (b, c):
    raise ScoringError(f"score_choices: choice_mask must be [B={b}, C={c}], got {mask.shape}")
  source = np.repeat(np.arange(b, dtype=np.int32), c)  # [B*C]
  flat = score_rows(model, variables, enc, choices.reshape(b * c, t), site_inputs,
                    row_source=source, trim=trim)
  out = {}
  for key in ("sum", "mean", "length"):
    v = flat[key].reshape(b, c)
    fill = 0.0 if key == "length" else -np.inf
    out[key] = np.where(mask, v, fill).astype(np.float32)
  out["scores"] = out["mean" if length_normalize else "sum"]
  out["prediction"] = np.argmax(out["scores"], axis=-1)
  return out


@dataclasses.dataclass
class ChoiceResults:
  """Rank-classification outputs of a dataset.

  Attributes:
    scores: [N, C] the scores used for prediction (-inf for absent choices).
    sums: [N, C] summed log-likelihoods.
    lengths: [N, C] scored tokens per choice (EOS included).
    predictions: [N] argmax choice.
  """
  scores: np.ndarray
  sums: np.ndarray
  lengths: np.ndarray
  predictions: np.ndarray


def rank_classify(model: nn.Module, variables: Mapping[str, Any],
                  inputs: Sequence[Sequence[int]], choices: Sequence[Sequence[Sequence[int]]], *,
                  batch_size: int = 16, site_inputs: SiteInputs = None,
                  length_normalize: bool = True) -> ChoiceResults:
  """Rank classification over a whole dataset of tokenised examples.

  All batches share one padded shape (batch size, max choices, bucketed lengths), so the scorer
  compiles once per dataset.

  Args:
    model: a `Transformer`.
    variables: model variables.
    inputs: N lists of input ids (EOS-terminated, no pads).
    choices: N lists of C_i choices, each a list of ids (EOS-terminated).
    batch_size: examples per batch (the last batch is padded).
    site_inputs: per-example extras, leaves [N, ...].
    length_normalize: mean (True) or summed log-likelihood.

  Returns:
    `ChoiceResults`.
  """
  n = len(inputs)
  if n != len(choices):
    raise ScoringError(f"rank_classify: {n} inputs vs {len(choices)} choice lists")
  if batch_size < 1:
    raise ScoringError(f"rank_classify: batch_size must be >= 1, got {batch_size}")
  for i, ch in enumerate(choices):
    if len(ch) == 0:
      raise ScoringError(f"rank_classify: example {i} has no answer choices")
    if any(len(x) == 0 for x in ch) or len(inputs[i]) == 0:
      raise ScoringError(f"rank_classify: example {i} has an empty input or answer choice")
  per_example = check_site_inputs(site_inputs, n, "rank_classify")
  c_max = max((len(ch) for ch in choices), default=1)
  length_l = bucket_size(max((len(x) for x in inputs), default=1))
  length_t = bucket_size(max((len(x) for ch in choices for x in ch), default=1))
  bsz = min(batch_size, max(n, 1))
  scores = np.full((n, c_max), -np.inf, np.float32)
  sums = np.full((n, c_max), -np.inf, np.float32)
  lengths = np.zeros((n, c_max), np.float32)
  for start in range(0, n, bsz):
    idx = list(range(start, min(start + bsz, n)))
    enc = np.zeros((bsz, length_l), np.int32)
    tgt = np.zeros((bsz, c_max, length_t), np.int32)
    mask = np.zeros((bsz, c_max), bool)
    for r, i in enumerate(idx):
      enc[r, :len(inputs[i])] = inputs[i]
      for j, choice in enumerate(choices[i]):
        tgt[r, j, :len(choice)] = choice
        mask[r, j] = True
    batch_inputs = {k: pad_rows(v[start:start + len(idx)], bsz) for k, v in per_example.items()}
    out = score_choices(model, variables, enc, tgt, batch_inputs or None, mask,
                        length_normalize=length_normalize, trim=False)
    rows = slice(start, start + len(idx))
    scores[rows] = out["scores"][:len(idx)]
    sums[rows] = out["sum"][:len(idx)]
    lengths[rows] = out["length"][:len(idx)]
  return ChoiceResults(scores=scores, sums=sums, lengths=lengths,
                       predictions=np.argmax(scores, axis=-1) if n else np.zeros(0, np.int64))
