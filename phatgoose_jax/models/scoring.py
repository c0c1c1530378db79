"""Target log-likelihoods and the training loss of the encoder-decoder.

``score_batch`` equals t5x's ``EncoderDecoderModel.score_batch`` (sum over target positions of
log_softmax(logits)[target] weighted by ``decoder_loss_weights``; EOS included, pads excluded) and also
returns the length-normalised score (mean token log-likelihood), which rank classification uses.

Letters: B batch, T target length, V vocab.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def token_log_likelihood(logits: Array, targets: Array) -> Array:
  """logits [B, T, V], targets [B, T] -> log p(target) [B, T], in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, _valid_ids(targets, logits.shape[-1])[..., None],
                             axis=-1)[..., 0]


def _valid_ids(targets: Array, vocab: int) -> Array:
  """Target ids clipped into [0, V): a masked placeholder such as HF's -100 then reads a finite
  value that its zero weight removes (an out-of-range gather reads NaN, and NaN * 0 = NaN)."""
  return jnp.clip(targets.astype(jnp.int32), 0, vocab - 1)


def sequence_scores(logits: Array, targets: Array, weights: Optional[Array] = None) -> dict:
  """Summed and length-normalised log-likelihoods [B] of ``targets`` under ``logits``.

  Args:
    logits: [B, T, V].
    targets: [B, T] int (0 = pad).
    weights: [B, T] loss weights; defaults to ``targets > 0``.
  Returns:
    {'sum': [B], 'mean': [B], 'length': [B]} with 'mean' = sum / number of weighted tokens.
  """
  if weights is None:
    weights = targets > 0
  weights = weights.astype(jnp.float32)
  ll = jnp.where(weights > 0, token_log_likelihood(logits, targets), 0.0) * weights  # [B, T]
  total = ll.sum(-1)
  length = weights.sum(-1)
  return {"sum": total, "mean": total / jnp.maximum(length, 1.0), "length": length}


def score_batch(model: nn.Module, variables: Mapping[str, Any], batch: Mapping[str, Array],
                site_inputs: Optional[dict] = None) -> dict:
  """t5x-style scores of a batch in the feature-converter layout (eval mode)."""
  logits = model.apply(dict(variables), batch["encoder_input_tokens"],
                       batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                       enable_dropout=False, site_inputs=site_inputs)
  return sequence_scores(logits, batch["decoder_target_tokens"],
                         batch.get("decoder_loss_weights"))


def cross_entropy_loss(logits: Array, targets: Array, weights: Array,
                       z_loss: float = 0.0) -> tuple[Array, Array]:
  """Token-mean cross entropy (+ optional t5x z-loss). Returns (loss, number of tokens).

  The PHATGOOSE recipe (HF-style) averages the token cross entropy over the non-pad target tokens of
  the batch; ``z_loss`` (t5x's default 1e-4) is off by default to match it.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  ll = jnp.take_along_axis(logits, _valid_ids(targets, logits.shape[-1])[..., None],
                           axis=-1)[..., 0] - log_z
  weights = weights.astype(jnp.float32)
  ll = jnp.where(weights > 0, ll, 0.0)
  loss = -(ll * weights).sum()
  if z_loss:
    loss = loss + z_loss * (jnp.square(log_z) * weights).sum()
  count = weights.sum()
  return loss / jnp.maximum(count, 1.0), count
